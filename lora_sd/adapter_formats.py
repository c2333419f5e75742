"""The Stable Diffusion adapter formats, registered with lora_core.adapter_files (no torch here).

kohya:     lora_unet_<path . -> _>.lora_down.weight [r, in] / .lora_up.weight [out, r] / .alpha (0-dim),
           text encoder lora_te_<path>; ΔW = alpha / r · up @ down, no alpha means alpha = r; LoCon
           convs down [r, in, k, k] / up [out, r, 1, 1]; DoRA's magnitude as .dora_scale (LyCORIS).
           SD 2.x: the same names, metadata ss_v2 = True. SDXL: the UNet named in the original SGM layout
           (lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q, middle_block_1, output_blocks_..,
           inside ResNets in_layers_2 / out_layers_3 / emb_layers_1 / skip_connection), the text encoders
           lora_te1_ / lora_te2_, ss_base_model_version = sdxl_base_v1-0. Mapping SGM <-> diffusers
           names needs the UNet's block layout: we record it as `lora_sd.unet_layout` (JSON); files of
           other tools have none, and then the released SDXL (or SD 1.x/2.x) layout is assumed.
diffusers: unet.<path>.lora_A.weight / .lora_B.weight (or the older .lora.down/.lora.up; PEFT's own
           save_pretrained of a UNet writes base_model.model.<path>), with r / lora_alpha (and
           rank/alpha patterns) in the `lora_adapter_metadata` JSON; none means alpha = r; DoRA's
           magnitude as .lora_magnitude_vector (PEFT's name). SDXL adds text_encoder_2.<path>.
SD 3.x / Flux (the MMDiT transformers): diffusers' transformer.<path> (text_encoder_3.: SD 3's T5) and
           kohya's native names of lora_sd.mmdit_names (lora_unet_joint_blocks_..., lora_te1_/te2_/te3_).
Here live the naming rules (shared with lora_sd.formats, which reads and writes the tensors) and the
header-only description `lora-sd inspect` and the GUI show.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional

from lora_core.adapter_files import AdapterFormat, AdapterView, block_names, read_header, register
from lora_core.config import LYCORIS_FACTORS
from lora_core.errors import LoraLoadError
from lora_sd.metadata import FUSED_RANKS
from lora_sd import mmdit_names
from lora_sd.unet_names import RESNET, to_diffusers, to_original

COMPONENTS = ("unet", "text_encoder", "text_encoder_2",   # text_encoder_2: SDXL's second text encoder
              "transformer", "text_encoder_3")             # SD 3.x / Flux (lora_sd.mmdit_names); T5: SD 3's 3rd
# kohya's module-name prefixes, (prefix, component): the one table (the GUI reads it too)
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                  ("lora_te2_", "text_encoder_2"))
# the prefix each component is written with: SD 1.x/2.x a component's first (lora_te_), SDXL its last (lora_te1_)
KOHYA_PREFIX = {c: p for p, c in reversed(KOHYA_PREFIXES)}
SDXL_PREFIX = {c: p for p, c in KOHYA_PREFIXES}
SDXL_TEXT_PREFIXES = tuple(p for c, p in SDXL_PREFIX.items() if c != "unet")   # names only SDXL files use
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KOHYA, DIFFUSERS = "kohya", "diffusers"
KOHYA_KEY = re.compile(r"(lora_(?:unet|te\d?)_.+?)\.(lora_down\.weight|lora_up\.weight|alpha|dora_scale)")
# LyCORIS' tensors in kohya files (lycoris.kohya) are lora_core.variants' parameter names (LYCORIS_FACTORS, per
# type), and `diff`, the whole weight difference of LyCORIS' `full` module (how we write a trained OFT: docs/sd.md);
# alpha and dora_scale are KOHYA_KEY's.
FULL_DIFF = "diff"
# LyCORIS tensors of layouts we read no adapter from: {tensor: why}
LYCORIS_UNSUPPORTED = {
    "hada_t1": "Tucker LoHa (hada_t1/hada_t2) is not supported", "hada_t2": "Tucker LoHa (hada_t1/hada_t2) is not supported",
    "lokr_t1": "Tucker LoKr (lokr_t2) is not supported", "lokr_t2": "Tucker LoKr (lokr_t2) is not supported",
    "oft_blocks": "LyCORIS/kohya OFT (oft_blocks) rotates blocks of the output; lora.type = oft is PEFT's, which "
                  "rotates the input: the two cannot be converted", "rescale": "LyCORIS OFT (rescale) is not supported",
    "oft_diag": "LyCORIS OFT (oft_diag) is not supported",
    "diff_b": "a bias difference (diff_b, LyCORIS' full module) is not supported: only the weight's (diff)",
}
LYCORIS_KEY = re.compile(r"(lora_(?:unet|te\d?)_.+?)\.("
                         + "|".join(n for names in (*LYCORIS_FACTORS.values(), [FULL_DIFF], LYCORIS_UNSUPPORTED) for n in names) + ")")
DIFFUSERS_KEY = re.compile(
    r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|lora_magnitude_vector(?:\.weight)?)")
PEFT_UNET_PREFIX = "base_model.model."      # PEFT save_pretrained of a UNet
_UNET_TOP = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")
LAYOUT_KEY = "lora_sd.unet_layout"
# the UNet block layouts of the released models, assumed for SGM-named files that do not record theirs
_LAYOUT_FIELDS = ("down_block_types", "up_block_types", "layers_per_block")
SDXL_LAYOUT = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
SD_LAYOUT = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "layers_per_block": 2}
_SGM_TOP = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
_SGM_RESNET = re.compile(r"((?:input_blocks\.\d+|output_blocks\.\d+)\.0|middle_block\.[02])\.("
                         + "|".join(re.escape(v) for v in RESNET.values()) + ")")

# diffusers / transformers module names that contain "_" (to undo kohya's "." -> "_" without a model)
_COMPOUND = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "text_projection",
    # the original SGM / LDM UNet (kohya's SDXL names)
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    "wi_0", "wi_1",   # T5's gated feed-forward (SD 3, Flux)
}


# ------------------------------------------------------------------ SGM <-> diffusers UNet names
def unet_layout(cfg: Mapping) -> dict:
    """The block layout (what the SGM <-> diffusers name map needs) of a UNet config."""
    lpb = cfg.get("layers_per_block", 2)
    return {"down_block_types": list(cfg["down_block_types"]), "up_block_types": list(cfg["up_block_types"]),
            "layers_per_block": list(lpb) if isinstance(lpb, (list, tuple)) else int(lpb)}


def layout_of(metadata: Mapping[str, str], arch: str) -> dict:
    """The UNet layout a file records (`lora_sd.unet_layout`), else the released model's of `arch`."""
    raw = metadata.get(LAYOUT_KEY)
    if not raw:
        return SDXL_LAYOUT if arch == "sdxl" else SD_LAYOUT
    try:
        return unet_layout(json.loads(raw))
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"metadata {LAYOUT_KEY} = {raw[:80]!r} is not a UNet block layout (JSON with "
                         f"{', '.join(_LAYOUT_FIELDS)}); remove it to assume the released model's") from None


