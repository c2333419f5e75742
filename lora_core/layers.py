"""The LoRA layer: a wrapper around a frozen base layer holding named low-rank adapters.

y = base(x) + sum over active adapters of  B(A(dropout(x))) * scale * user_scale

Supported bases: nn.Linear, Hugging Face Conv1D (weight stored (in, out)) and nn.Conv2d (groups 1).
On a k×k Conv2d (LoCon) A is a k×k conv to r channels with the base's stride, padding and dilation,
and B a 1x1 conv (PEFT's Conv2d LoRA; kohya's conv_dim layout: down (r, in, k, k), up (out, r, 1, 1)).
With `use_dora` (PEFT's DoRA) the adapter also holds a magnitude m per output (`lora_magnitude_vector`,
(out,) or (1, out, 1, 1) for Conv2d, as PEFT) and the layer computes m · (W + ΔW) / ||W + ΔW||, the
norm taken per output row and detached from the graph (DoRA paper §4.3, as PEFT).
With `slices` the output is cut into equal slices and only the enabled ones are adapted
(loralib's MergedLinear): A is (k*r, in), B is (k*out_slice, r) for k enabled slices.
Adapters of the LyCORIS types (LoHa, LoKr, OFT) live in `lycoris`, one lora_core.variants module each, which
holds their weights and math; the layer runs them on the base weight's rows: y += op(x, ΔW) for LoHa / LoKr,
y = op(x, W Rᵀ) + bias for OFT, which therefore shares a layer only with other OFT adapters.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HeadConflictError, MergeOverflowError, NonFiniteError, QuantizedMergeError
from .fused import block_B


def _torch_zeros(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(shape)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, without importing transformers here
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def is_kxk_conv(module: nn.Module) -> bool:
    """A Conv2d with a kernel larger than 1x1 (LoCon's target; kohya's conv_dim applies to it)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _conv_pair(base: nn.Conv2d, r_in: int, r: int, out: int, device, dtype) -> tuple[nn.Conv2d, nn.Conv2d]:
    """A as the base's kernel (same stride, padding, dilation, padding mode) to r channels; B 1x1."""
    A = nn.Conv2d(base.in_channels, r_in, base.kernel_size, base.stride, base.padding, base.dilation,
                  bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype)
    B = nn.Conv2d(r, out, 1, bias=False, device=device, dtype=dtype)
    return A, B


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
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__} (supported: Linear, Conv1D, Conv2d "
                            "with groups=1)")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_dims(base_layer)
        self.is_conv2d = isinstance(base_layer, nn.Conv2d)
        self.fan_in_fan_out = _is_hf_conv1d(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()   # DoRA adapters only
        self.lycoris = nn.ModuleDict()                    # LoHa / LoKr / OFT adapters (lora_core.variants)
        self._dora_norms: dict[str, torch.Tensor] = {}     # ||W0 + ΔW|| of each merged DoRA adapter
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}     # alpha/r (or alpha/sqrt(r))
        self.user_scale: dict[str, float] = {}  # multiplier set at inference (set_scale)
        self.slices: dict[str, Optional[list[bool]]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ----------------------------------------------------------------- adapters
    @property
    def adapters(self) -> list[str]:
        """The names of the adapters on this layer, of every type."""
        return [*self.lora_A.keys(), *self.lycoris.keys()]

    def _check_new(self, name: str, kind: str) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        kinds = {self.lycoris[n].kind if n in self.lycoris else "lora" for n in self.adapters}
        if kinds and "oft" in kinds | {kind} and kinds != {kind}:
            raise ValueError(f"adapter {name!r} ({kind}) cannot share a layer with adapters {self.adapters} "
                             f"({', '.join(sorted(kinds))}): OFT rotates the base weight, the other types add to it")

    def add_variant(self, name: str, variant: nn.Module) -> None:
        """Add a LoHa / LoKr / OFT adapter (a lora_core.variants module)."""
        self._check_new(name, variant.kind)
        self.lycoris[name] = variant
        self.user_scale[name] = 1.0
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    init: str = "kaiming", slices: Optional[list[bool]] = None,
                    dtype: torch.dtype = torch.float32, use_dora: bool = False) -> None:
        self._check_new(name, "lora")
        if use_dora and slices is not None:
            raise ValueError(f"adapter {name!r}: DoRA does not work on fused slices (no per-output norm of a "
                             "partly adapted layer in PEFT either); set use_dora = false or drop fused_slices")
        n_on = 1
        out = self.out_features
        if slices is not None:
            if out % len(slices):
                raise ValueError(f"output size {out} is not divisible into {len(slices)} slices")
            n_on = sum(bool(s) for s in slices)
            out = out // len(slices) * n_on
        device = self.base_layer.weight.device
        if self.is_conv2d:
            A, B = _conv_pair(self.base_layer, r * n_on, r, out, device, dtype)
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
        if use_dora:
            self._add_magnitude(name, dtype)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"unmerge adapter {name!r} before deleting it")
        self.discard(name)

    def discard(self, name: str) -> None:
        """Forget adapter `name` if present (no checks: used to undo a failed add)."""
        for d in (self.lora_A, self.lora_B, self.lora_dropout, self.lycoris):
            if name in d:
                del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.alpha, self.scaling, self.user_scale, self.slices):
            d.pop(name, None)
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

    def _op(self, x: torch.Tensor, rows: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base layer's operation with weight rows `rows` ((out, in·kh·kw), see _weight_rows; any number of
        output rows)."""
        if self.is_conv2d:
            return self.base_layer._conv_forward(x, rows.reshape(-1, *self.base_layer.weight.shape[1:]), bias)
        return F.linear(x, rows, bias)

    def _rotated(self, names: list[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output with the rotations of OFT adapters `names` folded into its weight in turn
        (the order of PEFT's merge: W R₁ᵀ R₂ᵀ). A Linear rotates its input instead, x R₂ R₁ (PEFT's way), the
        same product at less cost: the rotated weight's own gradient would cost a matmul the size of the layer's."""
        if self._rotates_input(names):
            h = x
            for name in reversed(names):
                h = self.lycoris[name].rotate_input(h, self.user_scale[name])
            return self.base_layer(h.to(x.dtype), *args, **kwargs)
        rows = self._weight_rows(self.base_layer.weight).to(self.lycoris[names[0]].dtype)
        for name in names:
            rows = self.lycoris[name].fold(rows, self.user_scale[name])
        bias = self.base_layer.bias
        return self._op(x.to(rows.dtype), rows, None if bias is None else bias.to(rows.dtype))

    def _rotates_input(self, names: list[str]) -> bool:
        """Rotate the input rather than the weight: a Linear (or HF Conv1D) with plain OFT adapters (fused slices
        rotate their own rows; a Conv2d's rotation spans its kernel)."""
        return not self.is_conv2d and all(hasattr(self.lycoris[n], "rotate_input") for n in names)

    def _variant_out(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + op(x, ΔW) for a LoHa / LoKr adapter (PEFT's forward: F.linear / F.conv2d with ΔW)."""
        out = self.lycoris[name].output(x, self._op, self.user_scale[name], 1 if self.is_conv2d else -1)
        return y + out.to(y.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        live = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.adapters]
        oft = [n for n in live if n in self.lycoris and self.lycoris[n].rotates]
        y = self._rotated(oft, x, *args, **kwargs).to(x.dtype) if oft else self.base_layer(x, *args, **kwargs)
        for name in live:
            if name in self.lycoris:
                y = y if name in oft else self._variant_out(name, x, y)
                continue
            if name in self.lora_magnitude_vector:
                y = self._dora_apply(name, x, y)
                continue
            delta, s = self._lora_out(name, x), self.scaling[name] * self.user_scale[name]
            # y + s·delta in one full-size operation when the dtypes agree (else scaled in the adapter's dtype)
            y = torch.add(y, delta, alpha=s) if delta.dtype == y.dtype else y + (delta * s).to(y.dtype)
        return y

    # ----------------------------------------------------------------- merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in), fp32, including scale and user scale (for OFT: W Rᵀ - W)."""
        if name in self.lycoris:
            return self.lycoris[name].delta(self._weight_rows(self.base_layer.weight.float()), self.user_scale[name])
        A = self.lora_A[name].weight.float().flatten(1)   # (k*r, in)
        return (self._B_full(name).float() @ A) * (self.scaling[name] * self.user_scale[name])

    def _delta_like_base(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in the base weight's layout, fp32."""
        W = self.base_layer.weight
        d = self.delta_weight(name).to(W.device)
        return (d.T if self.fan_in_fan_out else d).reshape(W.shape)

    def merged_weight(self, names: list[str], where: str = "") -> torch.Tensor:
        """The base weight with adapters `names` folded in, computed in fp32 and cast to the base
        dtype. Raises NonFiniteError if the result would hold NaN or inf (a non-finite adapter, or
        an fp16/bf16 overflow: MergeOverflowError); nothing is changed here."""
        if getattr(self.base_layer, "quantized", False):
            raise QuantizedMergeError(f"{where or 'this layer'}: the base weight is stored {self.base_layer.storage}; "
                                      "merge into the base loaded in full precision (as lora-sd merge does)")
        W = self.base_layer.weight
        new = W.data.float()
        W0 = self._unmerged_weight() if any(n in self.lora_magnitude_vector for n in names) else None
        for name in names:
            new = self._fold(name, new, W0)
        where = where or type(self.base_layer).__name__
        if not torch.isfinite(new).all():
            bad = [n for n in names if not all(torch.isfinite(p).all() for p in self._params(n))]
            raise NonFiniteError(f"merging adapter(s) {names} into {where} would give non-finite weights"
                                 + (f": adapter(s) {bad} hold NaN or inf" if bad else "") + "; nothing was merged")
        out = new.to(W.dtype)
        if not torch.isfinite(out).all():
            raise MergeOverflowError(
                f"merging adapter(s) {names} into {where} overflows {W.dtype} (largest |weight| "
                f"{new.abs().max().item():.4g} > {torch.finfo(W.dtype).max:.4g}); nothing was merged: merge in "
                f"float32 (model.float()) or lower the adapter's scale")
        return out

    def _params(self, name: str) -> list[torch.Tensor]:
        if name in self.lycoris:
            return list(self.lycoris[name].parameters())
        return [self.lora_A[name].weight, self.lora_B[name].weight]

    def _variant_fold(self, name: str, W: torch.Tensor, undo: bool = False) -> torch.Tensor:
        """W (base layout, fp32) with LyCORIS adapter `name` folded in (or, undo, taken out)."""
        v, s = self.lycoris[name], self.user_scale[name]
        rows = v.unfold(self._weight_rows(W), s) if undo else v.fold(self._weight_rows(W), s)
        return rows.T if self.fan_in_fan_out else rows.reshape(W.shape)

    def _apply_delta(self, name: str, sign: float) -> None:
        if name in self.lora_magnitude_vector:
            return self._unfold_dora(name)
        W = self.base_layer.weight
        if name in self.lycoris:
            W.data.copy_(self._variant_fold(name, W.data.float(), undo=sign < 0).to(W.dtype))
            return
        W.data.copy_((W.data.float() + sign * self._delta_like_base(name)).to(W.dtype))

    def merge(self, adapters: Optional[list[str]] = None, where: str = "") -> None:
        """Fold adapters into the base weight (in fp32, one rounding to the base dtype). Always
        checked: a non-finite or overflowing result raises and leaves the weight unchanged."""
        names = [n for n in (adapters if adapters is not None else list(self.active_adapters))
                 if n not in self.merged_adapters]
        if not names:
            return
        dora = [n for n in names if n in self.lora_magnitude_vector]
        W0 = self._unmerged_weight() if dora else None
        new = self.merged_weight(names, where)
        self._dora_norms.update({n: self._dora_merge_norm(n, W0) for n in dora})
        self.base_layer.weight.data.copy_(new)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._apply_delta(name, -1.0)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"

    # ----------------------------------------------------------------- DoRA
    def _out_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """A per-output vector shaped to broadcast over a base-layout weight of `ndim` dimensions."""
        axis = 1 if self.fan_in_fan_out else 0
        return v.reshape([-1 if i == axis else 1 for i in range(ndim)])

    def _weight_rows(self, W: torch.Tensor) -> torch.Tensor:
        """A base-layout weight as (out, in·k·k) rows."""
        return W.T if self.fan_in_fan_out else W.flatten(1)

    def _dora_norm(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """||W + ΔW|| per output row, (out,), detached (W in base layout, any float dtype)."""
        with torch.no_grad():
            d = self.delta_weight(name).to(device=W.device)
            return (self._weight_rows(W).float() + d).norm(dim=1)

    def _add_magnitude(self, name: str, dtype: torch.dtype) -> None:
        """m = ||W + ΔW|| per output (= ||W|| while B is zero), in PEFT's shape."""
        norm = self._dora_norm(name, self.base_layer.weight)
        shape = (1, -1, 1, 1) if self.is_conv2d else (-1,)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.reshape(shape).to(dtype))

    def _dora_apply(self, name: str, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """y0 (the base's output, plus the adapters before this one, as PEFT) with DoRA adapter `name` added:
        y0 + (f - 1) · base + f · s · B A x, f = m/||W+ΔW|| (detached norm), base = y0 without the bias, or with
        dropout in training the base layer on the dropped input. Without dropout this is computed as
        f · (base + s · B A x) + bias: two full-size operations instead of PEFT's five."""
        A, W = self.lora_A[name], self.base_layer.weight
        s = self.scaling[name] * self.user_scale[name]
        drop = self.lora_dropout[name]
        x = x.to(A.weight.dtype)
        mag = self.lora_magnitude_vector[name]
        f = mag.flatten() / self._dora_norm(name, W).to(mag.dtype)
        f = f.view(1, -1, 1, 1) if self.is_conv2d else f
        if isinstance(drop, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            bias = None if bias is None else (bias.view(1, -1, 1, 1) if self.is_conv2d else bias)
            base = (y0 if bias is None else y0 - bias).to(x.dtype)
            out = f * torch.add(base, self.lora_B[name](A(x)), alpha=s)
            return (out if bias is None else out + bias.to(out.dtype)).to(y0.dtype)
        x = drop(x)
        w = W.to(x.dtype)
        base = self._op(x, self._weight_rows(w))
        h = self.lora_B[name](A(x))
        return y0 + ((f - 1) * base + f * h * s).to(y0.dtype)

    def _dora_factor(self, name: str, norm: torch.Tensor, ndim: int) -> torch.Tensor:
        """m / norm, shaped to broadcast over the base weight."""
        return self._out_view(self.lora_magnitude_vector[name].detach().float().flatten() / norm, ndim)

    def _dora_merge_norm(self, name: str, W0: torch.Tensor) -> torch.Tensor:
        """||W0 + ΔW|| per output, W0 the weight without merged adapters (as PEFT's merge)."""
        return (self._weight_rows(W0) + self.delta_weight(name).to(W0.device)).norm(dim=1)

    def _fold(self, name: str, W: torch.Tensor, W0: Optional[torch.Tensor]) -> torch.Tensor:
        """W (fp32) with adapter `name` merged: W + ΔW, or for DoRA m/||W0 + ΔW|| · (W + ΔW)."""
        if name in self.lycoris:
            return self._variant_fold(name, W)
        d = self._delta_like_base(name)
        if name not in self.lora_magnitude_vector:
            return W + d
        return self._dora_factor(name, self._dora_merge_norm(name, W0), W.dim()) * (W + d)

    def _unfold_dora(self, name: str) -> None:
        """Unmerge a DoRA adapter: W = W' / (m/||W0 + ΔW||) - ΔW, with the norm kept from the merge."""
        W = self.base_layer.weight
        cur = W.data.float()
        f = self._dora_factor(name, self._dora_norms.pop(name), cur.dim())
        W.data.copy_((cur / f - self._delta_like_base(name)).to(W.dtype))

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight (fp32) with every merged adapter taken out again, newest first."""
        W = self.base_layer.weight.data.float()
        for name in reversed(self.merged_adapters):
            d = self._delta_like_base(name)
            W = W / self._dora_factor(name, self._dora_norms[name], W.dim()) - d if name in self._dora_norms else W - d
        return W


class ModulesToSaveWrapper(nn.Module):
    """PEFT's ModulesToSaveWrapper semantics for a module trained in full with an adapter (e.g. a
    classification head): the original module is kept, frozen; each adapter owns its own trainable
    copy (`modules_to_save[adapter]`); the active adapter's copy runs, and the original runs when
    adapters are disabled or no active adapter owns a copy here. At most one active adapter may own
    a copy (a head cannot be summed like LoRA deltas). Attributes not found on the wrapper are read
    from the module that runs (`model.score.weight` is the active head's weight)."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def delete_adapter(self, name: str) -> None:
        self.discard(name)

    def discard(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def owners(self, names: list[str]) -> list[str]:
        """The adapters among `names` that own a copy here."""
        return [n for n in names if n in self.modules_to_save]

    def current(self) -> nn.Module:
        """The module that runs: the active adapter's copy, or the original."""
        if self.disabled:
            return self.original_module
        owners = self.owners(self.active_adapters)
        if len(owners) > 1:
            raise HeadConflictError(f"adapters {owners} are active together and each has its own copy of this "
                                    f"module ({type(self.original_module).__name__}); activate one with set_adapter")
        return self.modules_to_save[owners[0]] if owners else self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__ or "modules_to_save" not in self.__dict__["_modules"]:
                raise
        return getattr(self.current(), name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.modules_to_save.keys())}, active={self.active_adapters}, disabled={self.disabled}"
