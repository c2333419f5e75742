"""The typed job config of `lora-llm train` / `eval` / `eval-suite` (TOML <-> dataclasses).

A file means the same to the CLI, the GUI, `accelerate launch` and the MindSpore backend:

    run_dir = "runs/sst2"
    backend = "torch"            # or "mindspore" (lora_llm.mindspore.train.train_from_config)
    [model]  pretrained = "tiny" | hub id | local folder;  gguf_file;  tokenizer;  dtype
    [data]   task = "wikitext2" | "sst2" | "cola" | "imdb" | "ag_news";  data_dir / files / splits ...
    [lora]   lora_core.LoraConfig fields
    [train]  lora_core.training.TrainSettings fields
    [eval]   perplexity window, evaluation batch size, generation settings
    [mindspore]  mode = "graph" | "pynative", device_target = "CPU" | "GPU" | "Ascend" (backend = "mindspore")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence, get_args

from lora_core.config import LoraConfig
from lora_core.configfile import load_config
from lora_core.fields import Checked, option
from lora_core.settings import TrainSettings, loraplus_error

Task = Literal["wikitext2", "sst2", "cola", "imdb", "ag_news"]
TASKS = get_args(Task)
# keys that only lora-sd configs have (an image job given to lora-llm is named as such)
SD_KEYS = ("sample", "loss", "embedding", "text_encoder_lora", "output", "data.path", "data.resolution")
Backend = Literal["torch", "mindspore"]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelSection(Checked, section="model"):
    pretrained: str = option("tiny", "hub id (online), local folder (config.json + weights, or the folder holding "
                             "gguf_file), 'pkg:NAME' (a bundled model) or 'tiny' (a small random GPT-2 for tests)")
    gguf_file: str = option("", "GGUF file name inside the pretrained folder")
    tokenizer: str = option("", "hub id or folder; '' = the same as pretrained ('tiny': the shared GPT-2 BPE files)")
    dtype: Dtype = option("float32", "dtype of the frozen base weights (LoRA parameters stay fp32)")
    prefix_cache: Literal["auto", "off"] = option(
        "auto", "classification with lora.layers above layer 0: auto computes the frozen layers below the first adapted "
        "layer once per example, stores their output on disk and trains only the layers above (lora_llm.prefix_cache)")
    prefix_cache_dir: str = option("", "where the frozen-prefix cache lives; '' = $LORA_CACHE_DIR/prefix, else "
                                   "~/.cache/lora-workbench/prefix")
    prefix_cache_dtype: Literal["float16", "bfloat16", "float32"] = option(
        "float16", "dtype of the cached hidden states (float32: exact, twice the disk)")


@dataclass
class DataSection(Checked, section="data"):
    """Where the examples come from, in order of precedence: train_file / eval_file, else data_dir + the
    split's upstream file name, else ../shared/data/<task> when present, else Hugging Face `datasets` (online)."""
    task: Task = option("sst2", "wikitext2 (language modelling) or a classification task")
    data_dir: str = option("", "folder with the task's upstream files")
    train_file: str = option("", "training file (or an aclImdb split folder)")
    eval_file: str = option("", "evaluation file (or an aclImdb split folder)")
    train_split: str = option("", "training split name; '' = the task's default (lora_llm.data.TASK_INFO)")
    eval_split: str = option("", "evaluation split name; '' = the task's default")
    max_length: int = option(128, "classification: truncate each example to this many tokens", ge=2)
    truncation: Literal["head", "head_tail"] = option(
        "head", "classification: head keeps the first max_length tokens; head_tail keeps the first max_length // 4 "
        "and the last ones of a longer example (Sun et al. 2019: 128 + 382 for 512)")
    class_weights: Literal["none", "balanced"] = option(
        "none", "classification loss: balanced weighs class c by n / (classes * n_c) of the training set")
    block_size: int = option(256, "language modelling: training sequences of this many tokens", ge=2)
    detokenize: bool = option(True, "WikiText-2: undo the ' @-@ ' style tokenisation")
    max_train_examples: int = option(0, "0 = all (classification: examples; LM: blocks)", ge=0)
    max_eval_examples: int = option(0, "0 = all; else a fixed random subset (seed 0), the same in every run", ge=0)

    @property
    def is_lm(self) -> bool:
        return self.task == "wikitext2"


