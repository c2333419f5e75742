"""The Stable Diffusion adapter formats, registered with lora_core.adapter_files (no torch here).

kohya:     lora_unet_<path . -> _>.lora_down.weight [r, in] / .lora_up.weight [out, r] / .alpha (0-dim),
           text encoder lora_te_<path>; ΔW = alpha / r · up @ down, no alpha means alpha = r; LoCon
           convs down [r, in, k, k] / up [out, r, 1, 1]; DoRA's magnitude as .dora_scale (LyCORIS).
diffusers: unet.<path>.lora_A.weight / .lora_B.weight (or the older .lora.down/.lora.up; PEFT's own
           save_pretrained of a UNet writes base_model.model.<path>), with r / lora_alpha (and
           rank/alpha patterns) in the `lora_adapter_metadata` JSON; none means alpha = r; DoRA's
           magnitude as .lora_magnitude_vector (PEFT's name).
Here live the naming rules (shared with lora_sd.formats, which reads and writes the tensors) and the
header-only description `lora-sd inspect` and the GUI show.
"""
from __future__ import annotations

import re
from collections import Counter

from lora_core.adapter_files import AdapterFormat, AdapterView, block_names, register

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")   # text_encoder_2: SDXL's second text encoder
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA, DIFFUSERS = "kohya", "diffusers"
KOHYA_KEY = re.compile(r"(lora_(?:unet|te\d?)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)")
DIFFUSERS_KEY = re.compile(
    r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|lora_magnitude_vector)")
PEFT_UNET_PREFIX = "base_model.model."      # PEFT save_pretrained of a UNet
_UNET_TOP = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")

# diffusers / transformers module names that contain "_" (to undo kohya's "." -> "_" without a model)
_COMPOUND = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection",
}


def kohya_name(key: str) -> str:
    """"unet.down_blocks.0...to_q" -> "lora_unet_down_blocks_0_..._to_q"."""
    comp, _, path = key.partition(".")
    return KOHYA_PREFIX[comp] + path.replace(".", "_")


def undo_underscores(flat: str) -> str:
    tokens, parts, i = flat.split("_"), [], 0
    while i < len(tokens):
        for k in (3, 2, 1):
            cand = "_".join(tokens[i:i + k])
            if k == 1 or cand in _COMPOUND:
                parts.append(cand)
                i += k
                break
    return ".".join(parts)


def kohya_key(base: str) -> str:
    """A kohya base name -> "<component>.<module path>" by diffusers' naming rules."""
    for comp, prefix in KOHYA_PREFIX.items():
        if base.startswith(prefix):
            return f"{comp}.{undo_underscores(base[len(prefix):])}"
    m = re.match(r"lora_te(\d)_(.+)", base)   # SDXL's two text encoders
    if m:
        return f"text_encoder{'' if m.group(1) == '1' else '_' + m.group(1)}.{undo_underscores(m.group(2))}"
    raise ValueError(f"{base}: unknown component prefix")


def diffusers_path(key_path: str) -> str:
    """A diffusers/PEFT module path -> "<component>.<path>" (PEFT's base_model.model. is the UNet)."""
    return "unet." + key_path[len(PEFT_UNET_PREFIX):] if key_path.startswith(PEFT_UNET_PREFIX) else key_path


def _pattern_value(patterns: dict, path: str, default):
    for pat, v in patterns.items():
        if path == pat or path.endswith("." + pat):
            return v
    return default


def diffusers_alpha(packed: dict, comp: str, path: str, r: int) -> float:
    """kohya-meaning alpha (ΔW = alpha/r · B A) of one module from diffusers' adapter metadata."""
    alpha = packed.get(f"{comp}.lora_alpha")
    alpha = _pattern_value(packed.get(f"{comp}.alpha_pattern") or {}, path, alpha)
    alpha = float(alpha) if alpha is not None else float(r)   # diffusers: no metadata => alpha = r
    if packed.get(f"{comp}.use_rslora"):
        alpha = alpha * r ** 0.5   # alpha/sqrt(r) == alpha'/r
    return alpha


# ------------------------------------------------------------------ detection
def detect_kohya(view: AdapterView):
    named = [k for k in view.keys if re.match(r"lora_(unet|te\d?)_", k)]
    if not named:
        return False
    if any(k.endswith(".lora_down.weight") for k in named):
        return True
    return (f"kohya-named keys without lora_down/lora_up (LyCORIS LoHa/LoKr or another network; "
            f"e.g. {named[0]}): only LoRA is supported")


def _is_diffusers_path(path: str) -> bool:
    return path.split(".", 1)[0] in COMPONENTS or path.startswith(tuple(PEFT_UNET_PREFIX + t for t in _UNET_TOP))


def detect_diffusers(view: AdapterView) -> bool:
    return any(m and _is_diffusers_path(m.group(1)) for m in map(DIFFUSERS_KEY.fullmatch, view.keys))


# ------------------------------------------------------------------ header-only description
def modules_kohya(view: AdapterView) -> dict[str, tuple[int, float]]:
    """"<component>.<path>" -> (rank, alpha), alpha read from the file's 0-dim tensors."""
    out = {}
    for k in view.keys:
        m = KOHYA_KEY.fullmatch(k)
        if m and m.group(2) == "lora_down.weight":
            base, rank = m.group(1), view.header.shape(k)[0]
            alpha = view.header.scalar(f"{base}.alpha") if f"{base}.alpha" in view.header.tensors else float(rank)
            out[kohya_key(base)] = (rank, alpha)
    return out


