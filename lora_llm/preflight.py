"""`lora-llm check`: config conflicts, the data audit, parameters and the peak-memory estimate, and two real
optimisation steps through the normal train path (lora_llm.train.train_from_config) at a reduced size.
The report, the memory arithmetic and the CLI command are lora_core.preflight's."""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from lora_core.dtypes import autocast_dtype
from lora_core.preflight import PreflightReport, fit_activations, memory_estimate, run_steps
from lora_core.preflight_torch import SavedBytes, begin, common_conflicts

from .config import LLMTrainConfig, load_llm_config
from .data import train_items
from .errors import MINDSPORE_MISSING, DataError
from .models import count_parameters, load_tokenizer, max_positions
from .train import build_model, train_from_config


def importable(name: str) -> bool:
    """The package can be imported (found, without importing it: MindSpore takes seconds)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def conflicts(cfg: LLMTrainConfig, device: str, rep: PreflightReport) -> None:
    common_conflicts(cfg, device, rep)
    if cfg.model.dtype == "float16" and torch.device(device).type == "cpu":
        rep.warn("model.dtype = \"float16\" on CPU: half-precision matmuls there are slow or missing; use "
                 "\"bfloat16\" or \"float32\"", "model.dtype")
    if cfg.backend == "mindspore" and not importable("mindspore"):
        rep.error(MINDSPORE_MISSING, "backend")
    elif cfg.backend == "mindspore":
        rep.add("info", "backend = \"mindspore\": the memory estimate and the two steps use the PyTorch model of "
                "the same config", "backend")


def positions(cfg: LLMTrainConfig, rep: PreflightReport, positions: Optional[int]) -> None:
    """Lengths the model's position table cannot hold."""
    d, e = cfg.data, cfg.eval
    if positions:
        for key, value in (("data.block_size", d.block_size if d.is_lm else 0),
                           ("data.max_length", 0 if d.is_lm else d.max_length),
                           ("eval.ppl_max_length", e.ppl_max_length if d.is_lm else 0)):
            if value > positions:
                rep.error(f"{key} = {value} exceeds the model's {positions} positions; set it to at most {positions}",
                          key)


def audit(cfg: LLMTrainConfig, tokenizer, rep: PreflightReport) -> list[dict]:
    """The tokenized training set as the trainer sees it: counts, lengths, truncation, labels."""
    try:
        items = train_items(cfg, tokenizer)
    except (DataError, FileNotFoundError, OSError, ValueError) as e:
        rep.error(f"training data of task {cfg.data.task!r}: {e}", "data")
        return []
    lengths = [len(i["input_ids"]) for i in items]
    rep.data = {"task": cfg.data.task, "examples": len(items), "tokens": sum(lengths),
                "max_length": max(lengths, default=0), "mean_length": round(sum(lengths) / max(1, len(lengths)), 1)}
    if not cfg.data.is_lm:
        rep.data["truncated"] = sum(n >= cfg.data.max_length for n in lengths)
        rep.data["labels"] = dict(sorted(Counter(i["label"] for i in items).items()))
        if rep.data["truncated"]:
            rep.warn(f"{rep.data['truncated']} of {len(items)} examples are cut at data.max_length = "
                     f"{cfg.data.max_length}", "data.max_length")
    empty = sum(n == 0 for n in lengths)
    if not items or empty == len(items):
        rep.error(f"task {cfg.data.task!r}: no training examples (check data.train_file / data_dir)", "data")
    elif empty:
        rep.warn(f"{empty} empty example(s)", "data")
    if items and cfg.train.batch_size > len(items):
        rep.warn(f"train.batch_size ({cfg.train.batch_size}) exceeds the {len(items)} training examples",
                 "train.batch_size")
    return items


def _activations(cfg: LLMTrainConfig, model, device: str, length: int) -> tuple[float, float]:
    """(saved bytes of a training forward at the chosen batch and length, the largest saved tensor): measured
    at batch 1 at that length (up to 2,048 tokens), else at 1/4 and 1/2 of it and extrapolated."""
    dtype = autocast_dtype(cfg.train.mixed_precision)
    lengths = [length] if length <= 2048 else [length // 4, length // 2]
    points, largest = [], 0.0
    was = model.training
    model.train()
    try:
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
            labels = ids if cfg.data.is_lm else torch.zeros(1, dtype=torch.long, device=device)
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None), \
                    SavedBytes(model) as sb:
                model(input_ids=ids, labels=labels).loss
            points.append((n, sb.total))
            largest = sb.largest * length / n
    finally:
        model.train(was)
    return fit_activations(points, length) * cfg.train.batch_size, largest * cfg.train.batch_size


