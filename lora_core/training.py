"""The training run shared by every trainer: run folder, loop, checkpoints, exact resume.

Knows nothing of the model: a trainer hands it a module whose trainable parameters are the
adapter, a DataLoader, and `loss_fn(model, batch) -> scalar loss`. Everything else (optimizer,
LR schedule, accumulation, mixed precision through Accelerate, NaN guard, SIGTERM stop,
metrics.jsonl, status.json, checkpoints with full state) lives here once.

Run folder (the contract with the GUI):
    config.toml   the resolved job config        status.json   state, pid, step, eta, error
    metrics.jsonl one line per optimizer step    train.log     the log
    samples/      validation outputs             checkpoints/step_XXXXXXXX/  full training state
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .io import atomic_save_safetensors, atomic_write_json

log = logging.getLogger("lora")
STATES = ("queued", "running", "stopping", "stopped", "failed", "done")


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


class NonFiniteLoss(RuntimeError):
    pass


# ------------------------------------------------------------------ run folder
class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.status_file = self.path / "status.json"
        self.metrics = self.path / "metrics.jsonl"
        self.log_file = self.path / "train.log"
        self.samples = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"

    def create(self) -> "RunDir":
        for d in (self.path, self.samples, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_status(self, state: str, **fields) -> dict:
        assert state in STATES, state
        status = {**self.read_status(), **fields, "state": state, "updated": time.time()}
        atomic_write_json(self.status_file, status)
        return status

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        out = []
        try:
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written right now
        except FileNotFoundError:
            pass
        return out

    def checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                      and (p / "trainer_state.json").is_file())

    def latest_checkpoint(self) -> Optional[Path]:
        c = self.checkpoints()
        return c[-1] if c else None


def setup_logging(run: Optional[RunDir], main_process: bool = True) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run is not None and main_process:
        handlers.append(logging.FileHandler(run.log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def resolve_resume(run: RunDir, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        return run.latest_checkpoint()  # None: nothing to resume, start fresh
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return p


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
def make_optimizer(params: list[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    if s.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("train.optimizer = 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def make_scheduler(optimizer, s: TrainSettings):
    from transformers import get_scheduler
    return get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps,
                         num_training_steps=s.max_steps)


# ------------------------------------------------------------------ checkpoints
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, run: RunDir, model: nn.Module, optimizer, scheduler, state: dict,
                    keep: int, export_fn: Optional[Callable[[Path], None]] = None) -> Path:
    """Write checkpoints/step_N atomically (a temp folder renamed into place), keep the last `keep`."""
    final = run.checkpoints_dir / f"step_{state['step']:08d}"
    tmp = run.checkpoints_dir / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    meta, tensors = _rng_state()
    rank = accelerator.process_index
    (tmp / f"rng_rank{rank}.json").write_text(json.dumps(meta))
    atomic_save_safetensors(tmp / f"rng_rank{rank}.safetensors", tensors)
    if accelerator.is_main_process:
        atomic_save_safetensors(tmp / "trainable.safetensors", trainable_state(accelerator.unwrap_model(model)))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        if export_fn is not None:
            export_fn(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in run.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("num_processes", 1) != accelerator.num_processes:
        log.warning("checkpoint was written by %s processes, resuming with %s: the data order will differ",
                    state.get("num_processes"), accelerator.num_processes)
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
    return state


# ------------------------------------------------------------------ the loop
class StopFlag:
    """Context manager: SIGTERM/SIGINT set `.stop` (a second signal interrupts at once)."""
    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        log.warning("signal %s received: stopping after this step and saving a checkpoint", signum)
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def train(*, accelerator, run: RunDir, model: nn.Module, dataloader, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
          settings: TrainSettings, resume: Optional[str] = None,
          export_fn: Optional[Callable[[Path], None]] = None,
          sample_fn: Optional[Callable[[int], None]] = None) -> dict:
    """Train the trainable parameters of `model` for settings.max_steps optimizer steps.

    export_fn(folder): writes the deliverable adapter file(s) into `folder` (main process only;
        called for every checkpoint and for the run folder at the end).
    sample_fn(step): validation (images, generations) every settings.sample_every steps and at the end.
        Runs on the main process; it must not change the global RNG state (use its own generator).
    Use an EpochSampler in the DataLoader for a shuffled order that resumes exactly.
    Returns the final status dict. Raises NonFiniteLoss on a NaN/inf loss (after marking the run failed).
    """
    s = settings
    main = accelerator.is_main_process
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, s)
    scheduler = make_scheduler(optimizer, s)
    if getattr(dataloader, "generator", None) is None:
        # a DataLoader draws its base seed from the global RNG each time an iterator starts; a
        # resumed run starts one more iterator, so give it its own generator to keep resume exact
        dataloader.generator = torch.Generator().manual_seed(s.seed)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    # the scheduler is stepped by hand once per optimizer step (Accelerate would step it once per process)

    step, epoch, batch_in_epoch = 0, 0, 0
    ckpt = resolve_resume(run, resume)
    if ckpt is not None:
        st = load_checkpoint(accelerator, ckpt, model, optimizer, scheduler)
        step, epoch, batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch_in_epoch)
    n_batches = len(dataloader)
    if n_batches == 0:
        raise ValueError("the dataset yields no batch (fewer examples than the batch size?)")
    if batch_in_epoch >= n_batches:
        epoch, batch_in_epoch = epoch + 1, 0

    started = time.time()
    if main:
        run.write_status("running", pid=os.getpid(), host=socket.gethostname(), step=step, max_steps=s.max_steps,
                         started=started, error=None, num_processes=accelerator.num_processes,
                         resumed_from=str(ckpt) if ckpt else None)
    from tqdm.auto import tqdm
    bar = tqdm(total=s.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": s.seed}
    last_ckpt = str(ckpt) if ckpt else None
    window: list[float] = []
    t_step = time.time()
    steps_this_session = 0
    model.train()

    def checkpoint():
        nonlocal last_ckpt
        last_ckpt = str(save_checkpoint(accelerator, run, model, optimizer, scheduler, dict(state),
                                        s.keep_checkpoints, export_fn))
        if main:
            run.write_status("running", last_checkpoint=last_ckpt)

    with StopFlag() as flag:
        while step < s.max_steps:
            dl = accelerator.skip_first_batches(dataloader, batch_in_epoch) if batch_in_epoch else dataloader
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(epoch)  # Accelerate passes it on to an EpochSampler
            for batch in dl:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = loss_fn(model, batch)
                    loss_all = accelerator.gather(loss.detach().float().reshape(1))
                    if not torch.isfinite(loss_all).all():
                        msg = (f"non-finite loss ({loss_all.tolist()}) at step {step + 1}; training stopped. "
                               f"Last good checkpoint: {last_ckpt or 'none'}")
                        if main:
                            run.write_status("failed", error=msg, step=step, last_checkpoint=last_ckpt)
                        bar.close()
                        raise NonFiniteLoss(msg)
                    window.append(loss_all.mean().item())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and s.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                steps_this_session += 1
                scheduler.step()
                state.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch)
                now = time.time()
                rec = {"step": step, "epoch": epoch, "loss": sum(window) / len(window),
                       "lr": scheduler.get_last_lr()[0], "step_time": now - t_step, "time": now}
                window.clear()
                t_step = now
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                if main and (step % max(s.log_every, 1) == 0 or step == s.max_steps):
                    run.append_metrics(rec)
                    eta = (now - started) / steps_this_session * (s.max_steps - step)
                    run.write_status("running", step=step, eta_s=eta, loss=rec["loss"])
                stop_t = torch.tensor([1.0 if flag.stop else 0.0], device=accelerator.device)
                stop = accelerator.reduce(stop_t, "max").item() > 0
                if sample_fn is not None and s.sample_every and step % s.sample_every == 0 and step < s.max_steps:
                    if main:
                        sample_fn(step)
                    accelerator.wait_for_everyone()
                if (s.checkpoint_every and step % s.checkpoint_every == 0) or stop or step == s.max_steps:
                    checkpoint()
                if stop:
                    bar.close()
                    if main:
                        run.write_status("stopped", step=step, last_checkpoint=last_ckpt)
                    return run.read_status()
                if step >= s.max_steps:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
                state.update(epoch=epoch, batch_in_epoch=0)
                continue
            break
    bar.close()
    if sample_fn is not None and main:
        sample_fn(step)
    accelerator.wait_for_everyone()
    if main:
        if export_fn is not None:
            export_fn(run.path)
        run.write_status("done", step=step, finished=time.time(), last_checkpoint=last_ckpt)
    accelerator.wait_for_everyone()
    return run.read_status()
