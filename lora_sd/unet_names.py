"""UNet module names: diffusers' layout (down_blocks.1.attentions.0) <-> the original LDM / SGM layout
(input_blocks.4.1) that single-file checkpoints and kohya's SDXL adapter files use.

Torch-free: everything is computed from the UNet's config (a dict: layers_per_block, down_block_types,
up_block_types), so it holds for SD 1.x, SD 2.x, SDXL and the tiny test models alike. Only block
prefixes are mapped here; what lies inside a transformer block (transformer_blocks.0.attn2.to_q, norm,
proj_in) is named the same in both layouts; inside ResNet blocks the leaves are renamed (RESNET: norm1 ->
in_layers.0, ...), which the single-file converter and kohya's SDXL names apply after the block prefix.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping


# inside a ResNet block: diffusers leaf -> original (LDM / SGM) leaf
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or block_type.startswith("Attn")


def _down(cfg: Mapping) -> list[tuple[str, str]]:
    types = list(cfg["down_block_types"])
    layers = _per_block(cfg.get("layers_per_block", 2), len(types))
    pairs, k = [("conv_in", "input_blocks.0.0")], 1
    for i, (kind, n) in enumerate(zip(types, layers)):
        for j in range(n):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0"))
            if _has_attention(kind):
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if i < len(types) - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1
    return pairs


def _up(cfg: Mapping) -> list[tuple[str, str]]:
    types = list(cfg["up_block_types"])
    layers = list(reversed(_per_block(cfg.get("layers_per_block", 2), len(types))))
    pairs, k = [], 0
    for i, (kind, n) in enumerate(zip(types, layers)):
        attn = _has_attention(kind)
        for j in range(n + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0"))
            if attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
            k += 1
        if i < len(types) - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k - 1}.{2 if attn else 1}.conv"))
    return pairs


_FIXED = [
    ("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
    ("mid_block.resnets.1", "middle_block.2"),
    ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
]


def _key(cfg: Mapping) -> tuple:
    return (tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"]),
            tuple(_per_block(cfg.get("layers_per_block", 2), len(cfg["down_block_types"]))))


@lru_cache(maxsize=16)
def _maps(key: tuple) -> tuple[dict[str, str], dict[str, str]]:
    down, up, layers = key
    cfg = {"down_block_types": down, "up_block_types": up, "layers_per_block": layers}
    pairs = _down(cfg) + _up(cfg) + _FIXED
    return dict(pairs), {o: d for d, o in pairs}


def _rename(path: str, table: dict[str, str]) -> str:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):   # the longest mapped prefix wins
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head]] + parts[cut:])
    raise KeyError(path)


def to_original(path: str, cfg: Mapping) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q' -> 'input_blocks.4.1.transformer_blocks...'
    (SDXL layout); KeyError for a name outside the UNet's blocks."""
    return _rename(path, _maps(_key(cfg))[0])


def to_diffusers(path: str, cfg: Mapping) -> str:
    """The inverse of to_original."""
    return _rename(path, _maps(_key(cfg))[1])
