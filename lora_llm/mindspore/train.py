"""GPT-2 LoRA training on MindSpore: a step engine of the run protocol (lora_core.run.TrainLoop).

What is the same as the PyTorch trainer (lora_core.training.train): the config file, the data and its
order (lora_llm.data + lora_core.training.EpochSampler), AdamW with torch's formula
(mindspore.experimental.optim.AdamW), the learning-rate schedule (transformers' get_scheduler, evaluated
step by step on a dummy PyTorch optimizer), gradient clipping with torch's clip_grad_norm_ formula,
gradient accumulation (mean of the micro-batch gradients), and everything of the run protocol: the
NaN guard, SIGTERM => checkpoint + "stopped", metrics.jsonl / status.json / train.log /
checkpoints/step_N, and `adapter.safetensors` in the backend-neutral lora_core format.

Differences: mixed precision is not offered (fp32 only); a resumed run restores parameters, optimizer
state, step and data position, but not MindSpore's dropout RNG stream (re-seeded from seed + step).
Every batch is padded to one width (data.block_size, or the longest training example) so that graph
mode compiles the step once.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import mindspore as ms
import numpy as np
import torch
from mindspore import nn, ops
from mindspore.communication import get_group_size, get_rank, init
from mindspore.experimental.optim import AdamW
from safetensors.numpy import load_file, save_file

import lora_core.mindspore as lcm
from lora_core.errors import NonFiniteLoss
from lora_core.files import atomic_write_json
from lora_core.run import RunDir, TrainLoop, run_job
from lora_core.settings import TrainSettings
from lora_core.training import EpochSampler, make_scheduler
from lora_llm import data as D
from lora_llm.adapter_formats import ADAPTER_FILE, LLM_INFO, PEFT_DIR
from lora_llm.adapter_io import adapter_info, export_peft, load_trained, peft_task_type
from lora_llm.evaluate import evaluate_job
from lora_llm.models import TINY, load_model, load_tokenizer, resolve_lora, resolve_pretrained

from ..resume_rules import LLM_RESUME
from .gpt2 import GPT2Config, build_gpt2, load_gpt2, load_hf_state_dict

log = logging.getLogger("lora.llm.mindspore")


# ------------------------------------------------------------------ context
def set_device(device_target: str = "CPU", device_id: int = 0) -> None:
    """PyNative execution on `device_target` (mode "graph" compiles the train step with mindspore.jit).
    MindSpore fixes the device when its runtime starts; asking again for that device is a no-op."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.set_device(device_target, device_id)
    except (RuntimeError, ValueError) as e:
        if ms.get_context("device_target") != device_target:
            raise RuntimeError(f"mindspore.device_target = {device_target!r} cannot be used here: {e}") from e


