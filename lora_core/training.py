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

from .io import atomic_save_safetensors
from .run import (STATES, NonFiniteLoss, RunDir, StopFlag, TrainSettings, log,  # noqa: F401 (re-exported)
                  resolve_resume, setup_logging)

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
