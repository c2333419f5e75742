"""The torch half of the preflight checks (`lora-sd check`, `lora-llm check`): what this device can run
(precision, optimizer packages), the loaded config with its device, and `SavedBytes`, the activation memory
autograd keeps for backward. The report, its text and the memory arithmetic stay torch-free in
lora_core.preflight (the CLIs build their `check` parser from it without importing torch)."""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .lowmem import QUANTIZED, quantizable_layers
from .offload import choose_blocks, model_blocks
from .preflight import PreflightReport

OPTIONAL_OPTIMIZERS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}   # optimizer -> the package it needs


def device_conflicts(mixed_precision: str, optimizer: str, device: str, rep: PreflightReport) -> None:
    """Precision and optimizer settings the device cannot run."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        rep.error(f"device {device!r}: CUDA is not available here; use --device cpu", "device")
    if mixed_precision == "fp16" and dev.type == "cpu":
        rep.error("train.mixed_precision = \"fp16\" needs a GPU (fp16 autocast and gradient scaling are not "
                  "available on CPU); use \"bf16\" or \"no\" on CPU", "train.mixed_precision")
    if mixed_precision == "bf16" and dev.type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        rep.error("train.mixed_precision = \"bf16\": this GPU has no bf16; use \"fp16\"", "train.mixed_precision")
    package = OPTIONAL_OPTIMIZERS.get(optimizer)
    if package and importlib.util.find_spec(package) is None:
        rep.error(f"train.optimizer = \"{optimizer}\" needs {package} (pip install {package}); or use \"adamw\"",
                  "train.optimizer")


def begin(job: str, config, overrides, cfg, load: Callable, device: str) -> tuple[PreflightReport, Any, str]:
    """(the report, the loaded config or None when it does not load, the device: default cuda when present)."""
    rep = PreflightReport(job, str(config or "config"))
    try:
        cfg = cfg or load(config, overrides)
    except ConfigError as e:
        rep.error(str(e), getattr(e, "key", "") or "")
        return rep, None, device
    return rep, cfg, device or ("cuda" if torch.cuda.is_available() else "cpu")


def common_conflicts(cfg, device: str, rep: PreflightReport) -> None:
    """The `[train]` settings every trainer shares."""
    s = cfg.train
    device_conflicts(s.mixed_precision, s.optimizer, device, rep)
    if s.lr_warmup_steps >= s.max_steps:
        rep.warn(f"train.lr_warmup_steps ({s.lr_warmup_steps}) >= train.max_steps ({s.max_steps}): the learning "
                 "rate never reaches its peak", "train.lr_warmup_steps")


class SavedBytes:
    """Context manager counting the bytes of the tensors autograd saves for backward (each storage once),
    and the largest one: the activation memory of a training forward pass. The model's own weights, which
    autograd saves too, are left out with `exclude` (its modules: counted as weights already). Works on the
    meta device too (real-size models without weights: storages are told apart by identity there)."""

    def __init__(self, *exclude, seen: Optional[set] = None):
        self.total, self.largest = 0, 0
        self._kept: list = []
        self._seen = seen if seen is not None else set()
        self._seen.update(storage_key(p) for m in exclude for p in m.parameters())

    def count(self, t) -> int:
        """Count tensor `t` unless its storage was counted already; returns the bytes added."""
        try:
            key, size = storage_key(t), t.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - a tensor without storage (e.g. sparse): count its elements
            key, size = id(t), t.numel() * t.element_size()
        if key in self._seen:
            return 0
        self._seen.add(key)
        self._kept.append(t)   # alive while measuring: a freed tensor's address, reused, would look counted
        self.total += size
        self.largest = max(self.largest, size)
        return size

    def _pack(self, t):
        self.count(t)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def storage_key(t: torch.Tensor):
    """What tells t's storage apart: its address, or on the meta device (address 0) the storage itself."""
    st = t.untyped_storage()
    return st.data_ptr() or ("storage", st._cdata)


class CheckpointedBytes:
    """A diffusers `gradient_checkpointing_func` that measures what gradient checkpointing keeps: each
    checkpointed segment runs plainly under its own SavedBytes; what stays alive is the segments' inputs (kept
    for the recomputation) and, during the backward pass, the saved tensors of one segment recomputed at a time
    (the largest counts). Use it inside an outer SavedBytes (`outer`): the rest of the model's saved tensors."""

    def __init__(self, outer: SavedBytes, *exclude):
        self.outer, self.exclude = outer, exclude
        self.inputs, self.segment, self.largest = 0, 0, 0

    def __call__(self, fn, *args):
        self.inputs += sum(self.outer.count(a) for a in args if isinstance(a, torch.Tensor))
        with SavedBytes(*self.exclude) as seg:
            out = fn(*args)
        self.segment, self.largest = max(self.segment, seg.total), max(self.largest, seg.largest)
        return out

    @property
    def total(self) -> int:
        return self.inputs + self.segment


# bytes per weight of each storage of lora_core.lowmem / model.weight_dtype
STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8_e4m3": 1, "int8": 1}