def measure(cfg: LLMTrainConfig, device: str, rep: PreflightReport, tokenizer=None, items=None):
    """Trainable parameters, alpha/r and the memory estimate; returns the model (with its adapter)."""
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    model, lcfg = build_model(cfg, tokenizer)
    model.to(device)
    trainable, total = count_parameters(model)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    scale = lcfg.alpha / (math.sqrt(lcfg.r) if lcfg.use_rslora else lcfg.r)
    rep.parameters = {"trainable": trainable, "total": total, "type": lcfg.type, "r": lcfg.r, "alpha": lcfg.alpha, "scale": scale,
                      "use_rslora": lcfg.use_rslora, "targets": lcfg.target_modules,
                      **({"oft_block_size": lcfg.oft_block_size} if lcfg.type == "oft" else {})}
    d = cfg.data
    length = d.block_size if d.is_lm else min(d.max_length, max((len(i["input_ids"]) for i in items or []),
                                                                 default=d.max_length))
    acts, largest = _activations(cfg, model, device, length)
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    rep.memory = memory_estimate(frozen, sizes, acts, largest, cfg.train.optimizer, torch.device(device).type,
                                 cfg.train.fused_backward)
    rep.memory.update(batch=cfg.train.batch_size, length=length, precision=cfg.train.mixed_precision,
                      weights_dtype=cfg.model.dtype)
    return model


def _small_config(cfg: LLMTrainConfig, work: Path) -> LLMTrainConfig:
    c = copy.deepcopy(cfg)
    c.run_dir, c.backend = str(work / "run"), "torch"
    c.train.batch_size = min(cfg.train.batch_size, 2)
    c.train.checkpoint_every, c.train.keep_checkpoints, c.train.lr_warmup_steps = 0, 1, 0
    c.train.sample_every, c.train.log_every, c.train.num_workers, c.train.gradient_accumulation_steps = 0, 1, 0, 1
    c.data.max_train_examples = c.train.batch_size * 2
    c.data.block_size = min(c.data.block_size, 64)
    c.data.max_length = min(c.data.max_length, 64)
    c.eval.enabled, c.eval.prompts = False, []
    return c


def preflight(config=None, overrides=(), device: str = "", steps: int = 2,
              cfg: Optional[LLMTrainConfig] = None) -> PreflightReport:
    """Check a `lora-llm train` config (a file with overrides, or `cfg`)."""
    rep, cfg, device = begin("llm-train", config, overrides, cfg, load_llm_config, device)
    if cfg is None:
        return rep
    conflicts(cfg, device, rep)
    try:
        tokenizer = load_tokenizer(cfg.model)
    except Exception as e:  # noqa: BLE001 - a model or tokenizer that cannot load blocks the run
        rep.error(f"model.pretrained {cfg.model.pretrained!r}: the tokenizer cannot be loaded: {e}", "model.pretrained")
        return rep
    items = audit(cfg, tokenizer, rep)
    try:
        model = measure(cfg, device, rep, tokenizer, items)
    except Exception as e:  # noqa: BLE001
        rep.error(f"model.pretrained {cfg.model.pretrained!r} cannot be loaded or run: {type(e).__name__}: {e}",
                  "model.pretrained")
        return rep
    positions(cfg, rep, max_positions(model))
    del model
    if steps and items and rep.ok and cfg.backend == "torch":
        with tempfile.TemporaryDirectory(prefix="lora_llm_check_") as tmp:
            small = _small_config(cfg, Path(tmp))
            small.train.max_steps = steps
            run_steps(rep, f"{steps} steps, batch {small.train.batch_size}, at most "
                      f"{small.data.block_size if small.data.is_lm else small.data.max_length} tokens",
                      small.run_dir, lambda: train_from_config(small))
    return rep
