"""Model-level verbs: add, merge, unmerge, remove, and the adapter state dict.

Every verb checks its arguments before it changes anything: a failed `add_lora` (or `load_lora`)
leaves the model exactly as it was, unknown adapter names are refused with the known ones, and a
merge that would give non-finite weights (a NaN adapter, an fp16/bf16 overflow) changes nothing.
`modules_to_save` (e.g. a classification head) follow PEFT's ModulesToSaveWrapper: each adapter
owns a copy, the original is kept and runs when adapters are disabled.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from .config import LoraConfig, name_matches, pattern_key
from .errors import (AdapterExistsError, HeadConflictError, LoraLoadError, ModelLoadError, NonFiniteError,
                     TargetMatchError, UnknownAdapterError)
from .fields import values_checked
from .layers import LoraLayer, ModulesToSaveWrapper, is_kxk_conv, supported
from .variants import Full, make_variant

DEFAULT = "default"


def refuse_non_finite_base(modules: dict[str, nn.Module], source: str) -> None:
    """Before training: raise ModelLoadError naming the first base weight (component.tensor) that holds an
    inf or a NaN, which would otherwise show as a non-finite loss at step 1."""
    for comp, module in modules.items():
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise ModelLoadError(f"{source}: the base model's weight {comp}.{name} holds non-finite values "
                                     "(inf or NaN); the checkpoint is damaged: download or convert it again")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def head_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """The modules_to_save wrappers (per-adapter copies of e.g. a classification head)."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    names = set(getattr(model, "_lora_configs", {}))
    for _, layer in lora_layers(model):
        names.update(layer.adapters)
    for _, w in head_wrappers(model):
        names.update(w.modules_to_save.keys())
    return sorted(names)


def _check_known(model: nn.Module, names) -> None:
    known = adapter_names(model)
    unknown = [a for a in names if a not in known]
    if unknown:
        raise UnknownAdapterError(f"unknown adapter{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(map(repr, unknown))}; the model has {known or 'no adapters'}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _wrapped_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of modules that live inside a LoRA layer or a head wrapper."""
    return [f"{n}." for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]


def _under(name: str, prefixes) -> bool:
    return any(name.startswith(p) for p in prefixes)


def _find_targets(model: nn.Module, config: LoraConfig, heads: list[str]) -> list[str]:
    """Modules to adapt: matched, supported, not inside a wrapper, not a module to save (PEFT)."""
    inside = _wrapped_prefixes(model)
    skip = [f"{h}." for h in heads]
    targets = [n for n, m in model.named_modules()
               if n and config.matches(n) and not _under(n, inside) and n not in heads and not _under(n, skip)
               and (supported(m) or isinstance(m, LoraLayer))]
    if not targets:
        unsupported = [n for n, _ in model.named_modules() if n and config.matches(n)]
        hint = f" (matched but unsupported: {unsupported[:5]})" if unsupported else ""
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n and supported(m) and not _under(n, inside)})
        raise TargetMatchError(f"lora.target_modules={config.target_modules!r} matched no supported module{hint}; "
                               f"this model's adaptable modules are named {leaves[:12]}")
    return targets