def modules_diffusers(view: AdapterView) -> dict[str, tuple[int, float]]:
    packed = view.json_metadata.get(DIFFUSERS_METADATA_KEY) or {}
    out = {}
    for k in view.keys:
        m = DIFFUSERS_KEY.fullmatch(k)
        if m and m.group(2) in ("lora_A.weight", "lora.down.weight"):
            key = diffusers_path(m.group(1))
            comp, _, path = key.partition(".")
            rank = view.header.shape(k)[0]
            out[key] = (rank, diffusers_alpha(packed, comp, path, rank))
    return out


def architecture(view: AdapterView, keys: list[str]) -> str:
    meta = view.metadata
    spec = meta.get("modelspec.architecture", "")
    if meta.get("ss_base_model_version", "").startswith("sdxl") or "-xl-" in spec \
            or any(k.startswith("text_encoder_2.") for k in keys):
        return "sdxl"
    if meta.get("ss_v2") == "True" or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    return "sd1"


def sd_block(key: str) -> str:
    """"unet.down_blocks.1.attentions.0..." -> "unet.down_blocks.1"; "unet.mid_block..." -> "unet.mid_block";
    text encoder keys -> their layer ("text_encoder.text_model.encoder.layers.3")."""
    comp, _, path = key.partition(".")
    parts = path.split(".")
    if comp == "unet":
        return f"unet.{'.'.join(parts[:2] if len(parts) > 1 and parts[1].isdigit() else parts[:1])}"
    return f"{comp}.{block_names([path])[0]}"


def _sd_blocks(keys: list[str]) -> list[str]:
    return sorted({sd_block(k) for k in keys})


def made_for(arch: str, shapes: dict[str, tuple[int, int]]) -> str:
    """The architecture an SD adapter was made for, from its metadata (`arch`: sd1/sd2/sdxl) and the
    shapes of its modules {key: (in, out)}: cross-attention (text) width and the UNet's channels."""
    ctx = sorted({i for k, (i, _) in shapes.items() if re.search(r"attn2\.to_[kv]$", k)})
    chans = sorted({i for k, (i, _) in shapes.items() if k.startswith("unet.") and re.search(r"attn[12]\.to_q$", k)})
    text = sorted({i for k, (i, _) in shapes.items() if k.startswith("text_encoder") and k.endswith("q_proj")})
    guess = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(ctx[0]) if len(ctx) == 1 else None
    parts = [f"cross-attention width {'/'.join(map(str, ctx))}" if ctx else "",
             f"UNet channels {'/'.join(map(str, chans))}" if chans else "",
             f"text encoder width {'/'.join(map(str, text))}" if text else ""]
    label = (guess or "SD (version unknown)") if not arch else arch if not guess or guess == arch else \
        f"{arch} by its metadata, {guess} by its shapes"
    return f"{label} ({'; '.join(p for p in parts if p)})" if any(parts) else label


def describe(view: AdapterView, modules: dict[str, tuple[int, float]]) -> dict:
    keys = sorted(modules)
    by_comp = Counter(k.partition(".")[0] for k in keys)
    leaves = {".".join(p[-2:]) if p[-1].isdigit() else p[-1] for p in (k.split(".") for k in keys)}
    meta = view.metadata
    attention = sorted({m.group(0) for k in keys for m in [re.search(r"attn[12]", k)] if m})
    return {
        "ranks": [r for r, _ in modules.values()], "alphas": [a for _, a in modules.values()],
        "target_modules": keys, "blocks": _sd_blocks(keys), "architecture": architecture(view, keys),
        "base_model": meta.get("ss_sd_model_name") or meta.get("base_model") or meta.get("modelspec.architecture", ""),
        "steps": meta.get("ss_steps", ""), "modules": len(keys), "modules_by_component": dict(by_comp),
        "target_leaves": sorted(leaves), "attention": attention, **variants(view),
    }


def variants(view: AdapterView) -> dict:
    """DoRA (a magnitude per module) and LoCon (k×k conv down weights), from the header alone."""
    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector")) for k in view.keys)
    conv = sum(1 for k in view.keys if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight"))
               and len(view.header.shape(k)) == 4 and view.header.shape(k)[2:] != [1, 1])
    return {"dora": dora, "conv_modules": conv}


_SD = dict(tool="lora-sd", cli="lora_sd.cli", family="sd", commands=("inspect", "convert", "generate", "merge"),
           read="lora_sd.formats:read_view")
register(AdapterFormat(KOHYA, "kohya sd-scripts LoRA (AUTOMATIC1111, ComfyUI, diffusers)", detect=detect_kohya,
                       describe=lambda v: describe(v, modules_kohya(v)), write="lora_sd.formats:write_kohya",
                       priority=20, **_SD))
register(AdapterFormat(DIFFUSERS, "diffusers / PEFT LoRA (load_lora_weights)", detect=detect_diffusers,
                       describe=lambda v: describe(v, modules_diffusers(v)), write="lora_sd.formats:write_diffusers",
                       priority=30, **_SD))