def to_sgm(path: str, layout: Mapping) -> str:
    """A diffusers UNet module path -> the SGM one ('down_blocks.1.attentions.0.proj_in' -> 'input_blocks.4.1.proj_in')."""
    orig = to_original(path, layout)
    head, _, leaf = orig.rpartition(".")
    return f"{head}.{RESNET[leaf]}" if ".resnets." in f".{path}" and leaf in RESNET else orig


def from_sgm(path: str, layout: Mapping) -> str:
    """The inverse of to_sgm; KeyError for a name outside the layout's blocks."""
    m = _SGM_RESNET.fullmatch(path)
    if m:
        path = f"{m.group(1)}.{next(d for d, o in RESNET.items() if o == m.group(2))}"
    return to_diffusers(path, layout)


def is_sgm(path: str) -> bool:
    return path.startswith(_SGM_TOP)


# ------------------------------------------------------------------ kohya names
def kohya_name(key: str, layout: Optional[Mapping] = None) -> str:
    """"unet.down_blocks.0...to_q" -> "lora_unet_down_blocks_0_..._to_q" (SD 1.x/2.x); with the UNet's
    `layout`, kohya's SDXL name ("lora_unet_input_blocks_4_1_..._to_q", text encoders lora_te1_/lora_te2_)."""
    comp, _, path = key.partition(".")
    if layout is None:
        return KOHYA_PREFIX[comp] + path.replace(".", "_")
    return SDXL_PREFIX[comp] + (to_sgm(path, layout) if comp == "unet" else path).replace(".", "_")


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


