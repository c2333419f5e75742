"""Block offloading (sd-scripts' --blocks_to_swap, musubi-tuner's block swap): N blocks of a model keep their
frozen weights on the host and come to the device only while they run, forward and backward.

Architecture-agnostic: the blocks are the items of the model's top-level nn.ModuleLists whose names end in
"blocks" (a UNet's down_blocks / up_blocks, a transformer's transformer_blocks / single_transformer_blocks)
and its top-level modules named "*_block" (a UNet's mid_block); the N with the most frozen bytes are offloaded.

The schedule: a block is loaded just before its forward runs (a forward pre-hook) and just before its backward
runs (an identity autograd function on its outputs, whose backward fires when their gradients are complete);
loading a block evicts every other offloaded block but the one being prefetched, so at most two offloaded blocks
are on the device at once. The next block (forward order; backward: the previous one) is prefetched: on CUDA a
copy on a side stream from pinned host memory, overlapping the compute of the current block. Only frozen
parameters and buffers move; the trainable ones (the adapter and its optimizer state) stay on the device. An
evicted tensor is an empty placeholder: a block used while evicted fails loudly, never silently.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger("lora")


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of `model`'s repeated blocks, in registration order (see the module docstring)."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            out += [(f"{name}.{i}", b) for i, b in enumerate(child)]
        elif name.endswith("_block") and child is not None:
            out.append((name, child))
    return out


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of a module's frozen parameters and buffers (what offloading moves)."""
    ts = [p for p in module.parameters() if not p.requires_grad] + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in ts)


def choose_blocks(model: nn.Module, n: int, key: str = "train.offload_blocks") -> list[tuple[str, nn.Module]]:
    """The `n` blocks of `model` with the most frozen bytes (a ConfigError line when it has fewer)."""
    blocks = model_blocks(model)
    if n > len(blocks):
        names = ", ".join(b for b, _ in blocks) or "none"
        raise ConfigError(f"{key} = {n}: the {type(model).__name__} has only {len(blocks)} blocks ({names}); "
                          f"use at most {len(blocks)}", key)
    ranked = sorted(range(len(blocks)), key=lambda i: -frozen_bytes(blocks[i][1]))[:n]
    return [blocks[i] for i in sorted(ranked)]


class _Tensors:
    """The frozen parameters and buffers of one block: their host copies and where each lives in the block."""

    def __init__(self, block: nn.Module, pin: bool):
        self.slots = []   # (owning module, "param" | "buffer", attribute name, host copy)
        for mod in block.modules():
            for name, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    self.slots.append((mod, "param", name, _host(p.data, pin)))
            for name, b in mod.named_buffers(recurse=False):
                if b is not None:
                    self.slots.append((mod, "buffer", name, _host(b, pin)))

    def put(self, tensors: list[torch.Tensor]) -> None:
        for (mod, kind, name, _), t in zip(self.slots, tensors):
            if kind == "param":
                getattr(mod, name).data = t
            else:
                mod._buffers[name] = t

    def placeholders(self, device) -> list[torch.Tensor]:
        return [torch.empty(0, dtype=h.dtype, device=device) for *_, h in self.slots]


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if pin else t


class _Reload(torch.autograd.Function):
    """Identity on a block's outputs; its backward (the block's backward is next) loads the block."""

    @staticmethod
    def forward(ctx, offloader, name, *tensors):
        ctx.offloader, ctx.name = offloader, name
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.offloader.need(ctx.name, backward=True)
        return (None, None, *grads)


