"""The MindSpore twin of lora_core: a LoRA Dense wrapper, model-level verbs and the same adapter file.

y = base(x) + B(A(dropout(x))) * scale * user_scale      (scale = alpha/r, or alpha/sqrt(r) with rsLoRA)

Same names, shapes and meaning as the PyTorch core (`lora_core.layers.LoraLayer`):
`<module>.lora_A.weight` (k*r, in) and `<module>.lora_B.weight` (k*out/n, r) in nn.Linear layout, A
Kaiming-uniform (a=sqrt(5)) or N(0, 1/r), B zero, fused slices as loralib's MergedLinear. An adapter
file written here is read by `lora_core.io.load_lora` and the reverse (same keys, same metadata).

DoRA (`use_dora`, PEFT's semantics as the torch core): a magnitude m per output
(`<module>.lora_magnitude_vector`, shape (out,)) and y = base(x) + (m/n - 1) · W x + m/n · s · B A x with
n = ||W + s B A|| per output row, held constant in the backward (stop_gradient), as PEFT.

LoHa and LoKr (`lora.type`, `LycorisDense`): the factors are parameters of the wrapper itself, under PEFT's
names (`<module>.hada_w1_a`, `<module>.lokr_w1`, ...), shapes and initialisation
(lora_core.variants.factor_shapes), and y = base(x) + x ΔWᵀ with lora_core.variants' ΔW: (w1_a w1_b) ⊙
(w2_a w2_b) · alpha/r, or w1 ⊗ w2 · alpha/r.
OFT (a rotation of the frozen weight) stays torch-only.

Differences from the PyTorch core, on purpose: one adapter per model (no set_adapter / multi-adapter
stacking), and only `nn.Dense` bases (a GPT-2 written for MindSpore stores Conv1D weights as Dense).
Modules to save (a classification head) get the core's semantics for that one adapter: the original
is kept, frozen, beside the adapter's trainable copy (`ModulesToSaveCell`); `enable_lora(net, False)`
runs the original. The copy's parameters keep the original names (`score.weight`: the file keys).
The MindSpore parameter names are the cell paths, so a LoRA layer's parameters are literally named
`<module>.lora_A.weight` and `<module>.lora_B.weight`.

Train with `trainable_params()` (= `lora_parameters`): in graph mode, gradients taken with respect to
frozen parameters passed explicitly are real, not zero. Values are written with ops.assign (in place):
a graph compiled earlier keeps reading the parameter's old buffer after `Parameter.set_data`.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Iterator, Optional, Union

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import HeUniform, Normal, initializer
from safetensors.numpy import save_file

from .config import LoraConfig, name_matches
from .fused import block_B
from .io import atomic_path, config_metadata, read_lora_config, read_safetensors
from .model import check_finite, state_dict_mismatch
from .variants import factor_shapes
from .errors import LoraLoadError, NonFiniteError

# MindSpore spells some parameters differently from PyTorch; adapter files use the PyTorch names
_TORCH_PARAM_NAMES = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}


def _ms_zeros(shape, like):
    return ops.zeros(shape, like.dtype)


def _kaiming():
    """torch's kaiming_uniform_(a=sqrt(5)) (bound 1/sqrt(fan_in)), the initialisation of lora_core's factors."""
    return HeUniform(negative_slope=math.sqrt(5))


class AdapterDense(nn.Cell):
    """What every adapter wrapper shares: the frozen `nn.Dense`, the user scale, merge / unmerge, disabling."""

    def __init__(self, base_layer: nn.Dense, kind: str):
        super().__init__()
        if not isinstance(base_layer, nn.Dense):
            raise TypeError(f"{kind} (MindSpore) can wrap nn.Dense only, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        w = base_layer.weight.dtype
        self.adapter_dtype = w if w in (ms.float32, ms.float64) else ms.float32
        self.user_scale = 1.0
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> np.ndarray:
        """ΔW in Dense layout (out, in), fp32 numpy, including scale and user scale."""
        raise NotImplementedError

    def adapter_params(self) -> dict[str, ms.Parameter]:
        """The adapter's parameters by their file name after `<module>.` (lora_core.lora_state_dict's)."""
        raise NotImplementedError

    def _apply_delta(self, sign: float) -> None:
        self._write_weight(self.base_layer.weight.asnumpy().astype(np.float32) + sign * self.delta_weight(), sign > 0)

    def _write_weight(self, new: np.ndarray, check: bool) -> None:
        if check and not np.isfinite(new).all():
            raise NonFiniteError("merging the adapter would give non-finite weights; nothing was merged")
        W = self.base_layer.weight
        ops.assign(W, ms.Tensor(new, W.dtype))

    def merge(self) -> None:
        """Fold the adapter into the base weight; a non-finite result raises and changes nothing."""
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False


class LoraDense(AdapterDense):
    """A frozen `nn.Dense` plus one low-rank adapter (see the module docstring)."""

    def __init__(self, base_layer: nn.Dense, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", slices: Optional[list[bool]] = None, use_dora: bool = False):
        if use_dora and slices is not None:
            raise ValueError("DoRA does not work on fused slices; set use_dora = false or drop fused_slices")
        super().__init__(base_layer, "LoRA")
        n_on, out = 1, self.out_features
        if slices is not None:
            if self.out_features % len(slices):
                raise ValueError(f"output size {self.out_features} is not divisible into {len(slices)} slices")
            n_on = sum(bool(s) for s in slices)
            out = self.out_features // len(slices) * n_on
        a_init = _kaiming() if init == "kaiming" else Normal(sigma=1.0 / r)
        dtype = self.adapter_dtype
        self.lora_A = nn.Dense(self.in_features, r * n_on, weight_init=initializer(a_init, (r * n_on, self.in_features), dtype),
                               has_bias=False, dtype=dtype)
        self.lora_B = nn.Dense(r, out, weight_init="zeros", has_bias=False, dtype=dtype)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, float(alpha)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.slices = tuple(bool(s) for s in slices) if slices is not None else None
        self.use_dora = use_dora
        self._dora_norm_merged = None
        if use_dora:   # m = ||W|| per output (B is zero), PEFT's start
            norm = np.linalg.norm(base_layer.weight.asnumpy().astype(np.float32), axis=1)
            self.lora_magnitude_vector = ms.Parameter(ms.Tensor(norm, dtype), name="lora_magnitude_vector")

    def full_B(self) -> ms.Tensor:
        """B in the base output layout (out, k*r): lora_core.fused.block_B (zero rows for the slices
        that are not adapted)."""
        B = self.lora_B.weight
        if self.slices is None:
            return B
        return block_B(B, self.slices, self.out_features, self.r, _ms_zeros, ops.cat)

    def construct(self, x):
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        if self.use_dora:
            return y + self._dora_out(x, y).astype(y.dtype)
        h = self.lora_A(self.lora_dropout(x.astype(self.lora_A.weight.dtype)))
        if self.slices is None:
            delta = self.lora_B(h)
        else:
            delta = ops.matmul(h, self.full_B().T)
        return y + (delta * (self.scaling * self.user_scale)).astype(y.dtype)

    def adapter_params(self) -> dict[str, ms.Parameter]:
        params = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            params["lora_magnitude_vector"] = self.lora_magnitude_vector
        return params

    def delta_weight(self) -> np.ndarray:
        B = self.full_B().asnumpy().astype(np.float32)
        A = self.lora_A.weight.asnumpy().astype(np.float32)
        return (B @ A) * np.float32(self.scaling * self.user_scale)

    def _dora_out(self, x, y):
        """DoRA's addition to the base output y (see the module docstring)."""
        dtype = self.lora_A.weight.dtype
        x = x.astype(dtype)
        s = self.scaling * self.user_scale
        W = self.base_layer.weight.astype(dtype)
        delta = ops.matmul(self.lora_B.weight, self.lora_A.weight) * s
        norm = ops.stop_gradient(ops.norm(W + ops.stop_gradient(delta), dim=1))
        f = self.lora_magnitude_vector / norm
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = y.astype(dtype)
            if self.base_layer.has_bias:
                base = base - self.base_layer.bias.astype(dtype)
        else:
            x = self.lora_dropout(x)
            base = ops.matmul(x, W.T)
        return (f - 1) * base + f * self.lora_B(self.lora_A(x)) * s

    def _dora_factor(self, W: np.ndarray) -> np.ndarray:
        """m / ||W + ΔW|| per output (kept from the merge for the unmerge)."""
        if self._dora_norm_merged is None:
            self._dora_norm_merged = np.linalg.norm(W + self.delta_weight(), axis=1)
        return self.lora_magnitude_vector.asnumpy().astype(np.float32) / self._dora_norm_merged

    def _apply_delta(self, sign: float) -> None:
        if not self.use_dora:
            return super()._apply_delta(sign)
        old, delta = self.base_layer.weight.asnumpy().astype(np.float32), self.delta_weight()
        f = self._dora_factor(old)[:, None]   # merge: f · (W + ΔW); unmerge: W' / f - ΔW
        if sign < 0:
            self._dora_norm_merged = None
            return self._write_weight(old / f - delta, False)
        try:
            self._write_weight(f * (old + delta), True)
        except NonFiniteError:
            self._dora_norm_merged = None
            raise

    def extend_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, slices={self.slices}, merged={self.merged}"