def stored_frozen_bytes(model: nn.Module, storage: str, other_bytes: int) -> int:
    """Bytes of `model`'s frozen weights and buffers stored as `storage` (a STORAGE_BYTES name), without storing
    them (a model on the meta device will do): fp8_e4m3 / int8 quantize the layers lora_core.lowmem quantizes
    (quantizable_layers), 1 byte a weight with a 4-byte scale per output channel,
    their biases as they are; everything else takes `other_bytes` per element (the compute dtype's)."""
    quantized = {id(m) for _, m in quantizable_layers(model, storage)} if storage in QUANTIZED else set()
    per = STORAGE_BYTES[storage] if storage in ("fp32", "bf16", "fp16") else other_bytes
    total = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad:
                continue
            if id(m) in quantized and p is m.weight:
                total += p.numel() + 4 * p.shape[0]
            elif id(m) in quantized:   # the bias: kept as it was (lowmem's QuantizedLayer copies it)
                total += p.numel() * p.element_size()
            else:
                total += p.numel() * per
        total += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False) if b is not None)
    return total


def offloaded_frozen_bytes(model: nn.Module, storage: str, other_bytes: int, n_offload: int = 0,
                           order: Optional[list] = None) -> int:
    """stored_frozen_bytes of `model` on the device with its `n_offload` largest blocks offloaded
    (lora_core.offload): those leave, and two of them are there at once, a block and the one prefetched beside it
    in the order they run (`order`: the offloaded blocks' names so, as block_order records them; without it, the
    two largest)."""
    total = stored_frozen_bytes(model, storage, other_bytes)
    if not n_offload:
        return total
    sizes = {name: stored_frozen_bytes(b, storage, other_bytes) for name, b in choose_blocks(model, n_offload)}
    run = [n for n in (order or []) if n in sizes]
    if len(run) == len(sizes) > 1:
        resident = max(sizes[a] + sizes[b] for a, b in zip(run, run[1:]))
    else:
        resident = sum(sorted(sizes.values())[-2:])
    return total - sum(sizes.values()) + resident


@contextlib.contextmanager
def block_order(model: nn.Module):
    """Within: the list yielded gets the names of `model`'s blocks (lora_core.offload.model_blocks) in the order
    they first run, as the block offloader learns it."""
    order: list = []

    def hook(name):
        return lambda module, args: None if name in order else order.append(name)
    hooks = [b.register_forward_pre_hook(hook(n)) for n, b in model_blocks(model)]
    try:
        yield order
    finally:
        for h in hooks:
            h.remove()


def saved_activations(model: nn.Module, run: Callable[[], torch.Tensor], checkpointing: bool) -> tuple[int, int]:
    """(bytes kept for the backward pass by one training forward `run()` of a diffusers `model`, the largest
    saved tensor), with its gradient checkpointing on (CheckpointedBytes) or off."""
    was = getattr(model, "is_gradient_checkpointing", False)
    with SavedBytes(model) as sb:
        ck = CheckpointedBytes(sb, model) if checkpointing else None
        if ck is not None:
            model.enable_gradient_checkpointing(ck)
        try:
            run()
        finally:
            if ck is not None:
                model.disable_gradient_checkpointing()
                if was:
                    model.enable_gradient_checkpointing()
    return sb.total + (ck.total if ck else 0), max(sb.largest, ck.largest if ck else 0)


class _FlashAttentionShapes(torch.autograd.Function):
    """Shapes-only scaled dot-product attention that saves for backward what flash attention saves on CUDA (q, k,
    v, the output and a float32 log-sum-exp per query): on the meta device torch falls back to the math kernel,
    which would keep the full attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flash_attention_shapes():
    """Within: torch.nn.functional.scaled_dot_product_attention is _FlashAttentionShapes (meta-device models)."""
    original = F.scaled_dot_product_attention
    def sdpa(*args, **kw):   # q, k, v by position (diffusers' processors) or by name (its attention dispatch)
        q, k, v = (list(args) + [kw.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
        return _FlashAttentionShapes.apply(q, k, v)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _SavesNothing(torch.autograd.Function):
    """A frozen layer run as lora_core.lowmem.QuantizedOp runs a quantized one: its output, with nothing saved for
    the backward pass (the quantized layer dequantizes its stored weight again there; the input is not needed).
    For measuring what a forward pass saves only: it has no backward."""

    @staticmethod
    def forward(ctx, x, run):
        return run(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a stand-in for measuring saved activations: it has no backward pass")


@contextlib.contextmanager
def saved_as_stored(model: nn.Module, storage: str):
    """Within: the layers of `model` that weight storage `storage` quantizes (lora_core.lowmem.quantizable_layers)
    save for backward what the quantized layers save, nothing, while keeping their weights as they are (a model
    on the meta device will do). Other storages change nothing."""
    layers = [m for _, m in quantizable_layers(model, storage)] if storage in QUANTIZED else []
    for m in layers:
        m.forward = _saving_nothing(m.forward)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _saving_nothing(run: Callable) -> Callable:
    def forward(x):
        return _SavesNothing.apply(x, run) if torch.is_grad_enabled() and x.requires_grad else run(x)
    return forward
