"""The `[train]` table of every training config: the loop's settings (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .fields import Checked, option

# transformers' get_scheduler names that need nothing beyond warmup and total steps (checked in tests/test_config_fields.py)
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                      "inverse_sqrt"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor"]
MixedPrecision = Literal["no", "fp16", "bf16"]
LogWith = Literal["", "tensorboard", "wandb"]   # Accelerate's trackers (lora_core.training.open_trackers)


@dataclass
class TrainSettings(Checked, section="train"):
    """The loop's settings: the `[train]` table of every training config."""
    max_steps: int = option(100, "optimizer steps to train", ge=1)
    batch_size: int = option(1, "examples per micro-batch (per process)", ge=1)
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", ge=1)
    learning_rate: float = option(1e-4, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    optimizer: Optimizer = option("adamw", "adamw, adamw8bit (needs bitsandbytes), prodigy (needs prodigyopt; "
                                            "learning_rate is then Prodigy's multiplier, usually 1.0) or adafactor "
                                            "(torch's: factored second moments, the least optimizer memory)")
    fused_backward: bool = option(False, "step each parameter's optimizer as soon as its gradient is complete and "
                                         "free the gradient (less memory); needs max_grad_norm = 0 and "
                                         "gradient_accumulation_steps = 1")
    loraplus_lr_ratio: float = option(0.0, "LoRA+: the lora_B matrices learn at learning_rate x this ratio "
                                           "(the paper suggests 16); 0 disables it", ge=0)
    head_learning_rate: float = option(0.0, "learning rate of the modules trained in full beside the adapter "
                                            "(lora.modules_to_save, e.g. a classification head); 0: learning_rate",
                                       ge=0)
    ema_decay: float = option(0.0, "EMA of the adapter weights, ema = decay*ema + (1-decay)*w after each step "
                                   "(e.g. 0.999); 0 disables it", ge=0, lt=1)
    ema_start_step: int = option(0, "optimizer step from which the EMA is updated (it copies the weights then)",
                                 ge=0)
    lr_scheduler: LRScheduler = option("constant", "learning-rate schedule (transformers' get_scheduler)")
    lr_warmup_steps: int = option(0, "linear warm-up steps of the schedule", ge=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping", ge=0)
    mixed_precision: MixedPrecision = option("no", "base weights in fp16/bf16 under autocast; LoRA parameters stay fp32")
    seed: int = option(42, "seed of initialisation, data order and dropout", ge=0, lt=2**32)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    log_every: int = option(1, "write a metrics line every N steps", ge=1)
    log_with: LogWith = option("", "also send each metrics line to Accelerate's tracker: 'tensorboard' (RUN/tensorboard, "
                                   "`tensorboard --logdir RUN/tensorboard`; the [tensorboard] extra) or 'wandb' (needs "
                                   "wandb and `wandb login`); empty: metrics.jsonl only")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N steps; 0: only at the end (and on stop)", ge=0)
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted); 0: keep all", ge=0)
    sample_every: int = option(0, "validation samples every N steps; 0: only at the end", ge=0)
    val_every: int = option(0, "validation loss every N steps (needs a validation split); 0: only at the end", ge=0)
    num_workers: int = option(0, "data-loader worker processes", ge=0)

    def __post_init__(self):
        super().__post_init__()
        if self.fused_backward and (self.max_grad_norm or self.gradient_accumulation_steps > 1):
            raise ValueError("train.fused_backward steps each parameter during the backward pass: set "
                             "train.max_grad_norm = 0 (clipping needs every gradient at once) and "
                             "train.gradient_accumulation_steps = 1")
        if self.fused_backward and self.mixed_precision == "fp16":
            raise ValueError("train.fused_backward cannot unscale fp16 gradients before each step: use "
                             "train.mixed_precision = \"bf16\" or \"no\"")


def loraplus_error(train: TrainSettings, types: list[str]) -> str:
    """Why train.loraplus_lr_ratio would do nothing ("" when it acts): LoRA+ speeds up lora_B matrices, which
    only adapters of type lora have; `types` are the run's adapters' lora.type values."""
    if train.loraplus_lr_ratio and "lora" not in types:
        return (f"train.loraplus_lr_ratio acts on lora_B matrices, which lora.type = {types[0]!r} has none of: set "
                "it to 0 (or lora.type = \"lora\")")
    return ""