def kohya_key(base: str, layout: Optional[Mapping] = None) -> str:
    """A kohya base name -> "<component>.<module path>" by diffusers' naming rules; SGM-named UNet
    modules through `layout` (default: the released SDXL's)."""
    for prefix, comp in KOHYA_PREFIXES:
        if base.startswith(prefix):
            path = undo_underscores(base[len(prefix):])
            if comp == "unet" and is_sgm(path):
                try:
                    path = from_sgm(path, layout or SDXL_LAYOUT)
                except KeyError:
                    raise ValueError(f"{base}: {path} is no module of this UNet layout "
                                     f"({json.dumps(layout or SDXL_LAYOUT)})") from None
            return f"{comp}.{path}"
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
EMB_KEY = "emb_params"   # the one tensor of a kohya / AUTOMATIC1111 textual-inversion file (lora_sd.embeddings)
WORD_KEY = "lora_sd.token"      # its metadata: the word the vector was trained for
SIBLING_SUFFIX = "_emb.safetensors"   # a run's <name>.safetensors adapter has its embedding in <name>_emb.safetensors


def embedding_path(adapter_file) -> Path:
    """Where [embedding] training writes the word embedding of an adapter file: <name>_emb.safetensors beside it
    (torch-free: the GUI shows which adapters bring one)."""
    p = Path(adapter_file)
    return p.with_name(p.stem + SIBLING_SUFFIX)


def word_of(key: str, metadata: Mapping[str, str], path) -> str:
    """The word of a one-vector textual-inversion file whose tensor is `key`: {"emb_params"} names it in our
    metadata, else by the file name (as AUTOMATIC1111 names embeddings); diffusers' {word: vector} by its key."""
    return (metadata.get(WORD_KEY) or Path(path).stem) if key == EMB_KEY else key


def embedding_word(path) -> str:
    """The word a textual-inversion file is for, from its header (torch-free)."""
    header = read_header(path)
    if len(header.tensors) != 1:
        raise LoraLoadError(f"{path}: expected one tensor ({EMB_KEY!r} or the word) in a word embedding, "
                            f"found {len(header.tensors)}")
    return word_of(next(iter(header.tensors)), header.metadata, path)


def embeddings_used(adapters, skip=(), prefer=()) -> list[Path]:
    """The adapter files (resolved) whose own word embedding (<name>_emb.safetensors) loads with them: every one
    that has one, except those in `skip` (--skip-embedding); when several bring an embedding for the same word,
    only the one in `prefer` (--embedding-from). Two for one word without a pick, or two picks for one word, are
    refused in one line (a word reads one vector)."""
    files = [Path(a).resolve() for a in adapters]
    skip, prefer = {Path(p).resolve() for p in skip}, {Path(p).resolve() for p in prefer}
    for flag, given in (("--skip-embedding", skip), ("--embedding-from", prefer)):
        if given - set(files):
            raise LoraLoadError(f"{flag} {sorted(map(str, given - set(files)))[0]}: not one of the --lora files")
    for f in sorted(prefer):
        if f in skip:
            raise LoraLoadError(f"--embedding-from {f}: also given to --skip-embedding; give it to one of them")
        if not embedding_path(f).is_file():
            raise LoraLoadError(f"--embedding-from {f}: it has no word embedding ({embedding_path(f).name} beside "
                                "it); pick an adapter trained with [embedding]")
    by_word: dict[str, list[Path]] = {}
    for f in files:
        if f not in skip and embedding_path(f).is_file() and embedding_path(f) != f:
            by_word.setdefault(embedding_word(embedding_path(f)), []).append(f)
    keep = set()
    for word, group in by_word.items():
        chosen = [f for f in group if f in prefer]
        if len(chosen) > 1 or not chosen and len(group) > 1:
            how = ("give --embedding-from only one of them" if chosen else
                   "pick the one it uses with --embedding-from FILE, or leave one out with --skip-embedding FILE")
            a, b = (chosen or group)[:2]
            raise LoraLoadError(f"{a} and {b} both bring a word embedding for {word!r}; {how}")
        keep.add((chosen or group)[0])
    return [f for f in files if f in keep]


