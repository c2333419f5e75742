"""Adapter files for Stable Diffusion 1.x: kohya and diffusers/PEFT, in and out.

In memory an adapter is `{"unet.<module path>" | "text_encoder.<module path>": ModuleLora}` with
ΔW = (alpha / r) · up @ down (kohya's meaning; rsLoRA and any alpha are folded into `alpha`).

kohya:     lora_unet_<path . -> _>.lora_down.weight [r, in] / .lora_up.weight [out, r] / .alpha (0-dim),
           text encoder lora_te_<path>; string metadata ss_* and modelspec.*.
diffusers: unet.<path>.lora_A.weight / .lora_B.weight (or the older .lora.down/.lora.up), with
           r / lora_alpha (and rank/alpha patterns) in the `lora_adapter_metadata` JSON that
           diffusers' loader turns into the PEFT LoraConfig, so alpha != r survives.
Loading into a pipeline is strict: every key must match a module, or nothing is loaded.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lora_core import LoraConfig, LoraLoadError, add_lora, lora_layers
from lora_core.io import atomic_save_safetensors, read_safetensors
from lora_core.layers import LoraLayer, base_dims, supported

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA, DIFFUSERS = "kohya", "diffusers"

# diffusers / transformers module names that contain "_" (to undo kohya's "." -> "_" without a model)
_COMPOUND = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection",
}


@dataclass
class ModuleLora:
    down: torch.Tensor   # (r, in) or (r, in, 1, 1)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    alpha: float         # ΔW = alpha / r · up @ down

    @property
    def rank(self) -> int:
        return self.down.shape[0]


Adapter = dict  # "<component>.<module path>" -> ModuleLora


# ------------------------------------------------------------------ from / into a model
def from_model(components: dict[str, nn.Module], adapter: str = "default") -> Adapter:
    """The adapter `adapter` of lora_core-wrapped components ({"unet": unet, "text_encoder": te})."""
    out: Adapter = {}
    for comp, model in components.items():
        for name, layer in lora_layers(model):
            if adapter in layer.lora_A:
                if layer.slices[adapter] is not None:
                    raise ValueError(f"{comp}.{name}: fused-slice adapters have no kohya/diffusers form")
                r = layer.r[adapter]
                out[f"{comp}.{name}"] = ModuleLora(layer.lora_A[adapter].weight.detach().float().cpu(),
                                                   layer.lora_B[adapter].weight.detach().float().cpu(),
                                                   layer.scaling[adapter] * r)
    if not out:
        raise KeyError(f"no LoRA adapter {adapter!r} in {sorted(components)}")
    return out


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules an adapter may target: supported layers, or existing LoRA wrappers."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            found[name] = m
        elif supported(m) and ".base_layer" not in f".{name}" and ".lora_" not in f".{name}":
            found[name] = m
    return found


def _base_shape(m: nn.Module) -> tuple[int, int]:
    """(out, in) of a target module."""
    in_f, out_f = base_dims(m.base_layer if isinstance(m, LoraLayer) else m)
    return out_f, in_f


def match_report(adapter: Adapter, components: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """(matched, problems): a problem is a key with no module in the pipeline or a wrong shape."""
    matched, problems = [], []
    for key, ml in adapter.items():
        comp, _, path = key.partition(".")
        model = components.get(comp)
        mods = _adaptable_modules(model) if model is not None else {}
        m = mods.get(path)
        if m is None:
            if model is None:
                problems.append(f"{key}: the pipeline has no {comp}")
            else:
                other = dict(model.named_modules()).get(path)
                problems.append(f"{key}: " + ("no such module" if other is None else
                                              f"{type(other).__name__} layers are not supported (Linear, 1x1 Conv2d)"))
            continue
        out_f, in_f = _base_shape(m)
        if ml.down.shape[1] != in_f or ml.up.shape[0] != out_f or ml.up.shape[1] != ml.rank:
            problems.append(f"{key}: shapes down {tuple(ml.down.shape)} / up {tuple(ml.up.shape)} do not fit "
                            f"the module ({out_f} out, {in_f} in)")
            continue
        matched.append(key)
    return matched, problems


def apply_to_components(adapter: Adapter, components: dict[str, nn.Module], name: str = "default",
                        scale: float = 1.0, source: str = "adapter") -> int:
    """Add `adapter` as lora_core adapter `name` (strict: any unmatched key raises LoraLoadError and
    nothing is changed). Returns the number of matched modules."""
    from lora_core import set_scale
    matched, problems = match_report(adapter, components)
    if problems:
        raise LoraLoadError(f"{source}: {len(matched)} of {len(adapter)} adapted modules match this pipeline, "
                            f"{len(problems)} do not: {problems[:8]}" + (" ..." if len(problems) > 8 else ""))
    for comp, model in components.items():
        keys = [k for k in matched if k.startswith(comp + ".")]
        groups: dict[tuple[int, float], list[str]] = {}
        for k in keys:
            groups.setdefault((adapter[k].rank, adapter[k].alpha), []).append(k.split(".", 1)[1])
        for (r, alpha), paths in groups.items():
            regex = "|".join(re.escape(p) for p in paths)
            add_lora(model, LoraConfig(r=r, alpha=alpha, target_modules=regex), adapter=name)
        layers = dict(lora_layers(model))
        with torch.no_grad():
            for k in keys:
                layer = layers[k.split(".", 1)[1]]
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                A.copy_(adapter[k].down.reshape(A.shape).to(A.dtype))
                B.copy_(adapter[k].up.reshape(B.shape).to(B.dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        if keys:
            set_scale(model, name, scale)
    return len(matched)


# ------------------------------------------------------------------ kohya
def kohya_name(key: str) -> str:
    comp, _, path = key.partition(".")
    return KOHYA_PREFIX[comp] + path.replace(".", "_")


def _undo_underscores(flat: str) -> str:
    tokens, parts, i = flat.split("_"), [], 0
    while i < len(tokens):
        for k in (3, 2, 1):
            cand = "_".join(tokens[i:i + k])
            if k == 1 or cand in _COMPOUND:
                parts.append(cand)
                i += k
                break
    return ".".join(parts)


def to_kohya(adapter: Adapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    sd = {}
    for key, ml in adapter.items():
        base = kohya_name(key)
        sd[f"{base}.lora_down.weight"] = ml.down.to(dtype).contiguous()
        sd[f"{base}.lora_up.weight"] = ml.up.to(dtype).contiguous()
        sd[f"{base}.alpha"] = torch.tensor(float(ml.alpha), dtype=dtype)
    return sd


def from_kohya(sd: dict[str, torch.Tensor], names: Optional[dict[str, str]] = None, source: str = "file") -> Adapter:
    """Parse kohya keys. `names` maps kohya base names to "<component>.<path>" (from a model);
    without it module paths are rebuilt from diffusers' naming rules."""
    bases: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, t in sd.items():
        m = re.fullmatch(r"(lora_(?:unet|te)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", k)
        if m is None:
            bad.append(k)
            continue
        bases.setdefault(m.group(1), {})[m.group(2)] = t
    if bad:
        raise LoraLoadError(f"{source}: {len(bad)} key(s) are not SD 1.x kohya LoRA keys (SDXL lora_te1_/"
                            f"lora_te2_, LyCORIS, DoRA and other networks are not supported): {bad[:8]}")
    out: Adapter = {}
    for base, parts in bases.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraLoadError(f"{source}: {base} lacks lora_down or lora_up")
        if names is not None and base in names:
            key = names[base]
        elif base.startswith("lora_unet_"):
            key = "unet." + _undo_underscores(base[len("lora_unet_"):])
        elif base.startswith("lora_te_"):
            key = "text_encoder." + _undo_underscores(base[len("lora_te_"):])
        else:
            raise LoraLoadError(f"{source}: {base}: unknown component prefix")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])  # kohya: no alpha => r
        out[key] = ModuleLora(down, up, alpha)
    return out


