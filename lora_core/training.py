"""The PyTorch step engine of the run protocol (lora_core.run.TrainLoop), and `train`.

Knows nothing of the model: a trainer hands it a module whose trainable parameters are the
adapter, a DataLoader, and `loss_fn(model, batch) -> scalar loss`. The engine owns the optimizer,
the LR schedule, accumulation, mixed precision through Accelerate and the checkpoint payload
(trainable parameters, optimizer, scheduler, scaler, RNG states); the protocol owns the run
folder, status, metrics, the NaN guard, stop and checkpoint rotation. The loss stays on the
device between readings (one sync per log_every steps).
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .io import atomic_save_safetensors
from .run import RunDir, TrainLoop
from .settings import TrainSettings
from .errors import MissingPackageError

log = logging.getLogger("lora")


# ------------------------------------------------------------------ RNG state
def _rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    npu = getattr(torch, "npu", None)
    if npu is not None and hasattr(npu, "get_rng_state_all") and npu.is_available():
        for i, s in enumerate(npu.get_rng_state_all()):
            tensors[f"npu_{i}"] = s
    return meta, tensors


def _set_rng_state(meta: dict, tensors: dict) -> None:
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    npu = [tensors[k] for k in sorted(tensors) if k.startswith("npu_")]
    if npu and getattr(torch, "npu", None) is not None:
        torch.npu.set_rng_state_all(npu)


# ------------------------------------------------------------------ sampler
class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a permutation that depends only on (seed, epoch): a resumed run sees the
    same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


# ------------------------------------------------------------------ optimizer
def param_groups(named: list[tuple[str, nn.Parameter]], s: TrainSettings,
                 part_lrs: Optional[dict[str, float]] = None) -> list[dict]:
    """One group per learning rate: with LoRA+ (train.loraplus_lr_ratio) the lora_B matrices learn at
    lr x ratio; with train.head_learning_rate the modules trained in full (modules_to_save) at that rate;
    `part_lrs` {name part: lr}: the parameters whose name holds the part at that rate (a trainer's own)."""
    def lr_of(name: str) -> float:
        name = f".{name}"
        for part, lr in (part_lrs or {}).items():
            if part in name:
                return lr
        if s.head_learning_rate and ".modules_to_save." in name:
            return s.head_learning_rate
        return s.learning_rate * (s.loraplus_lr_ratio if s.loraplus_lr_ratio and ".lora_B." in name else 1.0)
    for flag, part in (("loraplus_lr_ratio", ".lora_B."), ("head_learning_rate", ".modules_to_save.")):
        if getattr(s, flag) and not any(part in f".{n}" for n, _ in named):
            raise ValueError(f"train.{flag} is set but the model has no {part.strip('.')} parameters; set it to 0")
    groups: dict[float, list] = {}
    for n, p in named:
        groups.setdefault(lr_of(n), []).append(p)
    return [{"params": ps} if lr == s.learning_rate else {"params": ps, "lr": lr} for lr, ps in groups.items()]


def optimizer_class(s: TrainSettings):
    """The optimizer class of train.optimizer; an optional package that is missing is one MissingPackageError
    line (checked before a model loads)."""
    if s.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb   # lazy: an optional package (not a dependency)
        except ImportError:
            raise MissingPackageError("train.optimizer = 'adamw8bit' needs bitsandbytes, which is not installed: "
                                      "pip install bitsandbytes (or choose optimizer = 'adamw' or 'adafactor')") from None
        return bnb.optim.AdamW8bit
    if s.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy   # lazy: an optional package (the [prodigy] extra)
        except ImportError:
            raise MissingPackageError("train.optimizer = 'prodigy' needs prodigyopt, which is not installed: "
                                      "pip install prodigyopt (or the [prodigy] extra)") from None
        return Prodigy
    return torch.optim.Adafactor if s.optimizer == "adafactor" else torch.optim.AdamW


def make_optimizer(params, s: TrainSettings, part_lrs: Optional[dict[str, float]] = None) -> torch.optim.Optimizer:
    """params: (name, parameter) pairs (or bare parameters: no LoRA+ then); part_lrs: see param_groups.
    With train.fused_backward the optimizer steps each parameter in its gradient hook (FusedBackward)."""
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    named = [p if isinstance(p, tuple) else (str(i), p) for i, p in enumerate(params)]
    groups = param_groups(named, s, part_lrs)
    cls = optimizer_class(s)
    if s.fused_backward:
        return FusedBackward(groups, cls, lr=s.learning_rate, weight_decay=s.weight_decay)
    return cls(groups, lr=s.learning_rate, weight_decay=s.weight_decay)


class FusedBackward(torch.optim.Optimizer):
    """train.fused_backward: one optimizer of class `cls` per parameter, stepped in the parameter's
    post-accumulate-grad hook as soon as its gradient is complete, which is then freed: the gradients of the
    whole adapter are never alive at once. step() and zero_grad() do nothing; the LR schedule sets the groups'
    learning rates here and each hook copies its group's before stepping. The result equals the unfused step
    (the same per-parameter update; no clipping across parameters, no accumulation: config checks)."""

    def __init__(self, groups: list[dict], cls, **defaults):
        super().__init__(groups, defaults)
        self.inner: list[torch.optim.Optimizer] = []
        for group in self.param_groups:
            for p in group["params"]:
                opt = cls([{"params": [p], **{k: v for k, v in group.items() if k != "params"}}])
                self.inner.append(opt)
                p.register_post_accumulate_grad_hook(self._hook(opt, group))

    @staticmethod
    def _hook(opt: torch.optim.Optimizer, group: dict):
        def step(p: torch.Tensor) -> None:
            opt.param_groups[0]["lr"] = group["lr"]
            opt.step()
            p.grad = None
        return step

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        return {"fused": [o.state_dict() for o in self.inner], "lrs": [g["lr"] for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        for o, st in zip(self.inner, state["fused"]):
            o.load_state_dict(st)
        for g, lr in zip(self.param_groups, state["lrs"]):
            g["lr"] = lr


def make_scheduler(optimizer, s: TrainSettings):
    from transformers import get_scheduler   # lazy: seconds to import; lora_sd.data imports EpochSampler alone
    return get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps,
                         num_training_steps=s.max_steps)


# ------------------------------------------------------------------ checkpoint payload
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_payload(accelerator, folder: Path, model: nn.Module, optimizer, scheduler) -> None:
    """Every process: its RNG state; the main process: parameters, optimizer, scheduler, scaler."""
    meta, tensors = _rng_state()
    rank = accelerator.process_index
    (folder / f"rng_rank{rank}.json").write_text(json.dumps(meta))
    atomic_save_safetensors(folder / f"rng_rank{rank}.safetensors", tensors)
    if accelerator.is_main_process:
        atomic_save_safetensors(folder / "trainable.safetensors", trainable_state(accelerator.unwrap_model(model)))
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), folder / "scaler.pt")