def _kron(a, b):
    """The Kronecker product of two matrices (torch.kron's layout)."""
    (m, n), (p, q) = a.shape, b.shape
    return (a.reshape(m, 1, n, 1) * b.reshape(1, p, 1, q)).reshape(m * p, n * q)


class LycorisDense(AdapterDense):
    """A frozen `nn.Dense` plus one LoHa or LoKr adapter (see the module docstring)."""

    def __init__(self, base_layer: nn.Dense, kind: str, r: int, alpha: float, factor: int = -1,
                 decompose_both: bool = False):
        super().__init__(base_layer, kind)
        self.kind, self.r, self.alpha = kind, r, float(alpha)
        self.scaling = alpha / r
        shapes = factor_shapes(kind, self.out_features, self.in_features, (), r, factor, decompose_both)
        for name, (shape, kaiming) in shapes.items():
            init = _kaiming() if kaiming else "zeros"
            setattr(self, name, ms.Parameter(initializer(init, shape, self.adapter_dtype), name=name))
        self.factor_names = tuple(shapes)
        self.w1_split, self.w2_split = "lokr_w1_a" in shapes, "lokr_w2_a" in shapes

    def adapter_params(self) -> dict[str, ms.Parameter]:
        return {n: getattr(self, n) for n in self.factor_names}

    def delta(self) -> ms.Tensor:
        """ΔW (out, in) with scale and user scale, lora_core.variants' formulas."""
        s = self.scaling * self.user_scale
        if self.kind == "loha":
            return ops.matmul(self.hada_w1_a, self.hada_w1_b) * ops.matmul(self.hada_w2_a, self.hada_w2_b) * s
        w1 = ops.matmul(self.lokr_w1_a, self.lokr_w1_b) if self.w1_split else self.lokr_w1
        w2 = ops.matmul(self.lokr_w2_a, self.lokr_w2_b) if self.w2_split else self.lokr_w2
        return _kron(w1, w2) * s

    def delta_weight(self) -> np.ndarray:
        return self.delta().asnumpy().astype(np.float32)

    def construct(self, x):
        y = self.base_layer(x)
        if self.disabled or self.merged:
            return y
        d = self.delta()
        return y + ops.matmul(x.astype(d.dtype), d.T).astype(y.dtype)

    def extend_repr(self) -> str:
        return f"{self.kind}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


