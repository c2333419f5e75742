"""The LoRA layer: a wrapper around a frozen base layer holding named low-rank adapters.

y = base(x) + sum over active adapters of  B(A(dropout(x))) * scale * user_scale

Supported bases: nn.Linear, Hugging Face Conv1D (weight stored (in, out)) and 1x1 nn.Conv2d.
With `slices` the output is cut into equal slices and only the enabled ones are adapted
(loralib's MergedLinear): A is (k*r, in), B is (k*out_slice, r) for k enabled slices.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fused import block_B


def _torch_zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(shape)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, without importing transformers here
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def base_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    w = module.weight  # HF Conv1D: (in, out)
    return w.shape[0], w.shape[1]


class LoraLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not supported(base_layer):
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__} (supported: Linear, Conv1D, 1x1 Conv2d)")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_dims(base_layer)
        self.is_conv2d = isinstance(base_layer, nn.Conv2d)
        self.fan_in_fan_out = _is_hf_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}     # alpha/r (or alpha/sqrt(r))
        self.user_scale: dict[str, float] = {}  # multiplier set at inference (set_scale)
        self.slices: dict[str, Optional[list[bool]]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ----------------------------------------------------------------- adapters
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", slices: Optional[list[bool]] = None,
                    dtype: torch.dtype = torch.float32) -> None:
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        n_on = 1
        out = self.out_features
        if slices is not None:
            if out % len(slices):
                raise ValueError(f"output size {out} is not divisible into {len(slices)} slices")
            n_on = sum(bool(s) for s in slices)
            out = out // len(slices) * n_on
        device = self.base_layer.weight.device
        if self.is_conv2d:
            A = nn.Conv2d(self.in_features, r * n_on, 1, bias=False, device=device, dtype=dtype)
            B = nn.Conv2d(r, out, 1, bias=False, device=device, dtype=dtype)
        else:
            A = nn.Linear(self.in_features, r * n_on, bias=False, device=device, dtype=dtype)
            B = nn.Linear(r, out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(A.weight, std=1.0 / r)
            nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.alpha[name] = r, float(alpha)
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.user_scale[name] = 1.0
        self.slices[name] = list(slices) if slices is not None else None
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"unmerge adapter {name!r} before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        for d in (self.r, self.alpha, self.scaling, self.user_scale, self.slices):
            del d[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    # ----------------------------------------------------------------- math
    def _B_full(self, name: str) -> torch.Tensor:
        """B as an (out, k*r) matrix in the base output layout: with fused slices, the block matrix of
        lora_core.fused.block_B (zero rows for the slices that are not adapted)."""
        B = self.lora_B[name].weight.flatten(1)
        mask = self.slices[name]
        if mask is None:
            return B
        return block_B(B, mask, self.out_features, self.r[name], _torch_zeros, torch.cat)

    def _lora_out(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input x, in the base output layout (before scaling)."""
        A = self.lora_A[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))
        if self.slices[name] is None:
            return self.lora_B[name](h)
        B = self._B_full(name)
        return F.conv2d(h, B[:, :, None, None]) if self.is_conv2d else F.linear(h, B)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return y
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            delta = self._lora_out(name, x)
            y = y + (delta * (self.scaling[name] * self.user_scale[name])).to(y.dtype)
        return y

    # ----------------------------------------------------------------- merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in), fp32, including scale and user scale."""
        A = self.lora_A[name].weight.float().flatten(1)   # (k*r, in)
        return (self._B_full(name).float() @ A) * (self.scaling[name] * self.user_scale[name])

    def _apply_delta(self, name: str, sign: float, safe: bool = False) -> None:
        W = self.base_layer.weight
        d = self.delta_weight(name).to(W.device)
        if self.fan_in_fan_out:
            d = d.T
        d = d.reshape(W.shape)
        new = W.data.float() + sign * d   # delta computed and added in fp32 for fp16/bf16 bases
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merging adapter {name!r} produced non-finite weights")
        W.data.copy_(new.to(W.dtype))

    def merge(self, adapters: Optional[list[str]] = None, safe: bool = False) -> None:
        for name in adapters if adapters is not None else list(self.active_adapters):
            if name in self.merged_adapters:
                continue
            self._apply_delta(name, +1.0, safe)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._apply_delta(name, -1.0)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A.keys())}, active={self.active_adapters}, merged={self.merged_adapters}"