NOT_A_LORA_EMBEDDING = ("a textual-inversion embedding, not a LoRA: load it with `lora-sd generate --embedding FILE` "
                        "(a run's <name>_emb.safetensors also loads with its <name>.safetensors adapter)")


def detect_kohya(view: AdapterView):
    named = [k for k in view.keys if re.match(r"lora_(unet|te\d?)_", k)]
    if view.keys == [EMB_KEY] or any(k.startswith("string_to_param") for k in view.keys):
        return NOT_A_LORA_EMBEDDING
    if not named:
        return False
    if any(k.endswith(".lora_down.weight") or LYCORIS_KEY.fullmatch(k) for k in named):
        return True
    return (f"kohya-named keys without lora_down/lora_up or LyCORIS' LoHa/LoKr/full tensors (another network; "
            f"e.g. {named[0]}): LoRA, DoRA, LoCon, LoHa, LoKr and full weight differences are supported")


def lycoris_shape(shapes: Mapping[str, tuple], alpha: Optional[float]) -> tuple[str, int, float, int, int]:
    """(type, rank, alpha, out, fan_in) of one module from its LyCORIS tensors' shapes {tensor name: shape} and
    its file alpha (None: absent). fan_in is in·kh·kw. As LyCORIS and ComfyUI read them: ΔW scales by alpha/rank
    (no or zero alpha: alpha = rank); a LoKr whose two factors are both full scales by 1, so its rank and alpha
    are both given as the file's alpha (rounded, at least 1). LoKr: w1 (a, c) ⊗ w2 (b, d[·kh·kw]) -> out a·b,
    fan_in c·d·kh·kw. A full weight difference (`diff`, the weight's shape) scales by 1: rank and alpha are both
    min(out, fan_in), its rank as a matrix at most. ValueError (one line) for a missing tensor."""
    def two(name: str) -> tuple[int, int]:
        if name in shapes:
            s = tuple(shapes[name])
            return s[0], math.prod(s[1:])
        if name + "_a" not in shapes or name + "_b" not in shapes:
            raise ValueError(f"LoKr with neither {name} nor {name}_a/{name}_b")
        return shapes[name + "_a"][0], shapes[name + "_b"][1]

    if FULL_DIFF in shapes:
        out, fan_in = shapes[FULL_DIFF][0], math.prod(shapes[FULL_DIFF][1:])
        return "full", min(out, fan_in), float(min(out, fan_in)), out, fan_in
    if "hada_w1_a" in shapes or "hada_w2_a" in shapes:
        missing = [n for n in LYCORIS_FACTORS["loha"] if n not in shapes]
        if missing:
            raise ValueError(f"LoHa without {', '.join(missing)}")
        kind, rank, out, fan_in = "loha", shapes["hada_w1_b"][0], shapes["hada_w1_a"][0], shapes["hada_w1_b"][1]
    else:
        (a, c), (b, d) = two("lokr_w1"), two("lokr_w2")
        ranks = [shapes[n][1] for n in ("lokr_w1_a", "lokr_w2_a") if n in shapes]
        if not ranks:   # both factors full: scale 1
            rank = max(1, round(alpha or 1))
            return "lokr", rank, float(rank), a * b, c * d
        kind, rank, out, fan_in = "lokr", ranks[0], a * b, c * d
    return kind, rank, float(alpha) if alpha else float(rank), out, fan_in