def lr_schedule(settings: TrainSettings) -> Callable[[int], float]:
    """lr(step) for step = 0..max_steps, exactly as the PyTorch trainer's scheduler."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.learning_rate)
    sched = make_scheduler(opt, settings)
    lrs = []
    for _ in range(settings.max_steps + 1):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lambda step: lrs[min(step, len(lrs) - 1)]


# ------------------------------------------------------------------ the step
class LoraTrainer:
    """The optimisation of `net.trainable_params()` for `net.loss(ids, mask, labels)`.

    grads(ids, mask, labels) -> (loss, grads); apply(grads, lr) clips (torch's clip_grad_norm_
    formula) and takes one AdamW step. Both are compiled with mindspore.jit when graph=True. Only the
    trainable parameters are differentiated: in graph mode gradients of frozen parameters passed
    explicitly are real, not zero, and would cost time (and be applied by a careless optimizer)."""

    def __init__(self, net: nn.Cell, settings: TrainSettings, graph: bool = True, reducer: Optional[nn.Cell] = None,
                 all_workers: Callable[[bool], bool] = bool):
        """reducer averages gradients over data-parallel workers; all_workers(flag) is True when the flag
        is True on every worker (so that all of them stop together on a NaN loss)."""
        if settings.optimizer != "adamw":
            raise ValueError(f"train.optimizer = {settings.optimizer!r}: the MindSpore backend offers adamw only")
        for name in ("loraplus_lr_ratio", "head_learning_rate", "ema_decay"):   # torch-engine features (lora_core.training)
            if getattr(settings, name, 0):
                raise ValueError(f"train.{name}: the MindSpore backend does not offer it; set 0 or use backend = torch")
        if settings.mixed_precision != "no":
            raise ValueError(f"train.mixed_precision = {settings.mixed_precision!r}: the MindSpore backend trains fp32 only")
        self.net = net
        self.params = lcm.lora_parameters(net)
        if not self.params:
            raise ValueError("nothing to train: the network has no trainable parameters")
        self.optimizer = AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.max_norm = float(settings.max_grad_norm)
        self.reducer, self.all_workers = reducer, all_workers
        grad_fn = ms.value_and_grad(net.loss, None, self.optimizer.parameters)

        def grads(ids, mask, labels):
            return grad_fn(ids, mask, labels)

        def apply(gs):
            if self.reducer is not None:
                gs = self.reducer(gs)
            norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in gs))
            if self.max_norm > 0:
                coef = ops.clamp(self.max_norm / (norm + 1e-6), max=1.0)
                gs = tuple(g * coef for g in gs)
            self.optimizer(gs)
            return norm

        self.grads = ms.jit(grads) if graph else grads
        self._apply = ms.jit(apply) if graph else apply

    def apply(self, grads, lr: float):
        ops.assign(self.optimizer.lrs[0], ms.Tensor(lr, ms.float32))  # set_data would not reach a compiled graph
        return self._apply(ms.mutable(tuple(grads)))  # a variable, not a constant: one compile

    def step(self, batches: Sequence[tuple], lr: float) -> float:
        """One optimizer step over micro-batches (ids, mask, labels); returns their mean loss."""
        losses, total = [], None
        for ids, mask, labels in batches:
            loss, gs = self.grads(ids, mask, labels)
            losses.append(float(loss.asnumpy()))
            total = gs if total is None else tuple(a + b for a, b in zip(total, gs))
        if not self.all_workers(all(math.isfinite(x) for x in losses)):
            raise NonFiniteLoss(f"non-finite loss {losses}")
        if len(batches) > 1:
            total = tuple(g / len(batches) for g in total)
        self.apply(total, lr)
        return sum(losses) / len(losses)

    # -------------------------------------------------------------- state
    def optimizer_state(self) -> dict[str, np.ndarray]:
        own = {id(p) for p in self.params}
        return {p.name: p.asnumpy() for p in self.optimizer.get_parameters() if id(p) not in own}

    def load_optimizer_state(self, state: dict[str, np.ndarray], where: str) -> None:
        own = {id(p) for p in self.params}
        mine = {p.name: p for p in self.optimizer.get_parameters() if id(p) not in own}
        if set(mine) != set(state):
            raise ValueError(f"{where}: optimizer state does not match (missing {sorted(set(mine) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(mine))[:5]})")
        for k, p in mine.items():
            ops.assign(p, ms.Tensor(state[k], p.dtype))


# ------------------------------------------------------------------ data
def fixed_batch(seqs: Sequence[Sequence[int]], labels, width: int, pad_id: int, lm: bool) -> tuple:
    """(ids, mask, labels) MindSpore tensors, right-padded to `width` (one shape: one graph compile).
    LM labels are the ids with -100 on padding (the loss shifts them)."""
    ids, mask = D.pad_batch(seqs, pad_id)
    if ids.shape[1] < width:
        extra = width - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (0, extra)))
    lab = np.where(mask > 0, ids, -100) if lm else np.asarray(labels, dtype=np.int64)
    return ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32), ms.Tensor(lab, ms.int32)


def build_data(cfg, tokenizer) -> tuple[list[list[int]], list[int], int]:
    """(sequences, labels, padded width) of the training split: the PyTorch trainer's items."""
    items = D.train_items(cfg, tokenizer)
    seqs = [it["input_ids"] for it in items]
    return seqs, [it.get("label", 0) for it in items], max(len(x) for x in seqs)


# ------------------------------------------------------------------ model
def build_base(model_section, num_labels: int, pad_id: int) -> nn.Cell:
    """The MindSpore GPT-2 of a [model] section: "tiny" is the very model the PyTorch trainer builds
    (same seed), converted; a folder, file or hub id is read from its safetensors weights."""
    if model_section.dtype != "float32":
        raise ValueError(f"model.dtype = {model_section.dtype!r}: the MindSpore backend runs float32 only")
    if model_section.gguf_file:
        raise ValueError("model.gguf_file: the MindSpore backend loads GPT-2 safetensors weights, not GGUF")
    if model_section.pretrained == TINY:
        tm = load_model(model_section, num_labels, pad_id)
        net = build_gpt2(GPT2Config.from_dict(tm.config.to_dict()), num_labels)
        load_hf_state_dict(net, {k: v.float().numpy() for k, v in tm.state_dict().items()}, "tiny model")
        return net
    return load_gpt2(resolve_pretrained(model_section)[0], num_labels)