def idle_entries(model: nn.Module, config: LoraConfig, targets: list[str], table: str = "lora") -> list[str]:
    """What in `config` would do nothing on `model` (targets: the adapted modules): rank_pattern / alpha_pattern
    keys that set no targeted module (PEFT: the first matching key wins), exclude_modules entries that exclude
    no module the targets would match, conv_r / conv_alpha without a k×k convolution among the targets."""
    out = []
    for key, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        unused = set(patterns) - {pattern_key(patterns, t) for t in targets}
        if unused:
            out.append(f"{table}.{key}: {sorted(unused)} set(s) no targeted module ({len(targets)} targets, e.g. "
                       f"{targets[0]}): fix the pattern or remove it")
    if config.exclude_modules:
        with values_checked():
            loose = dataclasses.replace(config, exclude_modules=[])
        matched = [n for n, m in model.named_modules()
                   if n and loose.matches(n) and (supported(m) or isinstance(m, LoraLayer))]
        unused = [e for e in config.exclude_modules if not any(name_matches(n, e) for n in matched)]
        if unused:
            out.append(f"{table}.exclude_modules: {unused} exclude(s) no module that {table}.target_modules "
                       "matches: fix the names or remove them")
    if (config.conv_r or config.conv_alpha) and not any(is_kxk_conv(_base(model.get_submodule(t))) for t in targets):
        out.append(f"{table}.conv_r / conv_alpha apply to k×k convolutions, and {table}.target_modules targets "
                   "none: add convolutions to the targets (e.g. 'cross_attn+conv') or remove them")
    return out


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Qualified names of the modules to save (outermost matches, existing wrappers included)."""
    inside = _wrapped_prefixes(model)
    found: list[str] = []
    for n, _ in model.named_modules():
        if n and any(name_matches(n, m) for m in names) and not _under(n, inside) \
                and not _under(n, [f"{f}." for f in found]):
            found.append(n)
    missing = [m for m in names if not any(name_matches(n, m) for n in found)]
    if missing:
        raise TargetMatchError(f"lora.modules_to_save: no module named {missing}")
    return found


@contextlib.contextmanager
def rollback(model: nn.Module, adapter: str):
    """Undo everything done to `model` inside the block if it raises: modules put in place,
    adapter `adapter` on existing wrappers, requires_grad flags and the adapter configs."""
    children = {m: dict(m._modules) for m in model.modules()}
    holders = {m for _, m in [*lora_layers(model), *head_wrappers(model)] if adapter in _adapters_of(m)}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    configs = dict(getattr(model, "_lora_configs", {})) if hasattr(model, "_lora_configs") else None
    try:
        yield
    except BaseException:
        for _, m in [*lora_layers(model), *head_wrappers(model)]:
            if m not in holders:
                m.discard(adapter)
        for m, kids in children.items():
            m._modules.clear()
            m._modules.update(kids)
        for p, flag in flags:
            p.requires_grad_(flag)
        if configs is None:
            model.__dict__.pop("_lora_configs", None)
        else:
            model._lora_configs = configs
        raise


def add_lora(model: nn.Module, config: LoraConfig, adapter: str = DEFAULT,
             dtype: torch.dtype = torch.float32, strict: Optional[str] = None) -> list[str]:
    """Wrap every module matched by `config` with a LoRA layer (or add `adapter` to an existing
    wrapper) and give `adapter` its own trainable copy of each of config.modules_to_save. Freezes
    everything else. Returns the qualified names of the adapted modules. An existing adapter name
    is refused on modules that hold it already (other modules extend it: how files with per-module
    ranks load). strict (the trainers, with their config table's name, e.g. "lora"): an entry that would
    do nothing on this model is refused (idle_entries). On any error the model is left exactly as it was."""
    heads = _modules_to_save(model, config.modules_to_save) if config.modules_to_save else []
    targets = _find_targets(model, config, heads)
    idle = idle_entries(model, config, targets, strict) if strict else []
    if idle:
        raise TargetMatchError(idle[0])
    clash = [n for n in targets + heads if adapter in _adapters_of(model.get_submodule(n))]
    if clash:
        raise AdapterExistsError(f"adapter {adapter!r} exists already on {clash[:5]} (adapters: "
                                 f"{adapter_names(model)}); delete_adapter(model, {adapter!r}) first or choose "
                                 f"another name")
    with rollback(model, adapter):
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            layer = model.get_submodule(name)
            if not isinstance(layer, LoraLayer):
                layer = LoraLayer(layer)
                _set_submodule(model, name, layer)
            try:
                r, alpha = config.rank_alpha(name, is_kxk_conv(layer.base_layer))
                if config.type == "lora":
                    layer.add_adapter(adapter, r, alpha, config.dropout, config.use_rslora,
                                      config.init, config.slices_for(name), dtype, use_dora=config.use_dora)
                else:
                    layer.add_variant(adapter, make_variant(config, layer.base_layer, r, alpha, dtype,
                                                            config.slices_for(name)))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        for name in heads:
            wrapper = model.get_submodule(name)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                _set_submodule(model, name, wrapper)
            wrapper.add_adapter(adapter)
        _set_trainable(model)
        model._lora_configs = {**getattr(model, "_lora_configs", {}), adapter: config}
    return sorted(targets)


def add_weight_diffs(model: nn.Module, diffs: dict[str, torch.Tensor], adapter: str = DEFAULT) -> None:
    """Put a fixed weight difference on each named module as adapter `adapter` (lora_core.variants.Full, frozen;
    `diffs`: {module name: ΔW in the module weight's layout}): how a file holding whole weight differences
    (LyCORIS' `full` module) loads. set_scale scales it, merge_lora folds it. On any error nothing changes."""
    with rollback(model, adapter):
        for name, diff in diffs.items():
            layer = model.get_submodule(name)
            if not isinstance(layer, LoraLayer):
                layer = LoraLayer(layer)
                _set_submodule(model, name, layer)
            W = layer.base_layer.weight
            if tuple(diff.shape) != tuple(W.shape):
                raise ValueError(f"{name}: a weight difference of shape {tuple(diff.shape)} for a weight of "
                                 f"shape {tuple(W.shape)}")
            rows = layer._weight_rows(diff.to(device=W.device, dtype=torch.float32))
            layer.add_variant(adapter, Full(rows))


def _adapters_of(module: nn.Module):
    if isinstance(module, LoraLayer):
        return module.adapters
    return module.modules_to_save.keys() if isinstance(module, ModulesToSaveWrapper) else ()


def _set_trainable(model: nn.Module) -> None:
    """LoRA parameters and every adapter's copy of the modules to save train; nothing else."""
    for _, layer in lora_layers(model):
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters(), *layer.lora_magnitude_vector.parameters(),
                  *layer.lycoris.parameters()]:
            p.requires_grad_(True)
    for _, w in head_wrappers(model):
        w.original_module.requires_grad_(False)
        w.modules_to_save.requires_grad_(True)


def lora_config(model: nn.Module, adapter: str = DEFAULT) -> LoraConfig:
    try:
        return model._lora_configs[adapter]
    except (AttributeError, KeyError):
        raise UnknownAdapterError(f"model has no LoRA adapter {adapter!r}; it has "
                                  f"{adapter_names(model) or 'no adapters'}") from None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def merge_lora(model: nn.Module, adapters: Optional[list[str]] = None) -> None:
    """Fold the (active, or named) adapters into the base weights; forward then skips them.
    Computed in fp32; if any merged weight would be NaN/inf (a non-finite adapter, an fp16/bf16
    overflow) NonFiniteError/MergeOverflowError names the module and no weight is changed."""
    if adapters is not None:
        if isinstance(adapters, str):
            adapters = [adapters]
        _check_known(model, adapters)
    plan = []
    for name, layer in lora_layers(model):
        names = [a for a in adapters if a in layer.adapters] if adapters is not None else list(layer.active_adapters)
        names = [a for a in names if a not in layer.merged_adapters]
        if names:
            layer.merged_weight(names, name)   # check every layer first (fp32, discarded) ...
            plan.append((name, layer, names))
    for name, layer, names in plan:            # ... then change them
        layer.merge(names, where=name)


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original modules back. merge=True first merges the active adapters and keeps the
    active adapter's copy of each module to save (PEFT's merge_and_unload); merge=False restores
    the original modules (the original heads too)."""
    keep = {}
    for name, w in head_wrappers(model):
        owners = w.owners(w.active_adapters) if merge else []
        if len(owners) > 1:
            raise HeadConflictError(f"adapters {owners} each have their own copy of {name!r}; "
                                    f"set_adapter one of them before remove_lora(merge=True)")
        keep[name] = w.modules_to_save[owners[0]] if owners else w.original_module
    if merge:
        merge_lora(model)
    for name, layer in list(lora_layers(model)):
        if not merge:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    for name, module in keep.items():
        _set_submodule(model, name, module)
    if hasattr(model, "_lora_configs"):
        del model._lora_configs
    return model


def set_adapter(model: nn.Module, adapters) -> None:
    """Make `adapters` (a name or list of names) the active ones. At most one of them may own a
    copy of the same module to save (as PEFT)."""
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    _check_known(model, names)
    for hname, w in head_wrappers(model):
        if len(w.owners(names)) > 1:
            raise HeadConflictError(f"adapters {w.owners(names)} each have their own copy of {hname!r}; "
                                    f"only one of them can be active")
    for _, layer in lora_layers(model):
        layer.active_adapters = [a for a in names if a in layer.adapters]
    for _, w in head_wrappers(model):
        w.active_adapters = w.owners(names)


def set_scale(model: nn.Module, adapter: str, scale: float) -> None:
    """Multiply an adapter's contribution by `scale` (0 = off, 1 = as trained)."""
    _check_known(model, [adapter])
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"set_scale({adapter!r}): the scale must be a finite number, got {scale}")
    if any(adapter in layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError(f"unmerge before changing the scale of merged adapter {adapter!r}")
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            layer.user_scale[adapter] = scale


def enable_lora(model: nn.Module, enabled: bool = True) -> None:
    """Switch all adapters on or off; off also runs the original modules to save (heads)."""
    for _, module in [*lora_layers(model), *head_wrappers(model)]:
        module.disabled = not enabled


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model alone inside this block, with its original modules to save (e.g. the
    untrained head); merged adapters stay merged."""
    states = [(m, m.disabled) for _, m in [*lora_layers(model), *head_wrappers(model)]]
    enable_lora(model, False)
    try:
        yield model
    finally:
        for m, d in states:
            m.disabled = d


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter`: its LoRA weights and its copies of the modules to save."""
    _check_known(model, [adapter])
    if any(adapter in layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError(f"unmerge adapter {adapter!r} before deleting it")
    for _, module in [*lora_layers(model), *head_wrappers(model)]:
        module.discard(adapter)
    getattr(model, "_lora_configs", {}).pop(adapter, None)


# --------------------------------------------------------------------- state dict
def head_state_dict(model: nn.Module, adapter: str = DEFAULT) -> dict[str, torch.Tensor]:
    """Adapter `adapter`'s copies of the modules to save, under the original module names
    (`score.weight`: PEFT's file names, without `modules_to_save.<adapter>`)."""
    return {f"{name}.{pname}": p for name, w in head_wrappers(model) if adapter in w.modules_to_save
            for pname, p in w.modules_to_save[adapter].named_parameters()}


def lora_state_dict(model: nn.Module, adapter: str = DEFAULT) -> dict[str, torch.Tensor]:
    """`<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's names, no adapter name in
    them; LoHa, LoKr, OFT: PEFT's `hada_w1_a`, `lokr_w1`, `oft_R.weight` ..., on fused slices
    `slice<i>.hada_w1_a` ...) plus the full parameters of the adapter's copies of modules_to_save."""
    sd = {}
    for name, layer in lora_layers(model):
        if adapter in layer.lycoris:
            sd.update({f"{name}.{k}": p.detach() for k, p in layer.lycoris[adapter].named_tensors().items()})
        elif adapter in layer.lora_A:
            sd[f"{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach()
            sd[f"{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach()
            if adapter in layer.lora_magnitude_vector:   # DoRA, PEFT's name and shape
                sd[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter].detach()
    sd.update({k: p.detach() for k, p in head_state_dict(model, adapter).items()})
    if not sd:
        _check_known(model, [adapter])
        raise UnknownAdapterError(f"adapter {adapter!r} holds no weights")
    return sd


def check_finite(tensors: dict, what: str = "adapter") -> None:
    """Raise NonFiniteError naming the first tensor (torch or numpy) holding NaN or inf."""
    for k, t in tensors.items():
        a = t.detach().float() if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t, dtype=np.float32))
        finite = torch.isfinite(a)
        if not finite.all():
            n_nan, n_inf = int(torch.isnan(a).sum()), int(torch.isinf(a).sum())
            raise NonFiniteError(f"{what}: tensor {k!r} holds non-finite values ({n_nan} NaN, {n_inf} inf); "
                                 f"the file is damaged or training diverged: use an earlier checkpoint")


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
    present and finite. All problems are collected and reported together; nothing is changed on
    error. Heads go into adapter `adapter`'s copies only."""
    own = lora_state_dict(model, adapter)
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise LoraLoadError(f"adapter {adapter!r} does not fit the model: {problems}")
    check_finite({k: sd[k] for k in own}, f"adapter {adapter!r}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(device=t.device, dtype=t.dtype))