def _is_diffusers_path(path: str) -> bool:
    comp, _, rest = path.partition(".")
    if comp == "transformer":   # an MMDiT's modules, not another model's `transformer.` (GPT-2's transformer.h.)
        return rest.startswith(mmdit_names.TRANSFORMER_TOP)
    return comp in COMPONENTS or path.startswith(tuple(PEFT_UNET_PREFIX + t for t in _UNET_TOP))


def detect_diffusers(view: AdapterView) -> bool:
    return any(m and _is_diffusers_path(m.group(1)) for m in map(DIFFUSERS_KEY.fullmatch, view.keys))


# ------------------------------------------------------------------ architecture and layout of a file
_SGM_KOHYA = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|label_emb|time_embed|out)_\d")


def file_arch(metadata: Mapping[str, str], widths: Mapping[str, int]) -> str:
    """sd1 / sd2 / sdxl of an adapter file; `widths`: {module name as the file spells it (kohya base name
    or "<component>.<path>"): its input width}. SDXL's own names (lora_te1_/lora_te2_, text_encoder_2.)
    first, then the metadata (ss_base_model_version, ss_v2, modelspec.architecture), then SGM-named UNet
    modules (kohya's SDXL), then the cross-attention width (1024: SD 2.x, 2048: SDXL); else sd1. The
    MMDiT families (sd3, flux) before all: lora_sd.mmdit_names.file_arch."""
    mmdit = mmdit_names.file_arch(metadata, widths)
    if mmdit:
        return mmdit
    ver, spec = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
    if ver.startswith("sdxl") or "-xl-" in spec or any(
            n.startswith((*SDXL_TEXT_PREFIXES, "text_encoder_2.")) for n in widths):
        return "sdxl"
    if metadata.get("ss_v2") == "True" or ver.startswith("sd_v2") or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if ver.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return "sd1"
    if any(_SGM_KOHYA.match(n) for n in widths):
        return "sdxl"
    ctx = {w for n, w in widths.items() if re.search(r"attn2[._]to_k$", n)}
    return {1024: "sd2", 2048: "sdxl"}.get(ctx.pop(), "sd1") if len(ctx) == 1 else "sd1"


def known_layout(metadata: Mapping[str, str], arch: str, names) -> Optional[dict]:
    """The UNet layout of a file when it is known (recorded, SDXL, or SGM names of the released
    model), else None (SD 1.x/2.x files name their modules the diffusers way and record none)."""
    if LAYOUT_KEY in metadata or arch == "sdxl" or any(_SGM_KOHYA.match(n) for n in names):
        return layout_of(metadata, arch)
    return None


# ------------------------------------------------------------------ header-only description
Modules = dict[str, tuple[int, float]]   # "<component>.<path>" -> (rank, alpha)


def lycoris_parts(keys) -> dict[str, dict[str, str]]:
    """{base name: {LyCORIS tensor name: key}} of the LoHa / LoKr / full (and unsupported LyCORIS) tensors among `keys`."""
    out: dict[str, dict[str, str]] = {}
    for k in keys:
        m = LYCORIS_KEY.fullmatch(k)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = k
    return out


def modules_kohya(view: AdapterView) -> tuple[Modules, str, Optional[dict]]:
    """(modules, architecture, UNet layout or None); alpha read from the file's 0-dim tensors."""
    def alpha(base: str) -> Optional[float]:
        return view.header.scalar(f"{base}.alpha") if f"{base}.alpha" in view.header.tensors else None

    downs = {m.group(1): k for k in view.keys for m in [KOHYA_KEY.fullmatch(k)] if m and m.group(2) == "lora_down.weight"}
    lyco = {}
    for base, parts in lycoris_parts(view.keys).items():
        bad = [LYCORIS_UNSUPPORTED[n] for n in parts if n in LYCORIS_UNSUPPORTED]
        if not bad:
            with contextlib.suppress(ValueError):   # inspect describes what it can read
                lyco[base] = lycoris_shape({n: view.header.shape(k) for n, k in parts.items()}, alpha(base))
    widths = {b: view.header.shape(k)[1] for b, k in downs.items()} | {b: v[4] for b, v in lyco.items()}
    arch = file_arch(view.metadata, widths)
    if arch in mmdit_names.MMDIT_ARCHS:
        return modules_native(view, downs, arch), arch, None
    layout = layout_of(view.metadata, arch)
    out = {}
    for base, k in downs.items():
        rank = view.header.shape(k)[0]
        out[kohya_key(base, layout)] = (rank, alpha(base) if alpha(base) is not None else float(rank))
    out.update({kohya_key(base, layout): (rank, a) for base, (_, rank, a, _, _) in lyco.items()})
    return out, arch, known_layout(view.metadata, arch, widths)


