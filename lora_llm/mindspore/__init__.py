"""The MindSpore backend of lora-llm: GPT-2 LoRA training in parity with the PyTorch path.

Importing this package does not import MindSpore; `train_from_config` does (lazily), so the rest of
the project works without it. `lora-llm train --backend mindspore` (or `backend = "mindspore"` in the
config file) calls `train_from_config`.
"""
from __future__ import annotations


def train_from_config(cfg, run_dir, resume=None, overwrite: bool = False) -> dict:
    """Train cfg (an LLMTrainConfig) with MindSpore into run_dir; see lora_llm.mindspore.train."""
    from .train import train_from_config as _train
    return _train(cfg, run_dir, resume, overwrite=overwrite)


__all__ = ["train_from_config"]
