"""Model-level verbs: add, merge, unmerge, remove, and the adapter state dict."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .adapter_files import LoraLoadError  # noqa: F401 (one error type for adapter files and fits)
from .config import LoraConfig, name_matches
from .layers import LoraLayer, is_kxk_conv, supported

DEFAULT = "default"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(model: nn.Module, config: LoraConfig, adapter: str = DEFAULT,
             dtype: torch.dtype = torch.float32) -> list[str]:
    """Wrap every module matched by `config` with a LoRA layer (or add `adapter` to an existing
    wrapper). Freezes everything but LoRA parameters and config.modules_to_save.
    Returns the qualified names of the adapted modules."""
    existing = dict(lora_layers(model))
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or ".base_layer" in f".{name}" or ".lora_" in f".{name}":
            continue
        clean = name
        if config.matches(clean) and (supported(module) or clean in existing):
            targets.append(name)
    for name in existing:
        if config.matches(name) and name not in targets:
            targets.append(name)
    if not targets:
        unsupported = [n for n, m in model.named_modules() if config.matches(n)]
        hint = f" (matched but unsupported: {unsupported[:5]})" if unsupported else ""
        raise ValueError(f"lora.target_modules={config.target_modules!r} matched no supported module{hint}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        layer = existing.get(name)
        if layer is None:
            layer = LoraLayer(model.get_submodule(name))
            _set_submodule(model, name, layer)
        r, alpha = config.rank_alpha(name, is_kxk_conv(layer.base_layer))
        layer.add_adapter(adapter, r, alpha, config.dropout, config.use_rslora,
                          config.init, config.slices_for(name), dtype, use_dora=config.use_dora)
    # the LoRA parameters of every adapter and the modules to save are trainable
    for _, layer in lora_layers(model):
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters(), *layer.lora_magnitude_vector.parameters()]:
            p.requires_grad_(True)
    for name in _modules_to_save(model, config.modules_to_save):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model._lora_configs = {**getattr(model, "_lora_configs", {}), adapter: config}
    return sorted(targets)


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    found = [n for n, _ in model.named_modules() if n and any(name_matches(n, m) for m in names)]
    missing = [m for m in names if not any(name_matches(n, m) for n in found)]
    if missing:
        raise ValueError(f"lora.modules_to_save: no module named {missing}")
    return found


def lora_config(model: nn.Module, adapter: str = DEFAULT) -> LoraConfig:
    try:
        return model._lora_configs[adapter]
    except (AttributeError, KeyError):
        raise KeyError(f"model has no LoRA adapter {adapter!r}") from None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module, adapters: Optional[list[str]] = None, safe: bool = False) -> None:
    """Fold the (active, or named) adapters into the base weights; forward then skips them."""
    for _, layer in lora_layers(model):
        layer.merge([a for a in adapters if a in layer.lora_A] if adapters else None, safe=safe)


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original modules back (merging the active adapters first when merge=True)."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    if hasattr(model, "_lora_configs"):
        del model._lora_configs
    return model


def set_adapter(model: nn.Module, adapters) -> None:
    """Make `adapters` (a name or list of names) the active ones."""
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    known = {a for _, l in lora_layers(model) for a in l.lora_A}
    unknown = [a for a in names if a not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    for _, layer in lora_layers(model):
        layer.active_adapters = [a for a in names if a in layer.lora_A]


def set_scale(model: nn.Module, adapter: str, scale: float) -> None:
    """Multiply an adapter's contribution by `scale` (0 = off, 1 = as trained)."""
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            if adapter in layer.merged_adapters:
                raise RuntimeError("unmerge before changing the scale of a merged adapter")
            layer.user_scale[adapter] = float(scale)


def enable_lora(model: nn.Module, enabled: bool = True) -> None:
    for _, layer in lora_layers(model):
        layer.disabled = not enabled


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone inside this block (merged adapters stay merged)."""
    states = [(layer, layer.disabled) for _, layer in lora_layers(model)]
    enable_lora(model, False)
    try:
        yield model
    finally:
        for layer, d in states:
            layer.disabled = d


def delete_adapter(model: nn.Module, adapter: str) -> None:
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
    getattr(model, "_lora_configs", {}).pop(adapter, None)


# --------------------------------------------------------------------- state dict
def lora_state_dict(model: nn.Module, adapter: str = DEFAULT) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's names, no adapter name in
    them) plus the full parameters of modules_to_save."""
    sd = {}
    for name, layer in lora_layers(model):
        if adapter in layer.lora_A:
            sd[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
            sd[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
            if adapter in layer.lora_magnitude_vector:   # DoRA, PEFT's name and shape
                sd[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].detach()
    cfg = getattr(model, "_lora_configs", {}).get(adapter)
    if cfg is not None and cfg.modules_to_save:
        for mname in _modules_to_save(model, cfg.modules_to_save):
            for pname, p in model.get_submodule(mname).named_parameters():
                sd[f"{mname}.{pname}"] = p.detach()
    if not sd:
        raise KeyError(f"model has no LoRA adapter {adapter!r}")
    return sd


def state_dict_mismatch(own: dict, sd: dict) -> str:
    """'' when `sd` has exactly the keys and shapes of `own` (tensors or arrays: anything with
    .shape), else a message naming the missing, unexpected and mis-shaped keys."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(sd) & set(own)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if wrong:
        parts.append(f"shape mismatches ({len(wrong)}): {wrong[:10]}")
    return "; ".join(parts)


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], adapter: str = DEFAULT) -> None:
    """Strict load: every key must exist with the same shape, and every adapter weight must be
    present. All problems are collected and reported together; nothing is changed on error."""
    own = lora_state_dict(model, adapter)
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise LoraLoadError(f"adapter {adapter!r} does not fit the model: {problems}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(device=t.device, dtype=t.dtype))
