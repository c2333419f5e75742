"""The torch half of the preflight checks (`lora-sd check`, `lora-llm check`): what this device can run
(precision, optimizer packages), the loaded config with its device, and `SavedBytes`, the activation memory
autograd keeps for backward. The report, its text and the memory arithmetic stay torch-free in
lora_core.preflight (the CLIs build their `check` parser from it without importing torch)."""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from .errors import ConfigError
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
    autograd saves too, are left out with `exclude` (its modules: counted as weights already)."""

    def __init__(self, *exclude):
        self.total, self.largest = 0, 0
        self._seen = {p.untyped_storage().data_ptr() for m in exclude for p in m.parameters()}

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            key, size = st.data_ptr(), st.nbytes()
        except Exception:  # noqa: BLE001 - a tensor without storage (e.g. sparse): count its elements
            key, size = id(t), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.total += size
            self.largest = max(self.largest, size)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