def build_model(cfg, num_labels: int, pad_id: int) -> nn.Cell:
    """build_base + LoRA, targets resolved by lora_llm.models.resolve_lora (q_proj/v_proj -> c_attn slices)."""
    net = build_base(cfg.model, num_labels, pad_id)
    lcm.add_lora(net, resolve_lora(cfg.lora, net, classification=bool(num_labels)))
    return net


# ------------------------------------------------------------------ the step engine
class MindSporeEngine:
    """The MindSpore step engine of lora_core.run.TrainLoop: whole optimizer steps over the epoch order of
    an EpochSampler (every worker takes its own batches of each step); the checkpoint payload is
    trainable.safetensors + optimizer.safetensors (main process)."""
    backend = "mindspore"

    def __init__(self, trainer: LoraTrainer, settings: TrainSettings, seqs, labels, width: int, pad_id: int,
                 lm: bool, dp=None):
        s = settings
        self.trainer, self.s, self.dp = trainer, s, dp
        self.seqs, self.labels, self.width, self.pad_id, self.lm = seqs, labels, width, pad_id, lm
        self.rank, self.num_processes = (dp.rank, dp.size) if dp else (0, 1)
        self.per_step = s.gradient_accumulation_steps * self.num_processes  # batches per optimizer step
        self.n_batches = len(seqs) // s.batch_size
        if self.n_batches < self.per_step:
            raise ValueError(f"the dataset yields {self.n_batches} batches of {s.batch_size}: fewer than one optimizer "
                             f"step ({s.gradient_accumulation_steps} x {self.num_processes} workers)")
        self.sampler = EpochSampler(len(seqs), s.seed)
        self.lr_at = lr_schedule(s)
        self.step = 0
        trainer.net.set_train(True)

    def steps(self, epoch: int, batch_in_epoch: int, step: int):
        s = self.s
        self.sampler.set_epoch(epoch)
        order = list(iter(self.sampler))
        while batch_in_epoch + self.per_step <= self.n_batches:
            micro = []
            for a in range(s.gradient_accumulation_steps):
                b = batch_in_epoch + a * self.num_processes + self.rank
                idx = order[b * s.batch_size:(b + 1) * s.batch_size]
                micro.append(fixed_batch([self.seqs[i] for i in idx], [self.labels[i] for i in idx], self.width,
                                         self.pad_id, self.lm))
            loss = self.trainer.step(micro, self.lr_at(step))
            batch_in_epoch += self.per_step
            step = self.step = step + 1
            yield loss, batch_in_epoch

    def read_loss(self, total: float) -> float:
        return self.dp.mean(total) if self.dp else float(total)

    def any(self, flag: bool) -> bool:
        return self.dp.any(flag) if self.dp else flag

    def lr(self) -> float:
        return self.lr_at(self.step)

    def barrier(self) -> None:
        pass   # only the main process writes files

    def save(self, folder: Path) -> None:
        if self.rank == 0:
            save_file({p.name: p.asnumpy() for p in self.trainer.params}, str(folder / "trainable.safetensors"))
            save_file(self.trainer.optimizer_state(), str(folder / "optimizer.safetensors"))

    def load(self, path: Path, state: dict) -> None:
        trainer = self.trainer
        saved = load_file(str(path / "trainable.safetensors"))
        own = {p.name: p for p in trainer.params}
        if set(saved) != set(own):
            raise ValueError(f"{path}: checkpoint parameters do not match the model (missing "
                             f"{sorted(set(own) - set(saved))[:5]}, unexpected {sorted(set(saved) - set(own))[:5]})")
        for k, p in own.items():
            if tuple(saved[k].shape) != tuple(p.shape):
                raise ValueError(f"{path}: {k} has shape {saved[k].shape}, model has {tuple(p.shape)}")
            ops.assign(p, ms.Tensor(saved[k], p.dtype))
        trainer.load_optimizer_state(load_file(str(path / "optimizer.safetensors")), str(path))
        self.step = state["step"]
        ms.set_seed(self.s.seed + state["step"])