@dataclass
class EvalSection(Checked, section="eval"):
    """Evaluation after training (and `lora-llm eval`).
    Perplexity: the split's text joined into one string, tokenized once, scored with a sliding window
    of `ppl_max_length` tokens moved by `ppl_stride`; each token is predicted exactly once, with up to
    ppl_max_length - ppl_stride tokens of context from the previous window."""
    enabled: bool = option(True, "evaluate after training")
    baseline: bool = option(False, "also score the base model with the adapter switched off")
    batch_size: int = option(16, "evaluation batch size", ge=1)
    ppl_max_length: int = option(1024, "perplexity window in tokens", ge=2)
    ppl_stride: int = option(512, "perplexity window step in tokens (at most ppl_max_length)", ge=1)
    max_eval_tokens: int = option(0, "LM: score only the first N tokens; 0 = the whole split", ge=0)
    prompts: list[str] = option(["The history of the city"], "LM: prompts to generate from after training")
    max_new_tokens: int = option(40, "tokens generated per prompt", ge=1)
    do_sample: bool = option(False, "sample; false: greedy")
    temperature: float = option(1.0, "sampling temperature", gt=0)
    top_k: int = option(0, "sample from the k most likely tokens; 0: off", ge=0)
    top_p: float = option(1.0, "nucleus sampling mass; 1.0: off", gt=0, le=1)
    seed: int = option(0, "sampling seed", ge=0)

    def __post_init__(self):
        super().__post_init__()
        if self.ppl_stride > self.ppl_max_length:
            raise ValueError(f"eval.ppl_stride must be in 1..ppl_max_length ({self.ppl_max_length}), got {self.ppl_stride}")


@dataclass
class MindSporeSection(Checked, section="mindspore"):
    """Used only with backend = "mindspore" (lora_llm.mindspore; GPT-2 models)."""
    mode: Literal["graph", "pynative"] = option("graph", "graph: the train step is compiled with mindspore.jit; "
                                                "pynative: eager")
    device_target: Literal["CPU", "GPU", "Ascend"] = option("CPU", "the MindSpore device")
    device_id: int = option(0, "device index", ge=0)


@dataclass
class LLMTrainConfig(Checked):
    """The `lora-llm train` / `eval` job."""
    run_dir: str = option("runs/llm", "the run folder")
    backend: Backend = option("torch", "torch, or mindspore (lora_llm.mindspore.train; GPT-2 models)")
    model: ModelSection = option(help="the base model and tokenizer", factory=ModelSection)
    data: DataSection = option(help="the task and its examples", factory=DataSection)
    lora: LoraConfig = option(help="the adapter; q_proj/k_proj/v_proj on GPT-2 mean those slices of its fused c_attn "
                              "(the default q,v is the paper's choice on every architecture)", factory=LoraConfig)
    train: TrainSettings = option(help="the training loop", factory=TrainSettings)
    eval: EvalSection = option(help="evaluation and generation", factory=EvalSection)
    mindspore: MindSporeSection = option(help="the MindSpore backend", factory=MindSporeSection)

    def __post_init__(self):
        super().__post_init__()
        if self.lora.type != "lora" and self.backend == "mindspore":
            raise ValueError(f"lora.type = {self.lora.type!r}: the MindSpore backend trains LoRA only; set "
                             "backend = \"torch\" or lora.type = \"lora\"")
        if why := loraplus_error(self.train, [self.lora.type]):
            raise ValueError(why)


def load_llm_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> LLMTrainConfig:
    """Read a job file (or the defaults when path is None) and apply `section.key=value` overrides."""
    return load_config(LLMTrainConfig, path, overrides, other=("lora-sd", SD_KEYS))


__all__ = ["LLMTrainConfig", "ModelSection", "DataSection", "EvalSection", "MindSporeSection", "load_llm_config", "TASKS"]
