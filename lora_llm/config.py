"""The typed job config of `lora-llm train` / `eval` / `eval-suite` (TOML <-> dataclasses).

A file means the same to the CLI, the GUI, `accelerate launch` and the MindSpore backend:

    run_dir = "runs/sst2"
    backend = "torch"            # or "mindspore" (lora_llm.mindspore.train_from_config)
    [model]  pretrained = "tiny" | hub id | local folder;  gguf_file;  tokenizer;  dtype
    [data]   task = "wikitext2" | "sst2" | "cola" | "imdb" | "ag_news";  data_dir / files / splits ...
    [lora]   lora_core.LoraConfig fields
    [train]  lora_core.training.TrainSettings fields
    [eval]   perplexity window, evaluation batch size, generation settings
    [mindspore]  mode = "graph" | "pynative", device_target = "CPU" | "GPU" | "Ascend" (backend = "mindspore")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from lora_core.config import LoraConfig
from lora_core.configfile import ConfigError, load_config
from lora_core.run import TrainSettings

TASKS = ("wikitext2", "sst2", "cola", "imdb", "ag_news")
BACKENDS = ("torch", "mindspore")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSection:
    """pretrained: a hub id ("gpt2", online), a local folder (config.json + weights, or the folder
    holding `gguf_file`), or "tiny" (a small random GPT-2 built from a config: for tests).
    tokenizer: hub id or folder; "" = the same as pretrained ("tiny": the shared GPT-2 BPE files)."""
    pretrained: str = "tiny"
    gguf_file: str = ""
    tokenizer: str = ""
    dtype: str = "float32"   # dtype of the frozen base weights (LoRA parameters stay fp32)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class DataSection:
    """Where the examples come from, in order of precedence:
    train_file / eval_file (one file, or an aclImdb split folder), else data_dir + the split's
    upstream file name, else ../shared/data/<task> when present, else Hugging Face `datasets` (online).
    Split names: "" = the task's default (see lora_llm.data.TASK_INFO)."""
    task: str = "sst2"
    data_dir: str = ""
    train_file: str = ""
    eval_file: str = ""
    train_split: str = ""
    eval_split: str = ""
    max_length: int = 128          # classification: truncate each example to this many tokens
    block_size: int = 256          # language modelling: training sequences of this many tokens
    detokenize: bool = True        # WikiText-2: undo the " @-@ " style tokenisation
    max_train_examples: int = 0    # 0 = all (classification: examples; LM: blocks)
    max_eval_examples: int = 0     # 0 = all; else a fixed random subset (seed 0): the same in every run

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        for k in ("max_length", "block_size"):
            if getattr(self, k) < 2:
                raise ValueError(f"data.{k} must be at least 2, got {getattr(self, k)}")
        for k in ("max_train_examples", "max_eval_examples"):
            if getattr(self, k) < 0:
                raise ValueError(f"data.{k} must be >= 0, got {getattr(self, k)}")

    @property
    def is_lm(self) -> bool:
        return self.task == "wikitext2"


@dataclass
class EvalSection:
    """Evaluation after training (and `lora-llm eval`).
    Perplexity: the split's text joined into one string, tokenized once, scored with a sliding window
    of `ppl_max_length` tokens moved by `ppl_stride`; each token is predicted exactly once, with up to
    ppl_max_length - ppl_stride tokens of context from the previous window."""
    enabled: bool = True
    baseline: bool = False         # also score the base model with the adapter switched off
    batch_size: int = 16
    ppl_max_length: int = 1024
    ppl_stride: int = 512
    max_eval_tokens: int = 0       # LM: 0 = the whole split; else score only the first N tokens
    prompts: list[str] = field(default_factory=lambda: ["The history of the city"])
    max_new_tokens: int = 40
    do_sample: bool = False        # False: greedy
    temperature: float = 1.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    seed: int = 0

    def __post_init__(self):
        if self.ppl_stride <= 0 or self.ppl_stride > self.ppl_max_length:
            raise ValueError(f"eval.ppl_stride must be in 1..ppl_max_length, got {self.ppl_stride}")
        if self.temperature <= 0:
            raise ValueError(f"eval.temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class MindSporeSection:
    """Used only with backend = "mindspore" (lora_llm.mindspore; GPT-2 models).
    mode: "graph" (the train step is compiled with mindspore.jit) or "pynative" (eager).
    device_target: "CPU", "GPU" or "Ascend"."""
    mode: str = "graph"
    device_target: str = "CPU"
    device_id: int = 0

    def __post_init__(self):
        if self.mode not in ("graph", "pynative"):
            raise ValueError(f"mindspore.mode must be 'graph' or 'pynative', got {self.mode!r}")
        if self.device_target not in ("CPU", "GPU", "Ascend"):
            raise ValueError(f"mindspore.device_target must be CPU, GPU or Ascend, got {self.device_target!r}")


@dataclass
class LLMTrainConfig:
    run_dir: str = "runs/llm"
    backend: str = "torch"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    # target_modules q_proj/k_proj/v_proj on a GPT-2 model mean those slices of its fused c_attn
    # (lora_llm.models.resolve_lora): the default q,v is the paper's choice on every architecture
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSection = field(default_factory=EvalSection)
    mindspore: MindSporeSection = field(default_factory=MindSporeSection)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


def load_llm_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> LLMTrainConfig:
    """Read a job file (or the defaults when path is None) and apply `section.key=value` overrides."""
    return load_config(LLMTrainConfig, path, overrides)


__all__ = ["LLMTrainConfig", "ModelSection", "DataSection", "EvalSection", "MindSporeSection", "load_llm_config", "ConfigError", "TASKS"]