# ------------------------------------------------------------------ the run
def train_from_config(cfg, run_dir, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train cfg (lora_llm.config.LLMTrainConfig, backend "mindspore") into run_dir; returns the final
    status. Writes the resolved config, status.json, metrics.jsonl, train.log, checkpoints/step_N and
    adapter.safetensors (lora_core format: loads into the PyTorch model with lora_core.load_lora).
    The folder rules are lora_core.run.run_job's; a device that cannot be used is refused before
    anything is written."""
    mcfg = cfg.mindspore
    set_device(mcfg.device_target, mcfg.device_id)   # before communication starts (msrun workers)
    dp = data_parallel()

    def body(run: RunDir, _) -> dict:
        return _train(cfg, run, resume, dp)

    return run_job("llm-train", run_dir or cfg.run_dir, body, config=cfg, resume=resume, overwrite=overwrite,
                   resume_rules=LLM_RESUME, main=dp is None or dp.rank == 0, data_files=lambda _: D.data_files(cfg))


def _train(cfg, run: RunDir, resume: Optional[str], dp) -> dict:
    s, mcfg = cfg.train, cfg.mindspore
    ms.set_seed(s.seed)
    tok = load_tokenizer(cfg.model)
    pad_id = int(tok.pad_token_id)
    num_labels = 0 if cfg.data.is_lm else D.num_labels(cfg.data.task)
    seqs, labels, width = build_data(cfg, tok)
    net = build_model(cfg, num_labels, pad_id)
    trainer = LoraTrainer(net, s, graph=mcfg.mode == "graph",
                          **({"reducer": dp.reducer(lcm.lora_parameters(net)), "all_workers": dp.all} if dp else {}))
    log.info("MindSpore %s, %s on %s, %d trainable parameters, %d examples, %s", ms.__version__, mcfg.mode,
             mcfg.device_target, sum(p.size for p in trainer.params), len(seqs),
             f"{dp.size} data-parallel workers" if dp else "1 process")
    engine = MindSporeEngine(trainer, s, seqs, labels, width, pad_id, cfg.data.is_lm, dp)

    def export(folder: Path, step: int) -> None:
        meta = {LLM_INFO: json.dumps(adapter_info(cfg, steps=step, backend="mindspore"))}
        lcm.save_lora(folder / ADAPTER_FILE, trainer.net, meta)

    finish = (lambda step: evaluate_with_torch(cfg, run, step)) if cfg.eval.enabled else None
    return TrainLoop(run, s, engine, main=dp is None or dp.rank == 0, export_fn=export,
                     finish_fn=finish).run_loop(resume)


def evaluate_with_torch(cfg, run: RunDir, step: int) -> dict:
    """Evaluation after a MindSpore run: the adapter file is backend-neutral, so it is loaded into the
    PyTorch model and scored by lora_llm's evaluator (eval.json, same numbers as a PyTorch run), and
    the PEFT folder is exported from there. Returns the status fields {"eval": ...}."""
    model, tok, info = load_trained(run.path, model_section=cfg.model)
    export_peft(run.path / PEFT_DIR, model, task_type=peft_task_type(info), base_model_name=cfg.model.pretrained)
    result = evaluate_job(cfg, model, tok, progress=False)
    result.update(steps=step, backend="mindspore")
    atomic_write_json(run.path / "eval.json", result)
    log.info("evaluation (PyTorch, on the MindSpore adapter): %s",
             {k: v for k, v in result.items() if k != "generations"})
    return {"eval": {k: v for k, v in result.items() if k != "generations"}}


# ------------------------------------------------------------------ data parallel (msrun)
class DataParallel:
    """Set up when the process was started by msrun (MS_WORKER_NUM > 1): communication initialised,
    gradients averaged over workers, loss and stop flag shared."""

    def __init__(self):
        init()
        self.rank, self.size = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        self._sum = ops.AllReduce()

    def reducer(self, params) -> nn.Cell:
        return nn.DistributedGradReducer(params, mean=True, degree=self.size)

    def mean(self, x: float) -> float:
        return float(self._sum(ms.Tensor([x], ms.float32)).asnumpy()[0]) / self.size

    def any(self, flag: bool) -> bool:
        return float(self._sum(ms.Tensor([1.0 if flag else 0.0], ms.float32)).asnumpy()[0]) > 0

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)


def data_parallel() -> Optional[DataParallel]:
    return DataParallel() if int(os.environ.get("MS_WORKER_NUM", "1")) > 1 else None