class ModulesToSaveCell(nn.Cell):
    """The adapter's own trainable copy of a module to save, beside the frozen original (the one-
    adapter form of lora_core.layers.ModulesToSaveWrapper): disabled runs the original."""

    def __init__(self, original_module: nn.Cell):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = copy.deepcopy(original_module)
        self.disabled = False

    def construct(self, x):
        if self.disabled:
            return self.original_module(x)
        return self.modules_to_save(x)


# ------------------------------------------------------------------ cell tree helpers
def get_cell(net: nn.Cell, name: str) -> nn.Cell:
    cell = net
    for part in name.split(".") if name else []:
        try:
            cell = cell._cells[part]
        except KeyError:
            raise KeyError(f"{type(net).__name__} has no cell {name!r} (no {part!r})") from None
    return cell


def _set_cell(net: nn.Cell, name: str, new: nn.Cell) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_cell(net, parent_name)
    if isinstance(parent, nn.CellList):
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    # a cell put in place after construction keeps its old parameter names: give them their path
    for pname, p in new.parameters_and_names(name_prefix=name):
        p.name = pname


def lora_layers(net: nn.Cell) -> Iterator[tuple[str, AdapterDense]]:
    """The adapted cells (LoraDense or LycorisDense) by qualified name."""
    for name, cell in net.cells_and_names():
        if isinstance(cell, AdapterDense):
            yield name, cell