def load_payload(accelerator, path: Path, model: nn.Module, optimizer, scheduler) -> None:
    saved = load_file(str(path / "trainable.safetensors"))
    own = dict(accelerator.unwrap_model(model).named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    if set(saved) != wanted:
        raise ValueError(f"{path}: checkpoint parameters do not match the model "
                         f"(missing {sorted(wanted - set(saved))[:5]}, unexpected {sorted(set(saved) - wanted)[:5]})")
    with torch.no_grad():
        for n, t in saved.items():
            if own[n].shape != t.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, model has {tuple(own[n].shape)}")
            own[n].copy_(t.to(own[n].device, own[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    rank = accelerator.process_index
    rng_json = path / f"rng_rank{rank}.json"
    if rng_json.is_file():
        _set_rng_state(json.loads(rng_json.read_text()), load_file(str(path / f"rng_rank{rank}.safetensors")))


# ------------------------------------------------------------------ EMA
class EMA:
    """Exponential moving average of the trainable parameters: after optimizer step n >= start_step,
    ema = decay * ema + (1 - decay) * w (the first such step copies w). fp32, on the parameters' device."""

    FILE = "ema.safetensors"

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0):
        self.decay, self.start_step = decay, start_step
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow: Optional[dict[str, torch.Tensor]] = None   # None until the first update

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < self.start_step:
            return
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
            return
        ws = list(self.params.values())
        torch._foreach_lerp_(list(self.shadow.values()), [w.detach().float() for w in ws], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the model for the duration (unchanged model before the first update)."""
        if self.shadow is None:
            yield False
            return
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield True
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def save(self, folder: Path) -> None:
        if self.shadow is not None:
            atomic_save_safetensors(folder / self.FILE, self.shadow)

    def load(self, folder: Path) -> None:
        f = folder / self.FILE
        if not f.is_file():
            self.shadow = None
            return
        saved = load_file(str(f))
        if set(saved) != set(self.params):
            raise ValueError(f"{f}: EMA parameters do not match the model's trainable parameters")
        self.shadow = {n: t.to(self.params[n].device) for n, t in saved.items()}


def make_ema(model: nn.Module, s: TrainSettings) -> Optional[EMA]:
    """An EMA of the trainable parameters when train.ema_decay > 0, else None."""
    return EMA(model, s.ema_decay, s.ema_start_step) if s.ema_decay > 0 else None


# ------------------------------------------------------------------ the engine
class TorchEngine:
    """One optimizer step at a time through Accelerate (see lora_core.run for the engine interface).
    The loss handle of a step is the mean of its micro-batch losses, a device tensor: nothing here
    waits for the device."""
    backend = "torch"

    def __init__(self, accelerator, model: nn.Module, dataloader, loss_fn, settings: TrainSettings,
                 ema: Optional[EMA] = None, part_lrs: Optional[dict[str, float]] = None):
        self.acc, self.loss_fn, self.s, self.ema = accelerator, loss_fn, settings, ema
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.optimizer = make_optimizer(named, settings, part_lrs)
        self.scheduler = make_scheduler(self.optimizer, settings)
        if getattr(dataloader, "generator", None) is None:
            # a DataLoader draws its base seed from the global RNG each time an iterator starts; a
            # resumed run starts one more iterator, so give it its own generator to keep resume exact
            dataloader.generator = torch.Generator().manual_seed(settings.seed)
        # the scheduler is stepped by hand once per optimizer step (Accelerate would step it once per process)
        self.model, self.optimizer, self.dataloader = accelerator.prepare(model, self.optimizer, dataloader)
        if len(self.dataloader) == 0:
            raise ValueError("the dataset yields no batch (fewer examples than the batch size?)")
        self.num_processes = accelerator.num_processes
        self.model.train()

    def steps(self, epoch: int, batch_in_epoch: int, step: int):
        acc, model = self.acc, self.model
        dl = acc.skip_first_batches(self.dataloader, batch_in_epoch) if batch_in_epoch else self.dataloader
        if hasattr(dl, "set_epoch"):
            dl.set_epoch(epoch)  # Accelerate passes it on to an EpochSampler
        micro, n = None, 0
        for batch in dl:
            with acc.accumulate(model):
                with acc.autocast():
                    loss = self.loss_fn(model, batch)
                value = loss.detach().float().reshape(())
                micro, n = (value if micro is None else micro + value), n + 1
                acc.backward(loss)
                if acc.sync_gradients and self.s.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, self.s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            batch_in_epoch += 1
            if not acc.sync_gradients:
                continue
            self.scheduler.step()
            step += 1
            if self.ema is not None:
                self.ema.update(step)
            yield micro / n, batch_in_epoch
            micro, n = None, 0

    def read_loss(self, total) -> float:
        return self.acc.gather(total.reshape(1)).mean().item()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return self.acc.reduce(t, "max").item() > 0

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def save(self, folder: Path) -> None:
        save_payload(self.acc, folder, self.model, self.optimizer, self.scheduler)
        if self.ema is not None and self.acc.is_main_process:
            self.ema.save(folder)

    def load(self, path: Path, state: dict) -> None:
        load_payload(self.acc, path, self.model, self.optimizer, self.scheduler)
        if self.ema is not None:
            self.ema.load(path)


# ------------------------------------------------------------------ the loop
def train(*, accelerator, run: RunDir, model: nn.Module, dataloader, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          settings: TrainSettings, resume: Optional[str] = None,
          export_fn: Optional[Callable[[Path, int], None]] = None,
          sample_fn: Optional[Callable[[int], None]] = None, status_fields: Optional[dict] = None,
          finish_fn: Optional[Callable[[int], dict]] = None, ema: Optional[EMA] = None,
          val_fn: Optional[Callable[[int], float]] = None, part_lrs: Optional[dict[str, float]] = None) -> dict:
    """Train the trainable parameters of `model` for settings.max_steps optimizer steps.

    export_fn(folder, step): writes the deliverable adapter file(s) into `folder` (main process only;
        called for every checkpoint and for the run folder at the end).
    sample_fn(step): validation (images, generations) every settings.sample_every steps and at the end.
        Runs on the main process; it must not change the global RNG state (use its own generator).
    finish_fn(step) -> dict: after the final export, main process (evaluation); its fields join "done".
    ema: the EMA of the trainable parameters (make_ema); made here from settings.ema_decay when not given.
        Updated after each optimizer step and kept in checkpoints; export_fn may write it (ema.swapped()).
    val_fn(step) -> float: validation loss every settings.val_every steps and at the end (all processes);
        logged as val_loss, the best one marked in status.json (best_val_step, best_val_loss).
    part_lrs: {name part: learning rate} of parameters that learn at their own rate (see param_groups).
    Use an EpochSampler in the DataLoader for a shuffled order that resumes exactly.
    Returns the final status dict. Raises NonFiniteLoss on a NaN/inf loss (after marking the run failed).
    """
    if ema is None:
        ema = make_ema(model, settings)
    engine = TorchEngine(accelerator, model, dataloader, loss_fn, settings, ema=ema, part_lrs=part_lrs)
    loop = TrainLoop(run, settings, engine, main=accelerator.is_main_process, export_fn=export_fn,
                     sample_fn=sample_fn, status_fields=status_fields, finish_fn=finish_fn, val_fn=val_fn)
    trackers = open_trackers(settings.log_with, run) if accelerator.is_main_process else []
    sinks = [lambda rec: log_to_trackers(trackers, rec)] if trackers else []
    run.metric_sinks += sinks
    try:
        return loop.run_loop(resume)
    finally:
        for sink in sinks:
            run.metric_sinks.remove(sink)
        for t in trackers:
            t.finish()


# ------------------------------------------------------------------ train.log_with: Accelerate's trackers
TRACKER_PACKAGES = {"tensorboard": "tensorboard (or the [tensorboard] extra)", "wandb": "wandb, then `wandb login`"}


def open_trackers(name: str, run: RunDir) -> list:
    """The Accelerate tracker train.log_with names, started ([] when empty): TensorBoard writes RUN/tensorboard,
    W&B a run named after the run folder in the project "lora-workbench"."""
    if not name:
        return []
    from accelerate import tracking   # lazy: it looks for the tracker packages when imported
    available = {"tensorboard": tracking.is_tensorboard_available, "wandb": tracking.is_wandb_available}[name]
    if not available():
        raise MissingPackageError(f"train.log_with = {name!r} needs {name}, which is not installed: pip install "
                                  f"{TRACKER_PACKAGES[name]}; or leave train.log_with empty")
    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker("tensorboard", run.path)
    else:
        tracker = tracking.WandBTracker("lora-workbench", name=run.path.name, dir=str(run.path))
    tracker.start()
    return [tracker]


def log_to_trackers(trackers: list, record: dict) -> None:
    """A metrics line's numbers (loss, lr, step_time, val_loss, eval metrics) as train/<key> at its step."""
    values = {f"train/{k}": v for k, v in record.items()
              if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    for t in trackers:
        t.log(values, step=record.get("step"))
