"""The `[train]` table of every training config: the loop's settings (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    """The loop's settings: the `[train]` table of every training config."""
    max_steps: int = 100
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"          # adamw | adamw8bit (bitsandbytes)
    lr_scheduler: str = "constant"    # constant | constant_with_warmup | linear | cosine | ...
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0        # 0 disables clipping
    mixed_precision: str = "no"       # no | fp16 | bf16 (LoRA parameters stay fp32)
    seed: int = 42
    gradient_checkpointing: bool = False
    log_every: int = 1
    checkpoint_every: int = 0         # 0: only at the end (and on stop)
    keep_checkpoints: int = 2
    sample_every: int = 0             # 0: only at the end
    num_workers: int = 0

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"train.optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