# ------------------------------------------------------------------ diffusers / PEFT
def _component_config(items: dict[str, ModuleLora]) -> dict:
    """PEFT LoraConfig kwargs for one component: the commonest (r, alpha) plus per-module patterns."""
    from collections import Counter
    (r, alpha), _ = Counter((m.rank, m.alpha) for m in items.values()).most_common(1)[0]
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": sorted(items), "init_lora_weights": True,
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False}
    rank_pattern = {p: m.rank for p, m in items.items() if m.rank != r}
    alpha_pattern = {p: m.alpha for p, m in items.items() if m.alpha != alpha}
    if rank_pattern:
        cfg["rank_pattern"] = rank_pattern
    if alpha_pattern:
        cfg["alpha_pattern"] = alpha_pattern
    return cfg


def to_diffusers(adapter: Adapter, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd, packed = {}, {}
    for comp in COMPONENTS:
        items = {k.split(".", 1)[1]: m for k, m in adapter.items() if k.startswith(comp + ".")}
        if not items:
            continue
        for path, ml in items.items():
            sd[f"{comp}.{path}.lora_A.weight"] = ml.down.to(dtype).contiguous()
            sd[f"{comp}.{path}.lora_B.weight"] = ml.up.to(dtype).contiguous()
        packed.update({f"{comp}.{k}": v for k, v in _component_config(items).items()})
    return sd, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def _pattern_value(patterns: dict, path: str, default):
    for pat, v in patterns.items():
        if path == pat or path.endswith("." + pat):
            return v
    return default


def from_diffusers(sd: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "file") -> Adapter:
    packed = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    mods: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, t in sd.items():
        m = re.fullmatch(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight)", k)
        if m is None:
            bad.append(k)
            continue
        path = m.group(1)
        for old in ("base_model.model.",):
            if path.startswith(old):
                path = "unet." + path[len(old):]
        if path.split(".", 1)[0] not in COMPONENTS:
            bad.append(k)
            continue
        part = "down" if m.group(2) in ("lora_A.weight", "lora.down.weight") else "up"
        mods.setdefault(path, {})[part] = t
    if bad:
        raise LoraLoadError(f"{source}: {len(bad)} key(s) are not diffusers LoRA keys for unet/text_encoder: {bad[:8]}")
    out: Adapter = {}
    for key, parts in mods.items():
        if set(parts) != {"down", "up"}:
            raise LoraLoadError(f"{source}: {key} lacks lora_A/down or lora_B/up")
        comp, path = key.split(".", 1)
        r = parts["down"].shape[0]
        alpha = packed.get(f"{comp}.lora_alpha")
        alpha = _pattern_value(packed.get(f"{comp}.alpha_pattern") or {}, path, alpha)
        alpha = float(alpha) if alpha is not None else float(r)   # diffusers: no metadata => alpha = r
        if packed.get(f"{comp}.use_rslora"):
            alpha = alpha * r ** 0.5   # alpha/sqrt(r) == alpha'/r
        out[key] = ModuleLora(parts["down"].float(), parts["up"].float(), alpha)
    return out


# ------------------------------------------------------------------ files
def detect_format(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in sd):
        return KOHYA
    if any(".lora_A." in k or ".lora.down." in k for k in sd):
        return DIFFUSERS
    raise LoraLoadError(f"not a kohya or diffusers LoRA file (first keys: {list(sd)[:5]})")


def read_adapter(path, components: Optional[dict[str, nn.Module]] = None) -> tuple[Adapter, dict[str, str], str]:
    """(adapter, metadata, format) of a kohya or diffusers .safetensors file."""
    sd, meta = read_safetensors(path)
    fmt = detect_format(sd)
    if fmt == KOHYA:
        names = None
        if components:
            names = {kohya_name(f"{c}.{n}"): f"{c}.{n}" for c, m in components.items() for n in _adaptable_modules(m)}
        return from_kohya(sd, names, str(path)), meta, fmt
    return from_diffusers(sd, meta, str(path)), meta, fmt


def write_adapter(path, adapter: Adapter, fmt: str, metadata: Optional[dict] = None,
                  dtype: torch.dtype = torch.float32) -> None:
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == KOHYA:
        atomic_save_safetensors(path, to_kohya(adapter, dtype), meta)
    elif fmt == DIFFUSERS:
        sd, dmeta = to_diffusers(adapter, dtype)
        meta.update(dmeta)
        atomic_save_safetensors(path, sd, meta)
    else:
        raise ValueError(f"unknown adapter format {fmt!r} (kohya or diffusers)")


def summary(adapter: Adapter, metadata: dict[str, str], fmt: str) -> dict:
    """What `lora-sd inspect` prints."""
    by_comp = {c: sum(1 for k in adapter if k.startswith(c + ".")) for c in COMPONENTS}
    parts = [k.split(".") for k in adapter]
    leaf = sorted({".".join(p[-2:]) if p[-1].isdigit() else p[-1] for p in parts})   # to_q, to_out.0, q_proj
    attn = sorted({m.group(0) for k in adapter for m in [re.search(r"attn[12]", k)] if m})
    return {
        "format": fmt,
        "modules": len(adapter),
        "modules_by_component": {c: n for c, n in by_comp.items() if n},
        "ranks": sorted({m.rank for m in adapter.values()}),
        "alphas": sorted({m.alpha for m in adapter.values()}),
        "target_leaves": leaf,
        "attention": attn,
        "parameters": int(sum(m.down.numel() + m.up.numel() for m in adapter.values())),
        "targets": sorted(adapter),
        "metadata": dict(sorted(metadata.items())),
    }


def convert(src, dst, to: str, dtype: Optional[torch.dtype] = None) -> dict:
    adapter, meta, fmt = read_adapter(src)
    if dtype is None:
        sd, _ = read_safetensors(src)
        dtype = next(iter(sd.values())).dtype
    keep = {k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec.", "lora_sd."))}
    if to == KOHYA and "ss_network_module" not in keep:
        keep.update({"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                     "ss_network_dim": str(max(m.rank for m in adapter.values())),
                     "ss_network_alpha": str(next(iter(adapter.values())).alpha)})
    write_adapter(dst, adapter, to, keep, dtype)
    return {"from": fmt, "to": to, "modules": len(adapter), "out": str(Path(dst))}
