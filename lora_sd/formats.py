"""Adapter files for Stable Diffusion 1.x, 2.x and SDXL: kohya and diffusers/PEFT, in and out.

In memory an adapter is `{"unet.<module path>" | "text_encoder[_2].<module path>": ModuleLora}` (diffusers'
module names) with ΔW = (alpha / r) · up @ down (kohya's meaning; rsLoRA and any alpha are folded into
`alpha`), plus the base's architecture and UNet block layout (`Adapter.arch`, `.layout`): SDXL's kohya
files name UNet modules in the original SGM layout (lora_sd.adapter_formats), which takes the layout.

kohya:     lora_unet_<path . -> _>.lora_down.weight [r, in] / .lora_up.weight [out, r] / .alpha (0-dim),
           text encoder lora_te_<path>; string metadata ss_* and modelspec.*. LoCon (k×k Conv2d): down
           [r, in, k, k], up [out, r, 1, 1]. DoRA: .dora_scale, LyCORIS' output-axis layout [out, 1]
           ([out, 1, 1, 1] for a conv); diffusers' SD loaders drop dora_scale (with a warning).
diffusers: unet.<path>.lora_A.weight / .lora_B.weight (or the older .lora.down/.lora.up), DoRA's
           .lora_magnitude_vector in PEFT's shape ((out,), (1, out, 1, 1) for a conv; text encoders:
           .lora_magnitude_vector.weight, which transformers' load_adapter needs), with
           r / lora_alpha (and rank/alpha patterns) in the `lora_adapter_metadata` JSON that
           diffusers' loader turns into the PEFT LoraConfig, so alpha != r survives.
SD 3.x / Flux: the transformer as `transformer.<path>` in memory and in diffusers files; kohya files name
           the original checkpoint's modules (lora_sd.mmdit_names), fused q/k/v (and Flux's linear1) as
           one exact LoRA (fuse / split).
Every file written carries adapter_metadata: the run's facts, the base's keys, and the network keys
generated from the modules it holds (lora_sd.metadata); `train`, `convert` and `merge` all use it.
Loading into a pipeline is strict: every key must match a module, or nothing is loaded.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar, Mapping, Optional, Union

import torch
from torch import nn

from lora_core import LoraConfig, LoraLoadError, add_lora, add_weight_diffs, lora_layers, set_scale
from lora_core import adapter_files
from lora_core.fused import block_diagonal
from lora_core.io import atomic_save_safetensors, read_safetensors
from lora_core.layers import LoraLayer, base_dims, supported
from lora_core.variants import Sliced, set_factors

from .adapter_formats import (COMPONENTS, DIFFUSERS, DIFFUSERS_KEY, DIFFUSERS_METADATA_KEY, FULL_DIFF,
                              KOHYA, KOHYA_KEY, KOHYA_PREFIXES, LAYOUT_KEY, LYCORIS_KEY, LYCORIS_UNSUPPORTED,
                              SDXL_LAYOUT, diffusers_alpha, diffusers_path, file_arch, known_layout, kohya_key, kohya_name,
                              layout_of, lycoris_shape, made_for, sd_block, undo_underscores, unet_layout)
from .mmdit_names import (MMDIT_ARCHS, NATIVE_UNET, Group, group_of, kohya_unet_name, native_of, part_widths,
                          swapped, text_component, text_prefix)
from .metadata import FUSED_RANKS, MODULE_ALPHAS, NETWORK_KEYS, base_metadata, network_metadata, prediction_type_of
from .models import arch_of


@dataclass
class ModuleLora:
    down: torch.Tensor   # (r, in) or (r, in, k, k)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    alpha: float         # ΔW = alpha / r · up @ down
    magnitude: Optional[torch.Tensor] = None   # DoRA: m per output, (out,)
    kind: ClassVar[str] = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_width(self) -> int:
        return self.down.shape[1]

    @property
    def out_width(self) -> int:
        return self.up.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def is_kxk(self) -> bool:
        """A k×k convolution (LoCon; kohya's conv_dim), not a linear or 1×1 conv module."""
        return self.is_conv and tuple(self.down.shape[2:]) != (1, 1)


@dataclass
class ModuleLyco:
    """A LoHa, LoKr or full module: its factors under LyCORIS' names (lora_core.config.LYCORIS_FACTORS), ΔW scaled
    by alpha / rank as LyCORIS and ComfyUI read it (a LoKr with both factors full: rank = alpha, scale 1); a full
    module holds ΔW itself (`diff`, in the weight's shape; scale 1), e.g. a trained OFT's (origin "oft")."""
    kind: str                        # loha / lokr / full
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    kernel: tuple = ()               # (kh, kw) of a conv when known (the model's, or a 4-d lokr_w2's / diff's)
    origin: str = ""                 # full: the type it was trained as ("oft"), when known
    magnitude: ClassVar[None] = None   # no DoRA on these types

    @property
    def shape(self) -> tuple[int, int]:
        """(out, fan_in = in·kh·kw)."""
        _, _, _, out, fan_in = lycoris_shape({n: tuple(t.shape) for n, t in self.tensors.items()}, self.alpha)
        return out, fan_in

    @property
    def out_width(self) -> int:
        return self.shape[0]

    @property
    def in_width(self) -> int:
        """The input width (fan_in / (kh·kw); fan_in when the kernel is unknown)."""
        return self.shape[1] // math.prod(self.kernel or (1,))

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def is_kxk(self) -> bool:
        return self.is_conv and tuple(self.kernel) != (1, 1)


def _magnitude(t: torch.Tensor, out: int, key: str, source: str, kohya: bool) -> torch.Tensor:
    """A DoRA magnitude from a file as (out,): PEFT's (out,) / (1, out, 1, 1) or LyCORIS' output-axis
    (out, 1[, 1, 1]); LyCORIS' older input-axis layout (1, in[, 1, 1]) is refused."""
    if t.numel() == out and (t.shape[0] == out or not kohya):
        return t.float().reshape(out)
    raise LoraLoadError(f"{source}: {key}: DoRA scale of shape {tuple(t.shape)} for {out} outputs: only the "
                        f"output-axis layout (PEFT's lora_magnitude_vector, LyCORIS' wd_on_out) is supported")


class Adapter(dict):
    """"<component>.<module path>" -> ModuleLora, and what writing kohya's SDXL names needs: `arch`
    (sd1 / sd2 / sdxl, "" when unknown) and `layout` (the UNet's block layout, None when unknown)."""

    def __init__(self, *args, arch: str = "", layout: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.arch, self.layout = arch, layout


def _components_arch(components: dict[str, nn.Module]) -> tuple[str, Optional[dict]]:
    """(arch, UNet layout) of a components dict (lora_sd.models.arch_of on its UNet); ("", None) when
    there is no diffusers UNet; an MMDiT's (sd3 / flux) from its transformer, with no UNet layout."""
    if "transformer" in components:
        return arch_of(components["transformer"]), None
    try:
        unet = components["unet"]
        return arch_of(unet), unet_layout(unet.config)
    except (KeyError, TypeError, AttributeError):
        return ("sdxl" if "text_encoder_2" in components else ""), None


# ------------------------------------------------------------------ from / into a model
def from_model(components: dict[str, nn.Module], adapter: str = "default") -> Adapter:
    """The adapter `adapter` of lora_core-wrapped components ({"unet": unet, "text_encoder": te,
    "text_encoder_2": te2}), with the architecture and UNet layout of the components."""
    arch, layout = _components_arch(components)
    out = Adapter(arch=arch, layout=layout)
    for comp, model in components.items():
        for name, layer in lora_layers(model):
            if adapter in layer.lora_A:
                if layer.slices[adapter] is not None:
                    raise ValueError(f"{comp}.{name}: fused-slice adapters have no kohya/diffusers form")
                mag = layer.lora_magnitude_vector[adapter] if adapter in layer.lora_magnitude_vector else None
                out[f"{comp}.{name}"] = ModuleLora(layer.lora_A[adapter].weight.detach().float().cpu(),
                                                   layer.lora_B[adapter].weight.detach().float().cpu(),
                                                   kohya_alpha(layer, adapter),
                                                   None if mag is None else mag.detach().float().cpu().flatten())
            elif adapter in layer.lycoris:
                out[f"{comp}.{name}"] = lycoris_module(layer, adapter, f"{comp}.{name}")
    if not out:
        raise KeyError(f"no LoRA adapter {adapter!r} in {sorted(components)}")
    return out


def lycoris_module(layer: LoraLayer, adapter: str, where: str) -> ModuleLyco:
    """A layer's LoHa / LoKr adapter as a ModuleLyco. A LoKr with both factors full gets alpha / r folded into
    lokr_w2 (LyCORIS and ComfyUI scale such a module by 1). An OFT (or a loaded full module) becomes a full module,
    diff = W' - W from the layer's base weight: ours (PEFT's) rotates the input, LyCORIS', kohya's and ComfyUI's
    oft_blocks rotate blocks of the output, so no oft_blocks holds it (docs/sd.md)."""
    v = layer.lycoris[adapter]
    if isinstance(v, Sliced):
        raise ValueError(f"{where}: fused-slice adapters have no kohya/diffusers form")
    if v.kind in ("oft", "full"):
        return full_module(layer, adapter)
    tensors = {n: p.detach().float().cpu() for n, p in v.named_parameters()}
    kernel = tuple(layer.base_layer.kernel_size) if layer.is_conv2d else ()
    if "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors["lokr_w2"] = tensors["lokr_w2"] * v.scaling if v.scaling != 1 else tensors["lokr_w2"]
        return ModuleLyco(v.kind, tensors, v.r, float(v.r), kernel)
    return ModuleLyco(v.kind, tensors, v.r, v.alpha, kernel)


def full_module(layer: LoraLayer, adapter: str) -> ModuleLyco:
    """The layer's OFT / full adapter `adapter` (at its user scale) as a full module: diff = W' - W in the base
    weight's layout, fp32 (origin "oft" for an OFT)."""
    W = layer.base_layer.weight
    with torch.no_grad():
        rows = layer.delta_weight(adapter).cpu()
    diff = (rows.T if layer.fan_in_fan_out else rows).reshape(W.shape).contiguous()
    _, rank, alpha, _, _ = lycoris_shape({FULL_DIFF: tuple(diff.shape)}, None)
    origin = "oft" if adapter in layer.lycoris and layer.lycoris[adapter].kind == "oft" else ""
    return ModuleLyco("full", {FULL_DIFF: diff}, rank, alpha, tuple(diff.shape[2:]), origin)


def kohya_alpha(layer: LoraLayer, adapter: str) -> float:
    """The layer's alpha in kohya's meaning (ΔW = alpha / r · B A): its own alpha, times sqrt(r) for
    rsLoRA (whose scale is alpha / sqrt(r))."""
    r, alpha = layer.r[adapter], layer.alpha[adapter]
    return alpha * math.sqrt(r) if not math.isclose(layer.scaling[adapter], alpha / r) else alpha


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


def model_shapes(components: dict[str, nn.Module]):
    """({"<comp>.<path>": (in, out)} of every adaptable module, {key: type name} of the other modules,
    {key: (kh, kw)} kernel of each adaptable conv)."""
    shapes, others, kernels = {}, {}, {}
    for comp, model in components.items():
        mods = _adaptable_modules(model)
        for path, m in mods.items():
            out_f, in_f = _base_shape(m)
            shapes[f"{comp}.{path}"] = (in_f, out_f)
            base = m.base_layer if isinstance(m, LoraLayer) else m
            kernels[f"{comp}.{path}"] = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else (1, 1)
        others.update({f"{comp}.{n}": type(m).__name__ for n, m in model.named_modules() if n and n not in mods})
    return shapes, others, kernels


def fit_names(adapter: Adapter, components: dict[str, nn.Module]) -> Adapter:
    """Text-encoder keys spelled `text_model.<path>` (transformers' CLIP names as kohya, ComfyUI and
    diffusers' files use them) for a CLIPTextModel that newer transformers flattened to `<path>`."""
    renamed = Adapter(arch=getattr(adapter, "arch", ""), layout=getattr(adapter, "layout", None))
    for key, ml in adapter.items():
        comp, _, path = key.partition(".")
        model = components.get(comp)
        if path.startswith("text_model.") and model is not None and not hasattr(model, "text_model"):
            key = f"{comp}.{path[len('text_model.'):]}"
        renamed[key] = ml
    return renamed


def _text_model_names(adapter: Adapter) -> Adapter:
    """The inverse of fit_names (for every file we write): every CLIP text-encoder path under `text_model.`
    (T5's paths, encoder.block.N..., and the denoisers' stay as they are)."""
    out = Adapter(arch=getattr(adapter, "arch", ""), layout=getattr(adapter, "layout", None))
    for key, ml in adapter.items():
        comp, _, path = key.partition(".")
        clip = comp.startswith("text_encoder") and not path.startswith(("text_model.", "encoder.block.", "shared"))
        out[f"{comp}.text_model.{path}" if clip else key] = ml
    return out


def load_report(adapter: Adapter, components: dict[str, nn.Module], source: str = "adapter", made_for: str = "",
                base: str = "this pipeline") -> adapter_files.LoadReport:
    """Module by module, whether `adapter` fits the pipeline's components (lora_core.adapter_files.LoadReport):
    (in, out) per module, then each matched module's rank and kernel (LoCon: down [r, in, k, k])."""
    shapes, others, kernels = model_shapes(components)
    adapter = fit_names(adapter, components)
    own = {k: _own_shape(ml, kernels.get(k)) for k, ml in adapter.items()}
    rep = adapter_files.build_report(str(source), made_for or made_for_shapes(adapter), own, shapes, sd_block,
                                     base, others)
    for k in list(rep.matched):
        ml, (in_f, out_f), (kh, kw) = adapter[k], shapes[k], kernels[k]
        why = _misfit(ml, in_f, out_f, (kh, kw))
        if why:
            rep.matched.remove(k)
            rep.mismatched[k] = f"{why} do not fit the module ({out_f} out, {in_f} in, kernel {kh}x{kw})"
            counts = rep.blocks[sd_block(k)]
            counts["matched"], counts["mismatched"] = counts["matched"] - 1, counts["mismatched"] + 1
    for k in adapter:
        comp = k.partition(".")[0]
        if comp not in components and k in rep.unmatched:
            rep.unmatched[k] = f"the pipeline has no {comp}"
    return rep


def _own_shape(ml: Union[ModuleLora, ModuleLyco], kernel: Optional[tuple]) -> tuple[int, int]:
    """(in, out) of a module of the file; a LoHa / LoKr's input width through the model module's kernel."""
    if isinstance(ml, ModuleLyco) and kernel:
        out, fan_in = ml.shape
        return (fan_in // math.prod(kernel) if fan_in % math.prod(kernel) == 0 else fan_in), out
    return ml.in_width, ml.out_width


def _misfit(ml: Union[ModuleLora, ModuleLyco], in_f: int, out_f: int, kernel: tuple) -> str:
    """What of a module of the file does not fit a model module of (in, out, kernel); "" when it fits."""
    if isinstance(ml, ModuleLyco):
        out, fan_in = ml.shape
        if out != out_f or fan_in != in_f * math.prod(kernel) or (ml.kernel and tuple(ml.kernel) != kernel):
            return f"{ml.kind} factors {', '.join(f'{n} {tuple(t.shape)}' for n, t in ml.tensors.items())}"
        return ""
    if ml.up.shape[1] != ml.rank or ml.down.numel() != ml.rank * in_f * math.prod(kernel) or \
            ml.up.numel() != out_f * ml.rank:
        return f"down {tuple(ml.down.shape)} / up {tuple(ml.up.shape)}"
    return ""


def made_for_shapes(adapter: Adapter, arch: str = "") -> str:
    shapes = {k: (ml.in_width, ml.out_width) for k, ml in adapter.items()}
    return made_for(arch or getattr(adapter, "arch", ""), shapes)


def apply_to_components(adapter: Adapter, components: dict[str, nn.Module], name: str = "default",
                        scale: float = 1.0, source: str = "adapter", made_for: str = "") -> int:
    """Add `adapter` as lora_core adapter `name` (strict: any unmatched key raises LoraLoadError and
    nothing is changed). Returns the number of matched modules."""
    adapter = fit_names(adapter, components)
    rep = load_report(adapter, components, source, made_for)
    if not rep.fits:
        problems = [f"{k}: {why}" for k, why in {**rep.unmatched, **rep.mismatched}.items()]
        err = LoraLoadError(f"{source}: {len(rep.matched)} of {len(adapter)} adapted modules match this pipeline, "
                            f"{len(problems)} do not: {problems[:8]}" + (" ..." if len(problems) > 8 else "")
                            + "\n" + rep.text())
        err.report = rep
        raise err
    matched = rep.matched
    for comp, model in components.items():
        keys = [k for k in matched if k.startswith(comp + ".")]
        groups: dict[tuple[str, int, float, bool], list[str]] = {}
        full = {k.split(".", 1)[1]: adapter[k].tensors[FULL_DIFF] for k in keys if adapter[k].kind == "full"}
        add_weight_diffs(model, full, adapter=name)
        for k in keys:
            ml = adapter[k]
            if k.split(".", 1)[1] in full:
                continue
            groups.setdefault((ml.kind, ml.rank, ml.alpha, ml.magnitude is not None), []).append(k.split(".", 1)[1])
        for (kind, r, alpha, dora), paths in groups.items():
            regex = "|".join(re.escape(p) for p in paths)
            add_lora(model, LoraConfig(type=kind, r=r, alpha=alpha, target_modules=regex, use_dora=dora), adapter=name)
        layers = dict(lora_layers(model))
        with torch.no_grad():
            for k in keys:
                layer = layers[k.split(".", 1)[1]]
                if isinstance(adapter[k], ModuleLyco):
                    if adapter[k].kind != "full":
                        set_factors(layer.lycoris[name], adapter[k].tensors)
                    continue
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                A.copy_(adapter[k].down.reshape(A.shape).to(A.dtype))
                B.copy_(adapter[k].up.reshape(B.shape).to(B.dtype))
                if adapter[k].magnitude is not None:
                    m = layer.lora_magnitude_vector[name]
                    m.copy_(adapter[k].magnitude.reshape(m.shape).to(m.dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        if keys:
            set_scale(model, name, scale)
    return len(matched)


# ------------------------------------------------------------------ kohya
def to_kohya(adapter: Adapter, dtype: torch.dtype = torch.float32, layout: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """kohya's tensors; with the UNet `layout`, kohya's SDXL names (SGM UNet, lora_te1_/lora_te2_). A full
    module has no alpha (LyCORIS' `full` reads diff alone)."""
    sd = {}
    for key, ml in adapter.items():
        base = kohya_name(key, layout)
        if isinstance(ml, ModuleLyco):   # LyCORIS' names (lycoris.kohya)
            sd.update({f"{base}.{n}": t.to(dtype).contiguous() for n, t in ml.tensors.items()})
            if ml.kind != "full":
                sd[f"{base}.alpha"] = torch.tensor(float(ml.alpha), dtype=dtype)
            continue
        sd.update(kohya_tensors(base, ml, dtype))
    return sd


def kohya_tensors(base: str, ml: ModuleLora, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One module's kohya tensors: lora_down, lora_up, alpha (and DoRA's dora_scale)."""
    sd = {f"{base}.lora_down.weight": ml.down.to(dtype).contiguous(),
          f"{base}.lora_up.weight": ml.up.to(dtype).contiguous(),
          f"{base}.alpha": torch.tensor(float(ml.alpha), dtype=dtype)}
    if ml.magnitude is not None:   # LyCORIS' output-axis layout
        sd[f"{base}.dora_scale"] = ml.magnitude.reshape((-1,) + (1,) * (ml.down.dim() - 1)).to(dtype).contiguous()
    return sd


def kohya_names(components: dict[str, nn.Module]) -> dict[str, str]:
    """{kohya base name: "<component>.<path>"} of every adaptable module, under both of kohya's
    namings: diffusers' paths (SD 1.x/2.x; lora_te_) and, from the UNet's own layout, SDXL's (SGM, lora_te1_)."""
    _, layout = _components_arch(components)
    names = {}
    for comp, model in components.items():
        for path in _adaptable_modules(model):
            key = f"{comp}.{path}"
            names[kohya_name(key)] = key
            if comp != "unet":
                names[kohya_name(key, SDXL_LAYOUT)] = key   # lora_te1_ / lora_te2_ (no layout needed)
            elif layout is not None:
                with contextlib.suppress(KeyError):   # outside the UNet's blocks: no SGM name
                    names[kohya_name(key, layout)] = key
    return names


def from_kohya(sd: dict[str, torch.Tensor], names: Optional[dict[str, str]] = None, source: str = "file",
               metadata: Optional[dict[str, str]] = None) -> Adapter:
    """Parse kohya keys (SD 1.x/2.x and SDXL's SGM names). `names` maps kohya base names to
    "<component>.<path>" (kohya_names of a model); without it module paths are rebuilt from diffusers'
    naming rules and, for SGM names, the UNet layout in `metadata` (else the released SDXL's)."""
    metadata = metadata or {}
    bases: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, t in sd.items():
        m = KOHYA_KEY.fullmatch(k) or LYCORIS_KEY.fullmatch(k)
        if m is None or not m.group(1).startswith(tuple(p for p, _ in KOHYA_PREFIXES)):
            bad.append(k)
            continue
        bases.setdefault(m.group(1), {})[m.group(2)] = t
    if bad:
        raise LoraLoadError(f"{source}: {len(bad)} key(s) are not SD 1.x kohya LoRA keys, nor SD 2.x / SDXL ones (lora_unet_, "
                            f"lora_te_, lora_te1_, lora_te2_ with lora_down/lora_up/alpha, or LyCORIS' LoHa/LoKr/full "
                            f"tensors; other networks are not supported): {bad[:8]}")
    origin = trained_as(metadata)
    lyco = {b: _lycoris_from_file(b, p, source, origin) for b, p in bases.items() if "lora_down.weight" not in p
            and any(LYCORIS_KEY.fullmatch(f"{b}.{n}") for n in p)}
    arch = file_arch(metadata, {b: p["lora_down.weight"].shape[1] for b, p in bases.items() if "lora_down.weight" in p}
                     | {b: ml.in_width for b, ml in lyco.items()})
    try:
        layout = layout_of(metadata, arch)
    except ValueError as e:
        raise LoraLoadError(f"{source}: {e}") from None
    out = Adapter(arch=arch, layout=layout)
    for base, parts in bases.items():
        if base not in lyco and ("lora_down.weight" not in parts or "lora_up.weight" not in parts):
            raise LoraLoadError(f"{source}: {base} lacks lora_down or lora_up")
        try:
            key = names[base] if names is not None and base in names else kohya_key(base, layout)
        except ValueError as e:
            raise LoraLoadError(f"{source}: {e}") from None
        if base in lyco:
            out[key] = lyco[base]
            continue
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])  # kohya: no alpha => r
        mag = parts.get("dora_scale")
        out[key] = ModuleLora(down, up, alpha,
                              None if mag is None else _magnitude(mag, up.shape[0], f"{base}.dora_scale", source, True))
    return out


def trained_as(metadata: Mapping[str, str]) -> str:
    """The type a file's full modules were trained as (ss_network_args' trained_as, lora_sd.metadata); "" if none."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(metadata.get("ss_network_args") or "{}").get("trained_as", ""))
    return ""


def _lycoris_from_file(base: str, parts: dict[str, torch.Tensor], source: str, origin: str = "") -> ModuleLyco:
    """A LoHa / LoKr / full module from its tensors in a kohya file (LyCORIS' names; `origin`: what full modules
    were trained as); Tucker factors, OFT, a bias difference and DoRA on these types are refused in one line."""
    bad = sorted({LYCORIS_UNSUPPORTED[n] for n in parts if n in LYCORIS_UNSUPPORTED})
    if "dora_scale" in parts:
        bad.append("DoRA (dora_scale) on LoHa / LoKr is not supported")
    if any(n in parts for n in ("lora_down.weight", "lora_up.weight")):
        bad.append("lora_down/lora_up beside LyCORIS tensors")
    if bad:
        raise LoraLoadError(f"{source}: {base}: {'; '.join(bad)}")
    tensors = {n: t.float() for n, t in parts.items() if n != "alpha"}
    try:
        kind, rank, alpha, _, _ = lycoris_shape({n: tuple(t.shape) for n, t in tensors.items()},
                                                float(parts["alpha"]) if "alpha" in parts else None)
    except ValueError as e:
        raise LoraLoadError(f"{source}: {base}: {e}") from None
    w = tensors.get("lokr_w2", tensors.get(FULL_DIFF))
    return ModuleLyco(kind, tensors, rank, alpha, tuple(w.shape[2:]) if w is not None and w.dim() == 4 else (),
                      origin if kind == "full" else "")


# ------------------------------------------------------------------ kohya, MMDiT (SD 3.x, Flux): native names
def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """An adaLN linear's two output chunks exchanged: (shift, scale) <-> (scale, shift)."""
    return torch.cat(t.chunk(2, 0)[::-1])


def _swapped_rows(ml: ModuleLora) -> ModuleLora:
    mag = None if ml.magnitude is None else _swap_halves(ml.magnitude)
    return ModuleLora(ml.down, _swap_halves(ml.up), ml.alpha, mag)


def fuse(group: Group, parts: list[Optional[ModuleLora]]) -> ModuleLora:
    """The one LoRA of a native module from its parts' (None: a part without LoRA), exactly: A = the
    A_i stacked, B = the B_i on the diagonal (lora_core.fused.block_diagonal), alpha / r = the first
    part's (another part's own alpha / r is folded into its B); an adaLN's chunks swapped."""
    present = [m for m in parts if m is not None]
    first = present[0]
    if len(group.parts) == 1:
        return _swapped_rows(first) if swapped(group, first.down.shape[1], first.up.shape[0]) else first
    dora = [m.magnitude is not None for m in parts if m is not None]
    if any(dora) and not (all(dora) and len(present) == len(parts)):
        raise ValueError(f"{kohya_unet_name(group)}: DoRA on some of the modules that one native module fuses "
                         f"({', '.join(group.parts)}) has no kohya form: put DoRA on all of them or none, or "
                         f"save it in diffusers format")
    widths = part_widths(group, first.down.shape[1])
    if len(set(group.widths)) == 1:   # q, k, v: as wide as the parts that are there
        widths = [first.up.shape[0]] * len(widths)
    wrong = [p for p, m, w in zip(group.parts, parts, widths) if m is not None and m.up.shape[0] != w]
    if wrong:
        raise ValueError(f"{kohya_unet_name(group)}: {wrong[0]} has {parts[group.parts.index(wrong[0])].up.shape[0]} "
                         f"outputs, not the {widths} of the native module's parts: save it in diffusers format")
    ups = [None if m is None else m.up * ((m.alpha / m.rank) / (first.alpha / first.rank)) for m in parts]
    ranks = [0 if m is None else m.rank for m in parts]
    up = block_diagonal(ups, widths, ranks, lambda shape, like: like.new_zeros(shape), torch.cat)
    down = torch.cat([m.down for m in present])
    mag = torch.cat([m.magnitude for m in present]) if all(dora) else None   # DoRA's norms are per output row
    return ModuleLora(down, up, first.alpha * down.shape[0] / first.rank, mag)


def _slice_columns(up: torch.Tensor, widths: list[int], ranks: Optional[list[int]] = None) -> list[torch.Tensor]:
    """For each output slice of a fused B, the columns (of A's rows) it uses: the `ranks` our files record
    (lora_sd.fused_ranks), else kohya's block layout (equal ranks, zeros off the diagonal) by equal
    chunks, else each slice's nonzero columns."""
    n, r = len(widths), up.shape[1]
    if ranks is not None and len(ranks) == n and sum(ranks) == r:
        ends = [sum(ranks[:j + 1]) for j in range(n)]
        return [torch.arange(e - k, e) for e, k in zip(ends, ranks)]
    rows = up.split(widths)
    if r % n == 0:
        k = r // n
        if all(not b[:, :j * k].any() and not b[:, (j + 1) * k:].any() for j, b in enumerate(rows)):
            return [torch.arange(j * k, (j + 1) * k) for j in range(n)]
    return [b.any(0).nonzero().flatten() for b in rows]


def split(group: Group, ml: ModuleLora, source: str, ranks: Optional[list[int]] = None) -> dict[str, ModuleLora]:
    """{diffusers path: LoRA} of a native module's LoRA, exactly (the inverse of fuse): part i keeps the
    rows of its output slice and the columns they use (`ranks`: recorded per part), at the module's alpha / r."""
    in_f, out_f = ml.down.shape[1], ml.up.shape[0]
    if len(group.parts) == 1:
        return {group.parts[0]: _swapped_rows(ml) if swapped(group, in_f, out_f) else ml}
    try:
        widths = part_widths(group, in_f, out_f)
    except ValueError as e:
        raise LoraLoadError(f"{source}: {e}") from None
    out, row = {}, 0
    for path, w, cols in zip(group.parts, widths, _slice_columns(ml.up, widths, ranks)):
        mag = None if ml.magnitude is None else ml.magnitude[row:row + w]
        if len(cols):
            out[path] = ModuleLora(ml.down[cols], ml.up[row:row + w][:, cols], ml.alpha * len(cols) / ml.rank, mag)
        row += w
    return out


def to_native_kohya(adapter: Adapter, arch: str, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """(kohya's tensors, {fused module: [rank of each part]}) of an SD 3.x / Flux adapter: the transformer
    under its native names (fused modules as one exact LoRA), the text encoders under lora_te1_ / _te2_ / _te3_."""
    sd, groups = {}, {}
    for key, ml in adapter.items():
        comp, _, path = key.partition(".")
        if comp != "transformer":
            sd.update(kohya_tensors(text_prefix(arch, comp) + path.replace(".", "_"), ml, dtype))
            continue
        try:
            group, j = native_of(arch, path)
        except KeyError as e:
            raise ValueError(f"{e.args[0]}: kohya's {arch} files cannot name it; save it in diffusers format") from None
        groups.setdefault(group.native, (group, [None] * len(group.parts)))[1][j] = ml
    for group, parts in groups.values():
        sd.update(kohya_tensors(kohya_unet_name(group), fuse(group, parts), dtype))
    return sd, {kohya_unet_name(g): [0 if m is None else m.rank for m in parts] for g, parts in groups.values()
                if len(parts) > 1}


def from_native_kohya(sd: dict[str, torch.Tensor], arch: str, source: str = "file",
                      metadata: Optional[Mapping[str, str]] = None) -> Adapter:
    """Parse an SD 3.x / Flux kohya file (kohya sd-scripts', ComfyUI's, ours): native names -> diffusers'.
    The parts of a fused module get the alpha the metadata records for them (ss_network_alpha,
    lora_sd.module_alphas), their B rescaled to keep ΔW: our files read back as written."""
    metadata = metadata or {}
    try:
        fused = json.loads(metadata.get(FUSED_RANKS) or "{}")
    except ValueError:
        raise LoraLoadError(f"{source}: metadata {FUSED_RANKS} is not JSON: remove it") from None
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        m = KOHYA_KEY.fullmatch(k)
        if m is None:
            raise LoraLoadError(f"{source}: {k} is not a kohya LoRA key (lora_down / lora_up / alpha)")
        bases.setdefault(m.group(1), {})[m.group(2)] = t
    out = Adapter(arch=arch)
    for base, parts in bases.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraLoadError(f"{source}: {base} lacks lora_down or lora_up")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        mag = parts.get("dora_scale")
        ml = ModuleLora(down, up, float(parts["alpha"]) if "alpha" in parts else float(down.shape[0]),
                        None if mag is None else _magnitude(mag, up.shape[0], f"{base}.dora_scale", source, True))
        out.update(_native_modules(arch, base, ml, source, fused.get(base)))
    return _recorded_alphas(out, metadata)


def _recorded_alphas(adapter: Adapter, metadata: Mapping[str, str]) -> Adapter:
    """The fused modules' parts at the alphas the metadata records, ΔW unchanged (B · alpha / recorded)."""
    try:
        default = float(metadata.get("ss_network_alpha", "nan"))
        own = json.loads(metadata.get(MODULE_ALPHAS) or "{}")
    except ValueError:
        return adapter
    for key, ml in adapter.items():
        comp, _, path = key.partition(".")
        alpha = float(own.get(key, default))
        if comp == "transformer" and len(native_of(adapter.arch, path)[0].parts) > 1 and alpha > 0 \
                and alpha != ml.alpha:
            adapter[key] = ModuleLora(ml.down, ml.up * (ml.alpha / alpha), alpha)
    return adapter


def _native_modules(arch: str, base: str, ml: ModuleLora, source: str, ranks=None) -> dict[str, ModuleLora]:
    """{"<component>.<path>": LoRA} of one kohya module of an SD 3.x / Flux file."""
    try:
        if base.startswith(NATIVE_UNET):
            group = group_of(arch, base[len(NATIVE_UNET):])
            return {f"transformer.{p}": m for p, m in split(group, ml, source, ranks).items()}
        comp, flat = text_component(arch, base)
    except KeyError:
        raise LoraLoadError(f"{source}: {base} is no module of {arch} as kohya names it (lora_unet_ + the native "
                            f"transformer name, lora_te1_/lora_te2_/lora_te3_ + a text encoder's)") from None
    return {f"{comp}.{undo_underscores(flat)}": ml}


# ------------------------------------------------------------------ diffusers / PEFT
def _component_config(items: dict[str, ModuleLora]) -> dict:
    """PEFT LoraConfig kwargs for one component: the commonest (r, alpha) plus per-module patterns. Module
    names drop a leading `text_model.`: PEFT matches them as suffixes, so they fit CLIPTextModel with and
    without it (transformers 5 flattened it; the tensors' keys keep it, diffusers strips it there)."""
    items = {p[len("text_model."):] if p.startswith("text_model.") else p: m for p, m in items.items()}
    (r, alpha), _ = Counter((m.rank, m.alpha) for m in items.values()).most_common(1)[0]
    dora = {m.magnitude is not None for m in items.values()}
    if len(dora) > 1:
        raise ValueError("DoRA on some modules of a component and not on others has no diffusers/PEFT form "
                         "(use_dora is one flag per component): save it in kohya format")
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": sorted(items), "init_lora_weights": True,
           "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": dora.pop()}
    rank_pattern = {p: m.rank for p, m in items.items() if m.rank != r}
    alpha_pattern = {p: m.alpha for p, m in items.items() if m.alpha != alpha}
    if rank_pattern:
        cfg["rank_pattern"] = rank_pattern
    if alpha_pattern:
        cfg["alpha_pattern"] = alpha_pattern
    return cfg


def _magnitude_name(comp: str) -> str:
    """The DoRA magnitude's tensor name in a diffusers file: the UNet's PEFT name (diffusers loads it through
    PEFT's set_peft_model_state_dict, which adds `.weight`); a text encoder's with `.weight` already, as
    transformers' load_adapter (what diffusers' text-encoder loader calls) needs it: without it the magnitudes
    stay at their initial values (diffusers' own save_lora_weights writes it so, and loses them the same way)."""
    return "lora_magnitude_vector" if comp == "unet" else "lora_magnitude_vector.weight"


def to_diffusers(adapter: Adapter, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    kinds = sorted({ml.kind for ml in adapter.values()} - {"lora"})
    if kinds:
        raise ValueError(f"a {'/'.join(kinds)} adapter has no diffusers LoRA form (diffusers' layout holds lora_A / "
                         f"lora_B only): write the kohya/LyCORIS format (--to kohya), which ComfyUI, A1111/Forge and "
                         f"LyCORIS load")
    sd, packed = {}, {}
    for comp in COMPONENTS:
        items = {k.split(".", 1)[1]: m for k, m in adapter.items() if k.startswith(comp + ".")}
        if not items:
            continue
        for path, ml in items.items():
            sd[f"{comp}.{path}.lora_A.weight"] = ml.down.to(dtype).contiguous()
            sd[f"{comp}.{path}.lora_B.weight"] = ml.up.to(dtype).contiguous()
            if ml.magnitude is not None:   # PEFT's shape
                shape = (1, -1, 1, 1) if ml.is_conv else (-1,)
                sd[f"{comp}.{path}.{_magnitude_name(comp)}"] = ml.magnitude.reshape(shape).to(dtype).contiguous()
        packed.update({f"{comp}.{k}": v for k, v in _component_config(items).items()})
    return sd, {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def from_diffusers(sd: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "file") -> Adapter:
    packed = json.loads(metadata.get(DIFFUSERS_METADATA_KEY) or "{}")
    mods: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, t in sd.items():
        m = DIFFUSERS_KEY.fullmatch(k)
        path = diffusers_path(m.group(1)) if m else ""
        if path.split(".", 1)[0] not in COMPONENTS:
            bad.append(k)
            continue
        part = {"lora_A.weight": "down", "lora.down.weight": "down", "lora_magnitude_vector": "magnitude",
                "lora_magnitude_vector.weight": "magnitude"}.get(m.group(2), "up")
        mods.setdefault(path, {})[part] = t
    if bad:
        raise LoraLoadError(f"{source}: {len(bad)} key(s) are not diffusers LoRA keys for unet/text_encoder/"
                            f"text_encoder_2: {bad[:8]}")
    arch = file_arch(metadata, {k: p["down"].shape[1] for k, p in mods.items() if "down" in p})
    try:
        out = Adapter(arch=arch, layout=known_layout(metadata, arch, ()))
    except ValueError as e:
        raise LoraLoadError(f"{source}: {e}") from None
    for key, parts in mods.items():
        if not {"down", "up"} <= set(parts):
            raise LoraLoadError(f"{source}: {key} lacks lora_A/down or lora_B/up")
        comp, path = key.split(".", 1)
        alpha = diffusers_alpha(packed, comp, path, parts["down"].shape[0])
        mag = parts.get("magnitude")
        out[key] = ModuleLora(parts["down"].float(), parts["up"].float(), alpha, None if mag is None else
                              _magnitude(mag, parts["up"].shape[0], f"{key}.lora_magnitude_vector", source, False))
    return out


# ------------------------------------------------------------------ files
@dataclass
class AdapterFile:
    """A kohya or diffusers file in memory (what the converter registry passes from reader to writer)."""
    adapter: Adapter
    metadata: dict[str, str]
    format: str
    dtype: torch.dtype


def read_view(view: adapter_files.AdapterView, components: Optional[dict[str, nn.Module]] = None) -> AdapterFile:
    """The registered reader of both SD formats; refuses non-finite tensors (naming the tensor)."""
    sd, meta = read_safetensors(view.file)
    adapter_files.refuse_non_finite(sd, view.file)
    fmt = adapter_files.detect_view(view).format
    arch = file_arch(meta, {k.partition(".")[0]: 0 for k in sd}) if fmt == KOHYA else ""
    if arch in MMDIT_ARCHS:
        adapter = from_native_kohya(sd, arch, str(view.path), meta)
    elif fmt == KOHYA:
        adapter = from_kohya(sd, kohya_names(components) if components else None, str(view.path), meta)
    else:
        adapter = from_diffusers(sd, meta, str(view.path))
    return AdapterFile(adapter, meta, fmt, next(iter(sd.values())).dtype)


def read_adapter(path, components: Optional[dict[str, nn.Module]] = None) -> tuple[Adapter, dict[str, str], str]:
    """(adapter, metadata, format) of a kohya or diffusers file (format from lora_core's one detector)."""
    fmt, view = adapter_files.require(path)
    if fmt.family != "sd":
        raise LoraLoadError(f"{path}: a {fmt.name} file ({fmt.title}): `{fmt.tool}` reads it, not lora-sd")
    f = read_view(view, components)
    return f.adapter, f.metadata, f.format


def target_naming(adapter: dict, metadata: dict[str, str], unet_config=None) -> tuple[str, Optional[dict]]:
    """(arch, UNet layout for kohya's SGM names or None) of a file to write: from `unet_config` (a UNet's
    config), else what the adapter knows (its model's or its file's), else the metadata and module names."""
    if unet_config is not None:
        cfg = SimpleNamespace(**unet_config) if isinstance(unet_config, dict) else unet_config
        arch, layout = arch_of(SimpleNamespace(config=cfg)), unet_layout(unet_config)
    else:
        arch, layout = getattr(adapter, "arch", ""), getattr(adapter, "layout", None)
        arch = arch or file_arch(metadata, {k: ml.in_width for k, ml in adapter.items()})
    if arch != "sdxl":
        return arch or "sd1", None
    return arch, layout or layout_of(metadata, arch)


def adapter_metadata(adapter: Adapter, facts: Optional[Mapping] = None, unet_config=None) -> dict[str, str]:
    """Every metadata string of a file holding `adapter`: the run's `facts` (training's ss_* / modelspec.* /
    lora_sd.* keys, or those of the file converted or merged), the base's keys (ss_base_model_version, ss_v2,
    modelspec.architecture; SDXL's UNet layout in lora_sd.unet_layout) from the architecture target_naming
    finds, and the network keys (lora_sd.metadata.network_metadata) from the modules the adapter holds:
    whatever `facts` says of the network is replaced. What `train`, `convert` and `merge` write."""
    meta = {str(k): str(v) for k, v in (facts or {}).items() if k not in NETWORK_KEYS}
    arch, layout = target_naming(adapter, meta, unet_config)
    if layout is not None:   # SDXL
        meta[LAYOUT_KEY] = json.dumps(layout, sort_keys=True)
    meta.update(base_metadata(arch, prediction_type_of(meta)))
    meta.update(network_metadata(_text_model_names(adapter)))
    return meta


def write_adapter(path, adapter: Adapter, fmt: str, facts: Optional[Mapping] = None,
                  dtype: torch.dtype = torch.float32, unet_config=None) -> None:
    """Write `adapter` as a kohya or diffusers file with adapter_metadata(adapter, facts, unet_config). SDXL
    (by `unet_config`, the adapter's model or file, or the metadata): kohya's SGM names."""
    meta = adapter_metadata(adapter, facts, unet_config)
    _, layout = target_naming(adapter, meta, unet_config)
    adapter = _text_model_names(adapter)   # text encoders named as kohya, ComfyUI, A1111 and diffusers' files do
    arch = file_arch(meta, {})   # what adapter_metadata recorded
    if fmt == KOHYA and arch in MMDIT_ARCHS:
        sd, fused = to_native_kohya(adapter, arch, dtype)
        if fused:
            meta[FUSED_RANKS] = json.dumps(fused, sort_keys=True)
    elif fmt == KOHYA:
        sd = to_kohya(adapter, dtype, layout)
    elif fmt == DIFFUSERS:
        sd, dmeta = to_diffusers(adapter, dtype)
        meta.update(dmeta)
    else:
        raise ValueError(f"unknown adapter format {fmt!r} (kohya or diffusers)")
    adapter_files.refuse_non_finite(sd, f"{path} (as {dtype})")   # e.g. fp16 overflow
    atomic_save_safetensors(path, sd, meta)


MERGED_ADAPTERS = "merged_adapters.json"   # in a merged pipeline's folder: each adapter folded in, with its metadata


def file_metadata(path, components: Optional[dict[str, nn.Module]] = None) -> dict[str, str]:
    """adapter_metadata of the adapter a file holds, with the file's run facts (what `merge` records)."""
    adapter, metadata, _ = read_adapter(path, components)
    return adapter_metadata(adapter, run_facts(metadata))


def run_facts(metadata: Mapping[str, str]) -> dict[str, str]:
    """The keys of a file's metadata that a converted or merged copy carries over (ss_*, modelspec.*,
    lora_sd.*; adapter_metadata rewrites the network and base keys among them)."""
    return {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.", "lora_sd."))}


def _write(dst, f: AdapterFile, to: str, dtype: Optional[torch.dtype], unet_config=None) -> dict:
    write_adapter(dst, f.adapter, to, run_facts(f.metadata), dtype or f.dtype, unet_config)
    return {"modules": len(f.adapter)}


def write_kohya(dst, f: AdapterFile, dtype: Optional[torch.dtype] = None, unet_config=None) -> dict:
    return _write(dst, f, KOHYA, dtype, unet_config)


def write_diffusers(dst, f: AdapterFile, dtype: Optional[torch.dtype] = None, unet_config=None) -> dict:
    return _write(dst, f, DIFFUSERS, dtype, unet_config)


def convert(src, dst, to: str, dtype: Optional[torch.dtype] = None, unet_config=None) -> dict:
    """kohya <-> diffusers through lora_core's converter registry. SDXL files keep their UNet layout
    (recorded, else the released SDXL's); `unet_config` (a UNet's config) overrides it."""
    return adapter_files.convert(src, dst, to, dtype=dtype, unet_config=unet_config)