def lora_parameters(net: nn.Cell) -> list[ms.Parameter]:
    """The parameters to train and to differentiate: `net.trainable_params()`."""
    return net.trainable_params()


def lora_config(net: nn.Cell) -> LoraConfig:
    cfg = getattr(net, "_lora_config", None)
    if cfg is None:
        raise KeyError("the network has no LoRA adapter")
    return cfg


def _head_cells(net: nn.Cell) -> Iterator[tuple[str, ModulesToSaveCell]]:
    for name, cell in net.cells_and_names():
        if isinstance(cell, ModulesToSaveCell):
            yield name, cell


def _modules_to_save(net: nn.Cell, names: list[str]) -> list[str]:
    found = [n for n, _ in net.cells_and_names() if n and any(name_matches(n, m) for m in names)]
    missing = [m for m in names if not any(name_matches(n, m) for n in found)]
    if missing:
        raise ValueError(f"lora.modules_to_save: no cell named {missing}")
    return found


# ------------------------------------------------------------------ verbs
def add_lora(net: nn.Cell, config: LoraConfig) -> list[str]:
    """Wrap every nn.Dense matched by `config` with a LoraDense; freeze everything but the LoRA
    parameters and config.modules_to_save. Returns the qualified names of the adapted cells."""
    if any(True for _ in lora_layers(net)):
        raise ValueError("the network already has a LoRA adapter (the MindSpore backend holds one)")
    if config.type == "oft":
        raise ValueError("lora.type = 'oft': the MindSpore backend has lora, loha and lokr (OFT rotates the frozen "
                         "weight); use the torch backend")
    cells = list(net.cells_and_names())
    targets = [n for n, c in cells if n and isinstance(c, nn.Dense) and config.matches(n)]
    if not targets:
        unsupported = [n for n, _ in cells if n and config.matches(n)]
        hint = f" (matched but not nn.Dense: {unsupported[:5]})" if unsupported else ""
        raise ValueError(f"lora.target_modules={config.target_modules!r} matched no nn.Dense cell{hint}")
    save = _modules_to_save(net, config.modules_to_save)
    for p in net.get_parameters():
        p.requires_grad = False
    for name in targets:
        _set_cell(net, name, _adapter_cell(get_cell(net, name), config, name))
    for name in save:
        head = ModulesToSaveCell(get_cell(net, name))
        _set_cell(net, name, head)
        for pname, p in head.modules_to_save.parameters_and_names(name_prefix=name):
            p.name = pname   # the copy keeps the original's names (= the adapter file keys)
            p.requires_grad = True
    net._lora_config = config
    return sorted(targets)


def _adapter_cell(base: nn.Dense, config: LoraConfig, name: str) -> AdapterDense:
    r, alpha = config.rank_alpha(name)
    if config.type == "lora":
        return LoraDense(base, r, alpha, config.dropout, config.use_rslora, config.init, config.slices_for(name),
                         config.use_dora)
    return LycorisDense(base, config.type, r, alpha, config.decompose_factor, config.decompose_both)


def remove_lora(net: nn.Cell, merge: bool = False) -> nn.Cell:
    """Put the base Dense cells back (merging the adapter into them first when merge=True)."""
    for name, layer in list(lora_layers(net)):
        layer.merge() if merge else layer.unmerge()
        _set_cell(net, name, layer.base_layer)
    for name, head in list(_head_cells(net)):   # merged: the trained copy; else the original
        _set_cell(net, name, head.modules_to_save if merge else head.original_module)
    if hasattr(net, "_lora_config"):
        del net._lora_config
    return net


def merge_lora(net: nn.Cell) -> None:
    """Fold the adapter into the base weights; the forward then skips it. A graph compiled before
    the merge keeps the old branch: merge before compiling (or use PyNative). A layer whose merged
    weight would hold NaN or inf raises NonFiniteError, that layer unchanged."""
    for _, layer in lora_layers(net):
        layer.merge()