class BlockOffloader:
    """Keeps `blocks` (name, module) on the host except while they run on `device` (see the module docstring).
    `events`, when given a list, records the schedule: ("load" | "evict", block name) as they happen, and
    ("forward" | "backward", block name, the offloaded blocks then resident) as each block starts to run."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], device, events: Optional[list] = None):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.blocks = dict(blocks)
        self.tensors = {n: _Tensors(b, pin=cuda) for n, b in blocks}
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.order: list[str] = []               # the forward order, learnt on the first pass
        self.resident: set[str] = set()
        self.pending: dict[str, tuple] = {}       # prefetched: name -> (tensors, CUDA event or None)
        self.events = events
        self.hooks = []
        for name, block in blocks:
            self.hooks.append(block.register_forward_pre_hook(self._pre_hook(name)))
            self.hooks.append(block.register_forward_hook(self._post_hook(name)))
            self.tensors[name].put(self.tensors[name].placeholders(self.device))

    def _record(self, what: str, name: str) -> None:
        if self.events is not None:
            self.events.append((what, name))

    def _pre_hook(self, name: str):
        def hook(module, args):
            if name not in self.order:
                self.order.append(name)
            self.need(name)
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            flat: list = []
            _flatten(output, flat)
            # each distinct tensor once (a UNet block returns its last hidden state twice): the gradients of its
            # uses then add up in the order they would without the wrapper, and the results stay bit-identical
            grad = {id(t): t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad}
            if not grad or not torch.is_grad_enabled():
                return None
            wrapped = dict(zip(grad, _Reload.apply(self, name, *grad.values())))
            return _unflatten(output, iter([wrapped.get(id(t), t) for t in flat]))
        return hook

    def need(self, name: str, backward: bool = False) -> None:
        """Make block `name` resident (waiting for its prefetch), evict the others, prefetch the next."""
        if name not in self.resident:
            self._load(name)
        nxt = self._neighbour(name, -1 if backward else 1)
        for other in list(self.resident):
            if other not in (name, nxt):
                self.tensors[other].put(self.tensors[other].placeholders(self.device))
                self.resident.discard(other)
                self._record("evict", other)
        if nxt is not None and nxt not in self.resident and nxt not in self.pending:
            self._prefetch(nxt)
        if self.events is not None:   # what runs, and what is on the device while it runs
            self.events.append(("backward" if backward else "forward", name, tuple(sorted(self.resident))))

    def _neighbour(self, name: str, step: int) -> Optional[str]:
        if name not in self.order:
            return None
        i = self.order.index(name) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    def _prefetch(self, name: str) -> None:
        hosts = [h for *_, h in self.tensors[name].slots]
        if self.stream is None:   # its own copy on the CPU too (.to would alias the host copy): memory as on a GPU
            self.pending[name] = ([h.to(self.device, copy=True) for h in hosts], None)
            return
        with torch.cuda.stream(self.stream):
            copies = [h.to(self.device, non_blocking=True) for h in hosts]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[name] = (copies, event)

    def _load(self, name: str) -> None:
        if name not in self.pending:
            self._prefetch(name)
        copies, event = self.pending.pop(name)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in copies:   # the allocator must not reuse them for the next copy while compute reads them
                t.record_stream(current)
        self.tensors[name].put(copies)
        self.resident.add(name)
        self._record("load", name)

    def remove(self) -> None:
        """Put every block back on the device and drop the hooks."""
        for h in self.hooks:
            h.remove()
        for name in self.blocks:
            if name not in self.resident:
                self._load(name)


def _flatten(x, out: list) -> None:
    if isinstance(x, (tuple, list)):
        for v in x:
            _flatten(v, out)
    else:
        out.append(x)


def _unflatten(x, it):
    if isinstance(x, (tuple, list)):
        return type(x)(_unflatten(v, it) for v in x)
    return next(it)


def offload_blocks(model: nn.Module, n: int, device, events: Optional[list] = None) -> BlockOffloader:
    """Offload the `n` largest blocks of `model` (choose_blocks) to the host; they come to `device` as they run."""
    chosen = choose_blocks(model, n)
    moved = sum(frozen_bytes(b) for _, b in chosen)
    kept = sum(frozen_bytes(b) for _, b in model_blocks(model)) - moved
    log.info("train.offload_blocks = %d: %s on the host (%.1f MiB); %.1f MiB of blocks stay on %s", n,
             ", ".join(name for name, _ in chosen), moved / 2**20, kept / 2**20, device)
    return BlockOffloader(chosen, device, events)