def native_split(arch: str, base: str, in_features: int,
                 out_features: Optional[int] = None) -> dict[str, Optional[int]]:
    """{"<component>.<path>": output width} of the modules a kohya-named SD 3.x / Flux module holds, in
    order (a fused one's parts by mmdit_names.part_widths); KeyError when `arch` has no such module,
    ValueError when `out_features` does not fit its parts."""
    if base.startswith(mmdit_names.NATIVE_UNET):
        group = mmdit_names.group_of(arch, base[len(mmdit_names.NATIVE_UNET):])
        widths = mmdit_names.part_widths(group, in_features, out_features) if len(group.parts) > 1 else [out_features]
        return {f"transformer.{p}": w for p, w in zip(group.parts, widths)}
    comp, flat = mmdit_names.text_component(arch, base)
    return {f"{comp}.{undo_underscores(flat)}": out_features}


def modules_native(view: AdapterView, downs: dict[str, str], arch: str) -> Modules:
    """The modules of an SD 3.x / Flux kohya file by diffusers' names, from its header: a fused native
    module's parts at the ranks our files record (lora_sd.fused_ranks), else each at an equal share of its
    rank (the block layout kohya writes; the exact ranks need the tensors: `convert` or a load report)."""
    fused = view.json_metadata.get(FUSED_RANKS) or {}
    out = {}
    for base, k in downs.items():
        rank, in_features = view.header.shape(k)[:2]
        alpha = view.header.scalar(f"{base}.alpha") if f"{base}.alpha" in view.header.tensors else float(rank)
        try:
            paths = list(native_split(arch, base, in_features))
        except KeyError:
            raise LoraLoadError(f"{view.path}: {base} is no module of {arch} as kohya names it") from None
        share = rank // len(paths) if rank % len(paths) == 0 else rank
        ranks = fused.get(base) or [share] * len(paths)
        out.update({p: (r, alpha * r / rank) for p, r in zip(paths, ranks) if r})
    return out


def modules_diffusers(view: AdapterView) -> tuple[Modules, str, Optional[dict]]:
    packed = view.json_metadata.get(DIFFUSERS_METADATA_KEY) or {}
    out, widths = {}, {}
    for k in view.keys:
        m = DIFFUSERS_KEY.fullmatch(k)
        if m and m.group(2) in ("lora_A.weight", "lora.down.weight"):
            key = diffusers_path(m.group(1))
            comp, _, path = key.partition(".")
            rank, widths[key] = view.header.shape(k)[:2]
            out[key] = (rank, diffusers_alpha(packed, comp, path, rank))
    arch = file_arch(view.metadata, widths)
    return out, arch, known_layout(view.metadata, arch, ())


def sd_block(key: str) -> str:
    """"unet.down_blocks.1.attentions.0..." -> "unet.down_blocks.1"; "unet.mid_block..." -> "unet.mid_block";
    text encoder keys -> their layer ("text_encoder.text_model.encoder.layers.3")."""
    comp, _, path = key.partition(".")
    parts = path.split(".")
    if comp == "unet":
        return f"unet.{'.'.join(parts[:2] if len(parts) > 1 and parts[1].isdigit() else parts[:1])}"
    return f"{comp}.{block_names([path])[0]}"


