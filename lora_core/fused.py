"""Fused slices (loralib's MergedLinear), backend-neutral: the block layout of B, written once.

With `slices` a layer's output is cut into len(slices) equal slices and only the enabled ones are
adapted: A is (k*r, in), B is (k*slice_out, r) for k enabled slices. In the base output layout B
is the (out, k*r) block matrix whose row block i (the rows of slice i) holds, in column block j,
the rows of B that belong to the j-th enabled slice when slice i is that slice, and zeros
elsewhere. One matmul of this matrix with A's output (or with A itself, for ΔW) serves every
layout. The torch core, the MindSpore twin and the PEFT export all build it with `block_B`, passing
their own `zeros` and `cat`.

The other adapter types (LoHa, LoKr, OFT) on fused slices hold one adapter per enabled slice, over that
slice's rows of the base weight (out/len(slices), in): its ΔW is a dense matrix placed in those rows, zero
rows elsewhere; OFT rotates each enabled slice's rows by its own rotation and leaves the others as they are.
`by_slices` joins such per-slice row blocks into the layer's rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


def slice_layout(slices: Sequence[bool]) -> tuple[Optional[int], ...]:
    """For each output slice, the index j of its block of B (the j-th enabled slice), or None."""
    out, j = [], 0
    for on in slices:
        out.append(j if on else None)
        j += 1 if on else 0
    return tuple(out)


def block_B(B, slices: Sequence[bool], out_features: int, r: int, zeros: Callable, cat: Callable):
    """B (k*slice_out, r) as the (out_features, k*r) block matrix described above.

    zeros(shape, like) -> a zero tensor of like's dtype / device; cat(tensors, axis) -> tensor."""
    slice_out = slice_size(out_features, slices)
    layout = slice_layout(slices)
    n_on = sum(1 for j in layout if j is not None)
    zero = zeros((slice_out, r), B)
    rows = []
    for j in layout:
        blocks = [zero] * n_on
        if j is not None:
            blocks[j] = B[j * slice_out:(j + 1) * slice_out]
        rows.append(cat(blocks, 1))
    return cat(rows, 0)


def block_diagonal(blocks: Sequence, rows: Sequence[int], cols: Sequence[int], zeros: Callable, cat: Callable):
    """The (sum(rows), sum(cols)) matrix with blocks[i] (rows[i], cols[i]) on its diagonal and zeros
    elsewhere: k LoRAs (A_i, B_i) of one fused module's output slices as one LoRA, A = cat(A_i) and
    this matrix of the B_i (slices of any widths and ranks; a slice without LoRA: a block of 0 columns).

    zeros(shape, like) -> a zero tensor of like's dtype / device; cat(tensors, axis) -> tensor."""
    like = next(b for b in blocks if b is not None)
    out = []
    for i, n in enumerate(rows):
        out.append(cat([blocks[i] if j == i and blocks[i] is not None else zeros((n, c), like) for j, c in enumerate(cols)], 1))
    return cat(out, 0)


def slice_size(out_features: int, slices: Sequence[bool]) -> int:
    """The output size of one slice; ValueError (one line) when the output does not divide into the slices."""
    if out_features % len(slices):
        raise ValueError(f"output size {out_features} is not divisible into {len(slices)} slices")
    return out_features // len(slices)


def by_slices(slices: Sequence[bool], on: Callable, off: Callable, cat: Callable):
    """A fused layer's rows, slice by slice: on(i, j) for output slice i when it is the j-th enabled slice,
    off(i) for a slice that is not adapted, joined along axis 0 (cat(tensors, axis) -> tensor)."""
    return cat([off(i) if j is None else on(i, j) for i, j in enumerate(slice_layout(slices))], 0)
