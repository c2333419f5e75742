"""The LyCORIS adapter types beside LoRA (`lora.type`): LoHa, LoKr and OFT, one small module each holding its
weights (PEFT's parameter names, shapes and initialisation) and its math; and Full, a fixed weight difference
(what a file holding LyCORIS' `full` module loads as). The formulas are PEFT 0.21.2's
(peft/tuners/loha, lokr, oft), which for LoHa and LoKr are LyCORIS's.

Each works on the base weight as rows: an (out, in·kh·kw) matrix (nn.Linear's layout; a Conv2d weight
flattened; an HF Conv1D weight transposed). LoHa and LoKr add ΔW to the rows; OFT multiplies them by a
block-diagonal rotation: W' = W Rᵀ, i.e. the input is rotated before the frozen layer (y = x R Wᵀ).
`scale` is the user scale (set_scale): it multiplies ΔW, and for OFT the skew-symmetric generator of the
rotation (0 = identity, 1 = as trained; PEFT has no OFT scale).
On fused slices (lora.fused_slices, e.g. GPT-2's c_attn q,v) `Sliced` holds one adapter of the type per enabled
output slice, over that slice's rows (lora_core.fused.by_slices): equal to the type on separate q / v layers.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LYCORIS_FACTORS, LoraConfig
from .fused import by_slices, slice_size
from .layers import base_dims


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m·n = dimension: m = factor when it divides, else the pair nearest the square root with
    m <= factor (LyCORIS's and PEFT's LoKr factorization, same loop)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _param(*shape: int, device, dtype, kaiming: bool) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))
    with torch.no_grad():
        if kaiming:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        else:
            nn.init.zeros_(p)
    return p


def factor_shapes(kind: str, out: int, in_ch: int, kernel: tuple[int, ...], r: int, factor: int = -1,
                  decompose_both: bool = False) -> dict[str, tuple[tuple[int, ...], bool]]:
    """The factors of a LoHa / LoKr adapter in creation order: name -> (shape, Kaiming-uniform init, else zero);
    the rules are in LoHa's and LoKr's docstrings (PEFT's). The MindSpore twin builds its factors from this too."""
    fan_in = in_ch * math.prod(kernel)
    if kind == "loha":
        return {"hada_w1_a": ((out, r), True), "hada_w1_b": ((r, fan_in), True),
                "hada_w2_a": ((out, r), True), "hada_w2_b": ((r, fan_in), False)}
    (a, b), (c, d) = factorization(out, factor), factorization(in_ch, factor)
    if decompose_both and r < max(a, c) / 2:
        shapes = {"lokr_w1_a": ((a, r), False), "lokr_w1_b": ((r, c), True)}
    else:
        shapes = {"lokr_w1": ((a, c), False)}
    if r >= max(b, d) / 2:
        return {**shapes, "lokr_w2": ((b, d, *kernel), True)}
    return {**shapes, "lokr_w2_a": ((b, r), True), "lokr_w2_b": ((r, d * math.prod(kernel)), True)}


def _add_factors(module: nn.Module, shapes: dict[str, tuple[tuple[int, ...], bool]], device, dtype) -> None:
    for name, (shape, kaiming) in shapes.items():
        setattr(module, name, _param(*shape, device=device, dtype=dtype, kaiming=kaiming))


class Variant(nn.Module):
    """One adapter of a LyCORIS type on one layer. `key_prefix` goes before the parameter names in files."""
    kind = ""
    rotates = False
    key_prefix = ""

    def __init__(self, r: int, alpha: float):
        super().__init__()
        self.r, self.alpha = r, float(alpha)
        self.scaling = alpha / r

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """The parameters under their file names (`key_prefix` + name)."""
        return {self.key_prefix + k: p for k, p in self.named_parameters()}

    def delta_rows(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def output(self, x: torch.Tensor, op: Callable, scale: float, axis: int) -> torch.Tensor:
        """op(x, ΔW), the adapter's share of the output of a LoHa / LoKr layer (op: the base layer's operation
        with weight rows; axis: the output channels' axis)."""
        d = self.delta_rows(scale, self.dtype)
        return op(x.to(d.dtype), d)

    def delta(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """ΔW for base rows `rows` (what folding adds to them), in rows' dtype."""
        return self.delta_rows(scale, rows.dtype)

    def fold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return rows + self.delta_rows(scale, rows.dtype)

    def unfold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return rows - self.delta_rows(scale, rows.dtype)


class LoHa(Variant):
    """ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha/r; w2_b starts at zero, the others Kaiming-uniform (PEFT)."""
    kind = "loha"

    def __init__(self, out: int, fan_in: int, r: int, alpha: float, device=None, dtype=None):
        super().__init__(r, alpha)
        _add_factors(self, factor_shapes("loha", out, fan_in, (), r), device, dtype)

    def output(self, x: torch.Tensor, op: Callable, scale: float, axis: int) -> torch.Tensor:
        """op(x, ΔW); on a Linear where it is cheaper, without building ΔW: the Hadamard product of two rank-r
        products is one rank-r² product, (w1_a ⊙ w2_a)(w1_b ⊙ w2_b) with the rows of the left factors and the
        columns of the right ones multiplied pairwise (out x r², r² x in), applied like a LoRA."""
        dt = self.dtype
        out, r1, fan_in, r2 = *self.hada_w1_a.shape, self.hada_w1_b.shape[1], self.hada_w2_a.shape[1]
        if axis != -1 or r1 * r2 * (out + fan_in) >= out * fan_in:
            return super().output(x, op, scale, axis)
        left = (self.hada_w1_a.to(dt) * (self.scaling * scale))[:, :, None] * self.hada_w2_a.to(dt)[:, None, :]
        right = self.hada_w1_b.to(dt)[:, None, :] * self.hada_w2_b.to(dt)[None, :, :]
        return F.linear(F.linear(x.to(dt), right.reshape(r1 * r2, fan_in)), left.reshape(out, r1 * r2))

    def delta_rows(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        w1 = (self.hada_w1_a.to(dtype) * (self.scaling * scale)) @ self.hada_w1_b.to(dtype)   # scaled while small
        return w1 * (self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype))


class LoKr(Variant):
    """ΔW = w1 ⊗ w2 · alpha/r. out = a·b and in = c·d are split by `factorization`; w1 (a, c) is full unless
    decompose_both and r < max(a, c)/2 (then w1_a w1_b); w2 (b, d[, kh, kw]) is full when r >= max(b, d)/2, else
    w2_a (b, r) w2_b (r, d·kh·kw). w1 (or w1_a) starts at zero, the rest Kaiming-uniform (PEFT's init_weights=True)."""
    kind = "lokr"

    def __init__(self, out: int, in_ch: int, kernel: tuple[int, ...], r: int, alpha: float, factor: int = -1,
                 decompose_both: bool = False, device=None, dtype=None):
        super().__init__(r, alpha)
        _add_factors(self, factor_shapes("lokr", out, in_ch, kernel, r, factor, decompose_both), device, dtype)

    def _factor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        full = getattr(self, name, None)
        if full is not None:
            return full.to(dtype)
        return getattr(self, name + "_a").to(dtype) @ getattr(self, name + "_b").to(dtype)

    def output(self, x: torch.Tensor, op: Callable, scale: float, axis: int) -> torch.Tensor:
        """op(x, ΔW); on a Linear without building ΔW: (w1 ⊗ w2) x is w1 X w2ᵀ with x's features as the (c, d)
        matrix X, contracted with w2 first or with w1 first, whichever takes fewer products."""
        w2 = self._factor("lokr_w2", self.dtype)
        if axis != -1 or w2.dim() != 2:
            return super().output(x, op, scale, axis)
        w1 = self._scaled_w1(scale, self.dtype)
        (a, c), (b, d) = w1.shape, w2.shape
        xs = x.to(self.dtype).reshape(*x.shape[:-1], c, d)
        if b * c * (d + a) <= a * d * (c + b):
            y = torch.einsum("...cb,ac->...ab", torch.einsum("...cd,bd->...cb", xs, w2), w1)
        else:
            y = torch.einsum("...ad,bd->...ab", torch.einsum("...cd,ac->...ad", xs, w1), w2)
        return y.reshape(*x.shape[:-1], a * b)

    def _scaled_w1(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """w1 times alpha/r and the user scale: scaled while it is the small factor."""
        return self._factor("lokr_w1", dtype) * (self.scaling * scale)

    def delta_rows(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        w1 = self._scaled_w1(scale, dtype)
        w2 = self._factor("lokr_w2", dtype)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous()).flatten(1)


class OFT(Variant):
    """W' = W Rᵀ, R block-diagonal with n/block_size blocks (one shared block with block_share), each the Cayley
    transform of a skew-symmetric matrix Q built from `oft_R.weight` (upper triangle; zero at the start):
    the exact (I - Q)(I + Q)⁻¹, or PEFT's default Neumann series I + 2Q + 2Q² + ... + Q^(t-1) with t terms.
    COFT (coft) first clips each block's ||Q||_F to eps/sqrt(blocks), in place, as PEFT does on every use."""
    kind = "oft"
    rotates = True
    key_prefix = "oft_R."

    def __init__(self, n: int, config: LoraConfig, device=None, dtype=None):
        bs = config.oft_block_size
        super().__init__(n // bs, 1.0)
        self.block_size, self.blocks = bs, n // bs
        self.coft, self.eps, self.terms = config.coft, config.coft_eps, config.num_cayley_neumann_terms
        self.neumann = config.use_cayley_neumann
        self.weight = _param(1 if config.block_share else self.blocks, bs * (bs - 1) // 2, device=device, dtype=dtype,
                             kaiming=False)
        rows, cols = torch.triu_indices(bs, bs, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, vec: torch.Tensor) -> torch.Tensor:
        m = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        m[:, self.rows, self.cols] = vec
        return m - m.transpose(-2, -1)

    def _project(self) -> None:
        """COFT: each block's skew matrix clipped to Frobenius norm eps/sqrt(blocks) (PEFT's _project_batch)."""
        with torch.no_grad():
            q = self._skew(self.weight)
            eps = self.eps / math.sqrt(q.shape[0])
            norm = q.norm(dim=(1, 2), keepdim=True)
            q = torch.where(norm <= eps, q, eps * (q / norm))
            self.weight.copy_(q[:, self.rows, self.cols])

    def rotation(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """The blocks of R, (blocks, bs, bs)."""
        if self.coft:
            self._project()
        w = self.weight.to(dtype)
        q = self._skew(w if scale == 1 else w * scale)
        eye = torch.eye(self.block_size, device=q.device, dtype=dtype).expand_as(q)
        if not self.neumann:
            R = torch.linalg.solve(eye + q, eye - q, left=False)
        else:
            R = self._neumann(q, eye)
        return R.expand(self.blocks, -1, -1) if R.shape[0] == 1 else R

    def _neumann(self, q: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
        """PEFT's truncated series, term for term (the last term has weight 1), summed in place (each small
        operation costs more in dispatch than in arithmetic)."""
        R, t = eye.clone(), self.terms
        if t > 1:
            R.add_(q, alpha=2.0)
        if t > 2:
            power = q @ q
            R.add_(power, alpha=2.0)
            for _ in range(3, t - 1):
                power = power @ q
                R.add_(power, alpha=2.0)
            R.add_(power @ q)
        return R

    def _rotate(self, rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """rows @ block_diag(blocks)ᵀ."""
        out = rows.reshape(rows.shape[0], self.blocks, self.block_size)
        return torch.einsum("obj,bij->obi", out, blocks).reshape(rows.shape)

    def fold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self._rotate(rows, self.rotation(scale, rows.dtype))

    def rotate_input(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x @ block_diag(R) in the adapter's dtype: the input rotation (PEFT's way) whose product with Wᵀ is
        x (W Rᵀ)ᵀ, the folded weight's output (x: (..., n))."""
        blocks = x.to(self.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...bj,bji->...bi", blocks, self.rotation(scale, self.dtype)).reshape(x.shape)

    def unfold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self._rotate(rows, torch.linalg.inv(self.rotation(scale, rows.dtype)))

    def delta(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self.fold(rows, scale) - rows


class Full(Variant):
    """A fixed weight difference ΔW (`diff`, rows (out, in·kh·kw)), scaled by the user scale: LyCORIS' `full` module
    as a loader reads it (W + s·diff). lora_sd writes a trained OFT so for the kohya loaders (its rotation folded:
    diff = W Rᵀ - W); no trainer trains one."""
    kind = "full"

    def __init__(self, diff: torch.Tensor):
        super().__init__(1, 1.0)
        self.diff = nn.Parameter(diff.detach().clone(), requires_grad=False)

    def delta_rows(self, scale: float, dtype: torch.dtype) -> torch.Tensor:
        return self.diff.to(dtype) * scale


class Sliced(Variant):
    """One adapter of a type per enabled output slice of a fused layer, each over its slice's rows; in files
    `slice<i>.` (i: the slice's index in the layer) goes before its names. LoHa / LoKr: ΔW is each slice's
    dense ΔW in its rows, zero rows elsewhere; OFT: each enabled slice's rows get their own rotation."""

    def __init__(self, parts: list[Variant], slices: list[bool]):
        super().__init__(parts[0].r, parts[0].alpha)
        self.kind, self.rotates, self.slices = parts[0].kind, parts[0].rotates, [bool(s) for s in slices]
        self.parts = nn.ModuleList(parts)
        self.on = [i for i, s in enumerate(self.slices) if s]

    def named_tensors(self) -> dict[str, nn.Parameter]:
        return {f"slice{i}.{k}": p for i, part in zip(self.on, self.parts) for k, p in part.named_tensors().items()}

    def _block(self, rows: torch.Tensor, i: int) -> torch.Tensor:
        n = rows.shape[0] // len(self.slices)
        return rows[i * n:(i + 1) * n]

    def _each(self, rows: torch.Tensor, on, off) -> torch.Tensor:
        """rows, slice by slice: on(part, block) for an enabled slice, off(block) for the others."""
        return by_slices(self.slices, lambda i, j: on(self.parts[j], self._block(rows, i)),
                         lambda i: off(self._block(rows, i)), torch.cat)

    def output(self, x: torch.Tensor, op: Callable, scale: float, axis: int) -> torch.Tensor:
        """Each enabled slice's output, computed as its part computes it (no matmul with zero rows; on a Linear
        no dense ΔW), spread into the full output."""
        chunks = [p.output(x, op, scale, axis) for p in self.parts]
        return by_slices(self.slices, lambda i, j: chunks[j], lambda i: torch.zeros_like(chunks[0]),
                         lambda t, _: torch.cat(t, axis))

    def delta(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self._each(rows, lambda p, b: p.delta(b, scale), torch.zeros_like)

    def fold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self._each(rows, lambda p, b: p.fold(b, scale), lambda b: b)

    def unfold(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        return self._each(rows, lambda p, b: p.unfold(b, scale), lambda b: b)


def make_variant(config: LoraConfig, base: nn.Module, r: int, alpha: float, dtype: torch.dtype,
                 slices: Optional[list[bool]] = None) -> Variant:
    """The adapter of config.type (not 'lora') for base layer `base` (on its enabled output `slices` when given:
    a Sliced); a bad fit raises one ValueError line."""
    in_ch, out = base_dims(base)
    kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
    kw = dict(device=base.weight.device, dtype=dtype)
    if slices is None:
        return _variant(config, out, in_ch, kernel, r, alpha, kw)
    n = slice_size(out, slices)
    return Sliced([_variant(config, n, in_ch, kernel, r, alpha, kw) for on in slices if on], slices)


def _variant(config: LoraConfig, out: int, in_ch: int, kernel: tuple[int, ...], r: int, alpha: float,
             kw: dict) -> Variant:
    fan_in = in_ch * math.prod(kernel)
    if config.type == "loha":
        return LoHa(out, fan_in, r, alpha, **kw)
    if config.type == "lokr":
        return LoKr(out, in_ch, kernel, r, alpha, config.decompose_factor, config.decompose_both, **kw)
    if fan_in % config.oft_block_size:
        raise ValueError(f"lora.oft_block_size = {config.oft_block_size} does not divide this layer's input size "
                         f"{fan_in} (in_channels·kh·kw for a Conv2d): choose a divisor of it")
    return OFT(fan_in, config, **kw)


def set_factors(variant: Variant, tensors: dict[str, torch.Tensor]) -> None:
    """Give a LoHa or LoKr exactly these factors, by parameter name (LyCORIS' names, as a file holds them),
    replacing its own: a file may split a LoKr factor that this config keeps full, or the other way round.
    Each keeps the variant's dtype and device; ValueError (one line) for a name the type does not have."""
    allowed = LYCORIS_FACTORS.get(variant.kind, ())
    unknown = sorted(set(tensors) - set(allowed))
    if unknown:
        raise ValueError(f"{variant.kind} has no factor(s) {unknown} (it has {list(allowed)})")
    like = next(variant.parameters())
    for name in [n for n, _ in variant.named_parameters(recurse=False)]:
        delattr(variant, name)
    for name, t in tensors.items():
        setattr(variant, name, nn.Parameter(t.detach().to(device=like.device, dtype=like.dtype).clone()))