def sgm_block(key: str, layout: Mapping) -> str:
    """A UNet key's block in the original SGM layout ("unet.input_blocks.4.1"); sd_block's name for a
    module outside the layout's blocks."""
    try:
        parts = to_sgm(key.partition(".")[2], layout).split(".")
    except KeyError:
        return sd_block(key)
    return "unet." + ".".join(parts[:3] if parts[0] in ("input_blocks", "output_blocks") else parts[:2])


def _sorted_blocks(blocks) -> list[str]:
    return sorted(set(blocks), key=lambda b: re.sub(r"\d+", lambda m: m.group(0).zfill(4), b))


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


def describe(view: AdapterView, modules: Modules, arch: str, layout: Optional[dict]) -> dict:
    """inspect's SD fields; `blocks` in diffusers' terms, `blocks_original` the UNet's in the SGM layout's
    (when the file's UNet layout is known: SDXL, or recorded)."""
    keys = sorted(modules)
    by_comp = Counter(k.partition(".")[0] for k in keys)
    leaves = {".".join(p[-2:]) if p[-1].isdigit() else p[-1] for p in (k.split(".") for k in keys)}
    meta = view.metadata
    attention = sorted({m.group(0) for k in keys for m in [re.search(r"attn[12]", k)] if m})
    return {
        "ranks": [r for r, _ in modules.values()], "alphas": [a for _, a in modules.values()],
        "target_modules": keys, "blocks": sorted({sd_block(k) for k in keys}), "architecture": arch,
        "blocks_original": _sorted_blocks(sgm_block(k, layout) for k in keys if k.startswith("unet.")) if layout else [],
        "base_model": meta.get("ss_sd_model_name") or meta.get("base_model") or meta.get("modelspec.architecture", ""),
        "steps": meta.get("ss_steps", ""), "modules": len(keys), "modules_by_component": dict(by_comp),
        "target_leaves": sorted(leaves), "attention": attention, **variants(view),
        "streams": dict(Counter(mmdit_names.stream(k.partition(".")[2]) for k in keys if k.startswith("transformer."))),
    }


def variants(view: AdapterView) -> dict:
    """DoRA (a magnitude per module), LoCon (k×k conv down weights) and the adapter types of the modules
    ({lora / loha / lokr / oft...: count}, LyCORIS' tensor names), from the header alone."""
    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")) for k in view.keys)
    conv = sum(1 for k in view.keys if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight"))
               and len(view.header.shape(k)) == 4 and view.header.shape(k)[2:] != [1, 1])
    types = Counter(lycoris_type(parts) for parts in lycoris_parts(view.keys).values())
    lora = sum(1 for k in view.keys if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight")))
    if lora or not types:
        types["lora"] = lora
    return {"dora": dora, "conv_modules": conv, "adapter_types": dict(sorted(types.items()))}


def lycoris_type(parts) -> str:
    """loha / lokr / oft (LyCORIS' OFT) / full (a whole weight difference) / other of one module's LyCORIS tensor names."""
    names = set(parts)
    if FULL_DIFF in names:
        return "full"
    return "loha" if names & {"hada_w1_a", "hada_w2_a"} else "lokr" if any(n.startswith("lokr_") for n in names) \
        else "oft" if names & {"oft_blocks", "oft_diag"} else "other"


_SD = dict(tool="lora-sd", cli="lora_sd.cli", family="sd", commands=("inspect", "convert", "generate", "merge"),
           read="lora_sd.formats:read_view")
register(AdapterFormat(KOHYA, "kohya sd-scripts LoRA (AUTOMATIC1111, ComfyUI, diffusers)", detect=detect_kohya,
                       describe=lambda v: describe(v, *modules_kohya(v)), write="lora_sd.formats:write_kohya",
                       priority=20, **_SD))
register(AdapterFormat(DIFFUSERS, "diffusers / PEFT LoRA (load_lora_weights)", detect=detect_diffusers,
                       describe=lambda v: describe(v, *modules_diffusers(v)), write="lora_sd.formats:write_diffusers",
                       priority=30, **_SD))