def unmerge_lora(net: nn.Cell) -> None:
    for _, layer in lora_layers(net):
        layer.unmerge()


def enable_lora(net: nn.Cell, enabled: bool = True) -> None:
    """Switch the adapter on or off; off also runs the original modules to save (heads)."""
    for _, cell in [*lora_layers(net), *_head_cells(net)]:
        cell.disabled = not enabled


def set_scale(net: nn.Cell, scale: float) -> None:
    for _, layer in lora_layers(net):
        if layer.merged:
            raise RuntimeError("unmerge before changing the scale of a merged adapter")
        layer.user_scale = float(scale)


# ------------------------------------------------------------------ state dict and files
def _param_items(net: nn.Cell) -> dict[str, ms.Parameter]:
    """adapter-file key -> Parameter, in the PyTorch names of lora_core.lora_state_dict."""
    items = {}
    for name, layer in lora_layers(net):
        items.update({f"{name}.{k}": p for k, p in layer.adapter_params().items()})
    cfg = getattr(net, "_lora_config", None)
    if cfg is not None:
        for mname in _modules_to_save(net, cfg.modules_to_save):
            head = get_cell(net, mname)
            for pname, p in getattr(head, "modules_to_save", head).parameters_and_names():
                head, _, leaf = pname.rpartition(".")
                key = ".".join(x for x in (mname, head, _TORCH_PARAM_NAMES.get(leaf, leaf)) if x)
                items[key] = p
    if not items:
        raise KeyError("the network has no LoRA adapter")
    return items


def lora_state_dict(net: nn.Cell) -> dict[str, np.ndarray]:
    """The adapter as numpy arrays, keyed exactly as the PyTorch `lora_core.lora_state_dict`."""
    return {k: p.asnumpy().copy() for k, p in _param_items(net).items()}


def load_lora_state_dict(net: nn.Cell, sd: dict[str, np.ndarray]) -> None:
    """Strict load (every key present with the same shape); nothing is changed on error."""
    own = _param_items(net)
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise LoraLoadError(f"adapter does not fit the network: {problems}")
    check_finite({k: sd[k] for k in own}, "adapter")
    for k, p in own.items():
        ops.assign(p, ms.Tensor(np.asarray(sd[k], dtype=np.float32), p.dtype))


def save_lora(path: Union[str, Path], net: nn.Cell, metadata: Optional[dict] = None) -> None:
    """Write the adapter in the backend-neutral format of lora_core.io.save_lora, atomically."""
    meta = config_metadata(lora_config(net), [n for n, _ in lora_layers(net)])
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: np.ascontiguousarray(v) for k, v in lora_state_dict(net).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_lora(path: Union[str, Path], net: nn.Cell) -> LoraConfig:
    """Add the adapter of a lora_core file (written by either backend) to `net`. Strict: a missing,
    unexpected or mis-shaped key raises LoraLoadError naming it, and the network is left as it was."""
    sd, meta = read_safetensors(path)
    cfg, targets = read_lora_config(meta, path)
    exact = LoraConfig(**{**cfg.to_dict(), "target_modules": "|".join(re.escape(t) for t in targets)
                          or cfg.target_modules, "exclude_modules": []})
    snapshot = {p.name: p.requires_grad for p in net.get_parameters()}
    try:
        wrapped = add_lora(net, exact)
        if sorted(wrapped) != sorted(targets):
            raise LoraLoadError(f"modules in the file but not in the network: {sorted(set(targets) - set(wrapped))[:10]}")
        load_lora_state_dict(net, {k: v.float().numpy() for k, v in sd.items()})
    except Exception as e:
        remove_lora(net)
        for p in net.get_parameters():
            if p.name in snapshot:
                p.requires_grad = snapshot[p.name]
        raise LoraLoadError(f"{path}: {e}") from e
    net._lora_config = cfg
    return cfg


__all__ = ["AdapterDense", "LoraDense", "LycorisDense", "ModulesToSaveCell", "add_lora", "remove_lora", "merge_lora", "unmerge_lora", "enable_lora", "set_scale",
           "lora_layers", "lora_parameters", "lora_config", "lora_state_dict", "load_lora_state_dict",
           "save_lora", "load_lora", "get_cell"]
