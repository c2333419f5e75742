"""Single-file Stable Diffusion checkpoints: the one .safetensors / .ckpt file of AUTOMATIC1111, ComfyUI
and model-sharing sites, in the original LDM (SD 1.x / 2.x) or SGM (SDXL) key layout.

- `detect_checkpoint(path) -> (arch, reason)`: sd1 / sd2 / sdxl from the keys and shapes, torch-free
  (a .safetensors header; a .ckpt's pickle is scanned as opcodes, never run), so the GUI can show it.
- `model_arch(pretrained)`: the same for any model.pretrained value (tiny name, folder, file), torch-free.
- `config_source(...)`: the component configs a file is loaded with, in this order: `config` (a diffusers
  folder or hub id), the file's own metadata (files lora_sd wrote), or the real models' configs shipped in
  lora_sd/model_configs (SD 1.5, SD 2.1 base / 768-v, SDXL base).
lora_sd.models builds pipelines from these (load_single_file) and writes them (save_single_file).

One name map serves both directions: for each diffusers parameter, the original key and how the tensor
differs there ("T": transposed; "conv": a 1x1 conv weight; ("fused", i, widths): part i of a fused linear such
as OpenCLIP's in_proj; "swap": adaLN halves exchanged). SD 3.x / Flux transformer names come from
lora_sd.mmdit_names, the one home of the native MMDiT names (adapter files use it too).
.ckpt files are read with torch.load(weights_only=True) only.
"""
from __future__ import annotations

import json
import logging
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

from huggingface_hub import snapshot_download

from lora_core.adapter_files import read_header
from lora_core.cli_errors import check_local_path, hub_error, one_line
from lora_core.errors import LoraLoadError, ModelLoadError

from . import mmdit_names
from .config import TINY_ARCHS, TINY_PRETRAINED

from .unet_names import RESNET, to_original

log = logging.getLogger("lora_sd")

CONFIG_DIR = Path(__file__).with_name("model_configs")
META_CONFIGS = "lora_sd.configs"          # JSON: {"arch", component configs, "pad_tokens", "index"}
META_RANDOM = "lora_sd.random_weights"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
# component -> (original prefix, layout), per architecture
LAYOUT = {
    "sd1": {"unet": (UNET, "unet"), "vae": (VAE, "vae"),
            "text_encoder": ("cond_stage_model.transformer.text_model.", "clip")},
    "sd2": {"unet": (UNET, "unet"), "vae": (VAE, "vae"), "text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"unet": (UNET, "unet"), "vae": (VAE, "vae"),
             "text_encoder": ("conditioner.embedders.0.transformer.text_model.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
}
LAYOUT["sd3"] = {"transformer": (UNET, "mmdit"), "vae": (VAE, "vae"),
                 "text_encoder": ("text_encoders.clip_l.transformer.", "hfclip_l"),
                 "text_encoder_2": ("text_encoders.clip_g.transformer.", "hfclip"),
                 "text_encoder_3": ("text_encoders.t5xxl.transformer.", "t5")}
# Flux: ComfyUI's checkpoint layout (BFL's own transformer file has no prefix: read as if it had one)
LAYOUT["flux"] = {"transformer": (UNET, "mmdit"), "vae": ("vae.", "vae"),
                  "text_encoder": ("text_encoders.clip_l.transformer.", "hfclip_l"),
                  "text_encoder_2": ("text_encoders.t5xxl.transformer.", "t5")}
TITLE = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
         "sd3": "Stable Diffusion 3.5", "flux": "FLUX.1"}
MMDIT_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}   # transformer architectures: the file may hold the transformer alone
MMDIT = tuple(MMDIT_CLASS)
DIFFUSERS_PARTS = ("unet", "vae", "transformer")     # components whose name map reads their diffusers config
# keys real checkpoints carry that diffusers models do not: skipped without a warning
HARMLESS = re.compile(r"(position_ids|logit_scale|attn_mask)$|^cond_stage_model\.model\.(text_projection$|"
                       r"transformer\.resblocks\.23\.)|^text_encoders\.clip_l\.transformer\.text_projection\.")


# ------------------------------------------------------------------ the name map
def _unet_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    orig = to_original(key, cfg)
    if ".resnets." in key:      # block prefixes come from unet_names; ResNet internals are renamed here
        head, inner, leaf = orig.rsplit(".", 2)
        orig = f"{head}.{RESNET[inner]}.{leaf}"
    return orig, None


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    n_up = len(cfg["up_block_types"])
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
    k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", k)
    k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
    m = re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
    if m:
        how = "conv" if m[2] != "group_norm" and m[3] == "weight" else None
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", how
    return k, None


def _clip_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    return key.removeprefix("text_model."), None     # the prefix holds text_model. (flat or not in transformers)


_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _openclip_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    k = key.removeprefix("text_model.")
    if k in _OPENCLIP_FIXED:
        return _OPENCLIP_FIXED[k], None
    if k == "text_projection.weight":
        return "text_projection", "T"        # OpenCLIP multiplies x @ P: the transpose of nn.Linear's weight
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k)
    if m is None:
        raise KeyError(key)
    block = f"transformer.resblocks.{m[1]}."
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj", m[2])
    if qkv:                                    # q, k, v are one fused in_proj in OpenCLIP
        return f"{block}attn.in_proj_{m[3]}", ("fused", "qkv".index(qkv[1]), (1, 1, 1))
    return f"{block}{_OPENCLIP_LAYER[m[2]]}.{m[3]}", None


def _hfclip_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    """SD 3.5's CLIP encoders in transformers' own layout (text_model.*, text_projection)."""
    return (key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key), None


def _hfclip_l_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    """CLIP-L of SD 3.5: its pooled output is used unprojected (the reference code's
    return_projected_pooled=False; diffusers' converter sets the projection to the identity): the file may
    leave text_projection out ("eye": the identity when absent)."""
    orig, _ = _hfclip_name(key, cfg)
    return orig, ("eye" if key == "text_projection.weight" else None)


def _t5_name(key: str, cfg: Mapping) -> tuple[str, Any]:
    """T5 in transformers' layout. The encoder's token embedding is the shared one: files hold both keys,
    a file with shared.weight alone is read too ("shared": that key when this one is absent)."""
    return key, ("shared" if key == "encoder.embed_tokens.weight" else None)


def fallback_key(orig: str, how) -> Optional[str]:
    """The key a tensor absent from a file is read from instead (T5's tied embedding), else None."""
    return orig.replace("encoder.embed_tokens.weight", "shared.weight") if how == "shared" else None


def _mmdit_name(arch: str, key: str, state: Mapping, cfg: Mapping) -> tuple[str, Any]:
    """An SD 3.x / Flux transformer parameter's original key (lora_sd.mmdit_names, the home of the native
    names): a part of a fused linear is ("fused", part, widths); an adaLN linear whose (shift, scale)
    halves the original stores the other way round is "swap" (by its output width: its input is the
    transformer's inner width)."""
    orig, group, j = mmdit_names.checkpoint_param(arch, key)
    if len(group.parts) > 1:
        return orig, ("fused", j, group.widths)
    if group.swap:
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return orig, ("swap" if mmdit_names.swapped(group, inner, state[key].shape[0]) else None)
    return orig, None


_NAMERS = {"unet": _unet_name, "vae": _vae_name, "clip": _clip_name, "openclip": _openclip_name,
           "hfclip": _hfclip_name, "hfclip_l": _hfclip_l_name, "t5": _t5_name}


def name_map(arch: str, component: str, state: Mapping, cfg: Mapping) -> dict[str, tuple[str, Any]]:
    """{diffusers key: (original key, how)} for the state dict (name -> tensor, meta ones too) of one component."""
    prefix, layout = LAYOUT[arch][component]
    out = {}
    for k in state:
        orig, how = _mmdit_name(arch, k, state, cfg) if layout == "mmdit" else _NAMERS[layout](k, cfg)
        out[k] = (prefix + orig, how)
    return out


def from_original(tensor, how):
    """The diffusers tensor from the original one (("fused", i, widths): part i of the rows, split in
    proportion to the parts' widths)."""
    if how == "swap":                       # the two halves exchanged (its own inverse)
        return tensor.roll(tensor.shape[0] // 2, dims=0)
    if how == "T":
        return tensor.T
    if how == "conv":
        return tensor.reshape(tensor.shape[0], tensor.shape[1]) if tensor.ndim == 4 else tensor
    if isinstance(how, tuple):
        _, part, widths = how
        unit = tensor.shape[0] // sum(widths)
        return tensor.split([w * unit for w in widths], dim=0)[part]
    return tensor


# ------------------------------------------------------------------ reading a checkpoint
class Checkpoint:
    """A checkpoint file's tensor shapes and metadata (torch-free); `tensors` (name -> tensor) is filled in by
    `lora_sd.models.load_checkpoint`."""

    def __init__(self, path: Path, shapes: dict[str, list[int]], metadata: dict[str, str], global_step=None,
                 tensors: Optional[Mapping] = None):
        self.path, self.shapes, self.metadata, self.global_step = path, shapes, metadata, global_step
        self.tensors = tensors
        self.bare = False       # an MMDiT transformer saved without model.diffusion_model. (BFL's Flux files)
        if any(k.startswith(tuple(f"{b}." for b in _BLOCKS.values())) for k in shapes):
            self.shapes, self.bare = {UNET + k: v for k, v in shapes.items()}, True


def checkpoint_file(path) -> Path:
    """`path` as a Path when it is a file; FileNotFoundError with the one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a .safetensors or .ckpt checkpoint was expected)")
    return path


def open_checkpoint(path) -> Checkpoint:
    """The shapes and metadata of a .safetensors file, or the key names of a .ckpt (its pickle scanned, never
    run), without torch; a file that is neither raises one line."""
    path = checkpoint_file(path)
    if path.suffix.lower() == ".ckpt":
        return Checkpoint(path, _ckpt_key_names(path), {})
    try:
        h = read_header(path)
    except LoraLoadError as e:
        raise ModelLoadError(f"{one_line(str(e))} (a Stable Diffusion .safetensors checkpoint was expected)") from None
    return Checkpoint(path, {k: list(v["shape"]) for k, v in h.tensors.items()}, h.metadata)


def _ckpt_key_names(path: Path) -> dict[str, list[int]]:
    """Key names of a .ckpt without torch: the strings of its pickle, read as opcodes (never executed);
    shapes stay unknown ([]). Zip format: data.pkl; legacy format: the first four pickles of the file."""

    def strings(source) -> set:
        return {arg for _, arg, _ in pickletools.genops(source) if isinstance(arg, str) and "." in arg}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                found = strings(z.read(name) if name else b"")
        else:
            with open(path, "rb") as f:
                found = set().union(*(strings(f) for _ in range(4)))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint, or truncated ({one_line(str(e))[:100]}); "
                             "a Stable Diffusion .ckpt or .safetensors file was expected") from None
    return {s: [] for s in found}


# ------------------------------------------------------------------ which architecture
_LORA_KEY = re.compile(r"(^lora_(unet|te\d?)_)|\.lora_(down|up|A|B)\.|\.(hada|lokr)_|\.alpha$")


def checkpoint_error(path: Path, what: str, expected: str = "a Stable Diffusion 1.x / 2.x / SDXL checkpoint (UNet, VAE and text "
                                                  "encoder in one file; model.config may give configs for other sizes)"
          ) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}; {expected} was expected")


def _check_parts(ck: Checkpoint) -> None:
    """Refuse files that are no whole base model: empty, an adapter, a VAE or UNet alone (an MMDiT
    transformer alone is taken: its other components may come from model.config)."""
    keys = ck.shapes
    if not keys:
        raise checkpoint_error(ck.path, "holds no tensors")
    lora = [k for k in keys if _LORA_KEY.search(k)]
    if lora:
        raise checkpoint_error(ck.path, f"a LoRA / adapter file (keys like {lora[0]}), not a base model (load adapters with "
                             "--lora or sample.lora)")
    if _mmdit_arch(keys):
        return
    if not any(k.startswith(UNET) for k in keys):
        if any(k.startswith(("encoder.", "decoder.", VAE, "quant_conv", "post_quant_conv")) for k in keys):
            raise checkpoint_error(ck.path, "a VAE-only file (encoder/decoder keys, no UNet model.diffusion_model.*)")
        if any(k.startswith(("down_blocks.", "unet.", "text_model.", "transformer_blocks.", "transformer.")) for k in keys):
            raise checkpoint_error(ck.path, "one component in the diffusers layout (keys like down_blocks.*), not a single-file "
                                 "checkpoint", "its whole diffusers folder (with model_index.json) or a single-file "
                                               "checkpoint")
        raise checkpoint_error(ck.path, f"not a Stable Diffusion model (no UNet keys model.diffusion_model.*; keys like "
                             f"{next(iter(keys))})")
    if not any(k.startswith(VAE) for k in keys):
        raise checkpoint_error(ck.path, "has a UNet but no VAE (first_stage_model.*)")


# ------------------------------------------------------------------ MMDiT (SD 3.5, Flux) files
# the shipped config folders of the released models, their names and hub ids
SIZES = {"sd35-medium": ("sd3", "SD 3.5 Medium", "stabilityai/stable-diffusion-3.5-medium"),
         "sd35-large": ("sd3", "SD 3.5 Large", "stabilityai/stable-diffusion-3.5-large"),
         "flux1-dev": ("flux", "FLUX.1 dev", "black-forest-labs/FLUX.1-dev"),
         "flux1-schnell": ("flux", "FLUX.1 schnell", "black-forest-labs/FLUX.1-schnell")}
# the shape of each released transformer -> its folder: SD 3.x (joint blocks, width, dual attention);
# Flux (double blocks, single blocks, width, guidance embedding)
_SHAPES = {("sd3", 24, 1536, True): "sd35-medium", ("sd3", 38, 2432, False): "sd35-large",
           ("flux", 19, 38, 3072, True): "flux1-dev", ("flux", 19, 38, 3072, False): "flux1-schnell"}
_BLOCKS = {"sd3": "joint_blocks", "flux": "double_blocks"}       # the key that tells each MMDiT family
_PART_NAMES = {"mmdit": "transformer", "vae": "VAE", "hfclip_l": "CLIP-L",
               "hfclip": "CLIP-G", "t5": "T5"}


def _mmdit_arch(keys) -> str:
    """"sd3" / "flux" for the original / ComfyUI layout of an MMDiT (model.diffusion_model.joint_blocks.* /
    double_blocks.*), else ""."""
    return next((a for a, b in _BLOCKS.items() if any(k.startswith(f"{UNET}{b}.") for k in keys)), "")


def components_in_file(ck: Checkpoint, arch: str) -> list[str]:
    """The components of `arch` whose tensors the file holds (by their original prefix)."""
    return [c for c, (prefix, _) in LAYOUT[arch].items() if any(k.startswith(prefix) for k in ck.shapes)]


def _block_count(keys, name: str) -> int:
    found = {int(k.split(".")[3]) for k in keys if k.startswith(f"{UNET}{name}.")}
    return 1 + max(found) if found else 0


def mmdit_size(ck: Checkpoint, arch: str) -> tuple[str, str]:
    """(the shipped config folder of this MMDiT, or "" for a size without one; its description) from the
    keys and shapes: blocks, width, SD 3.x's dual-attention blocks and qk-norm, Flux's guidance embedding."""
    keys = ck.shapes
    if arch == "flux":
        double, single = _block_count(keys, "double_blocks"), _block_count(keys, "single_blocks")
        width, guidance = (keys.get(UNET + "img_in.weight") or [0])[0], UNET + "guidance_in.in_layer.weight" in keys
        desc = (f"{double} double-stream and {single} single-stream blocks {width or '?'} wide, "
                + ("a guidance embedding (dev)" if guidance else "no guidance embedding (schnell)"))
        return _SHAPES.get(("flux", double, single, width, guidance), ""), desc
    depth, width = _block_count(keys, "joint_blocks"), (keys.get(UNET + "x_embedder.proj.weight") or [0])[0]
    dual = sorted({int(k.split(".")[3]) for k in keys if k.startswith(UNET + "joint_blocks.") and ".x_block.attn2." in k})
    desc = f"{depth} joint blocks {width or '?'} wide"
    if dual:
        desc += f", dual attention in blocks {dual[0]}-{dual[-1]} (MMDiT-X)"
    if any(k.endswith(".attn.ln_q.weight") for k in keys):
        desc += ", qk RMS-norm"
    return _SHAPES.get(("sd3", depth, width, bool(dual)), ""), desc


def hub_id(ck: Checkpoint, arch: str) -> str:
    """The hub id of the released model this file's transformer matches (the first of its family otherwise)."""
    name = mmdit_size(ck, arch)[0] or next(n for n, size in SIZES.items() if size[0] == arch)
    return SIZES[name][2]


def _mmdit_why(ck: Checkpoint, arch: str) -> str:
    name, desc = mmdit_size(ck, arch)
    size = SIZES[name][1] if name else "a size lora_sd ships no configs for"
    held = [_PART_NAMES[LAYOUT[arch][c][1]] for c in components_in_file(ck, arch)]
    return f"{UNET}{_BLOCKS[arch]}.*: an MMDiT with {desc}: {size}; the file holds {', '.join(held)}"


def _classify(ck: Checkpoint) -> tuple[str, str]:
    keys = ck.shapes
    arch = _mmdit_arch(keys)
    if arch:
        return arch, _mmdit_why(ck, arch)
    in_conv = keys.get(UNET + "input_blocks.0.0.weight") or []
    if len(in_conv) == 4 and in_conv[1] != 4:
        raise checkpoint_error(ck.path, f"a UNet with {in_conv[1]} input channels (an inpainting or other special model)",
                    "a text-to-image model (4 latent channels)")
    ctx = next((s[-1] for k, s in keys.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight") and s), None)
    width = f", cross-attention width {ctx}" if ctx else ""
    if any(k.startswith("conditioner.embedders.") for k in keys) or UNET + "label_emb.0.0.weight" in keys:
        if not any(k.startswith("conditioner.embedders.1.model.") for k in keys):
            raise checkpoint_error(ck.path, "an SDXL model without the OpenCLIP bigG encoder as conditioner.embedders.1 "
                                 "(the SDXL refiner?)", "an SDXL base model")
        return "sdxl", ("conditioner.embedders.0/1: CLIP ViT-L + OpenCLIP bigG text encoders, label_emb: "
                        "size/crop conditioning" + width)
    proj = keys.get(UNET + "input_blocks.1.1.proj_in.weight") or []
    proj_kind = {2: ", linear proj_in", 4: ", conv proj_in"}.get(len(proj), "")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2", f"cond_stage_model.model.*: OpenCLIP ViT-H text encoder{proj_kind}{width}"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1", f"cond_stage_model.transformer.*: CLIP ViT-L text encoder{proj_kind}{width}"
    raise checkpoint_error(ck.path, "a UNet without a known text encoder (no cond_stage_model.* or conditioner.embedders.*): "
                         "unknown architecture")


def classify(ck: Checkpoint) -> tuple[str, str]:
    """(arch, why) of an opened checkpoint, or ModelLoadError."""
    _check_parts(ck)
    return _classify(ck)


def detect_checkpoint(path) -> tuple[str, str]:
    """("sd1" | "sd2" | "sdxl", the reason) of a single-file checkpoint, without torch; ModelLoadError
    (one line naming the file and what was expected) for anything else."""
    ck = open_checkpoint(path)
    arch, why = classify(ck)
    if META_CONFIGS in ck.metadata:
        why += "; its component configs are in its metadata (written by lora-sd save-single-file)"
    return arch, why


def _folder_arch(folder: Path) -> tuple[str, str]:
    """(arch, why) of a diffusers folder from its model_index.json and its denoiser's config.json."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        name = index.get("_class_name", "?")
        if name in ("StableDiffusion3Pipeline", "FluxPipeline"):
            return ("sd3" if name == "StableDiffusion3Pipeline" else "flux"), f"diffusers folder, {name} (an MMDiT transformer)"
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: not a readable diffusers pipeline folder ({one_line(str(e))[:120]})") from e
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl", f"diffusers folder, {name}, UNet with size/crop conditioning"
    if unet.get("use_linear_projection"):
        return "sd2", f"diffusers folder, {name}, UNet with linear projections"
    return "sd1", f"diffusers folder, {name}"


def model_arch(pretrained: str) -> tuple[str, str]:
    """("sd1" | "sd2" | "sdxl" | "sd3" | "flux" | "", why) of a model.pretrained value without torch or network: a tiny
    model's name, a released MMDiT's hub id, a diffusers folder, a single file; "" for other hub ids (known once
    it is loaded).
    ModelLoadError for a file or folder that is not a model lora_sd trains."""
    if pretrained == TINY_PRETRAINED:
        return "sd1", f"'{pretrained}': the tiny model shipped with lora_sd, pretrained on the synthetic shapes world"
    if pretrained in TINY_ARCHS:
        return TINY_ARCHS[pretrained], f"'{pretrained}': the tiny offline test model (random weights)"
    released = next((size for size in SIZES.values() if size[2] == pretrained), None)
    if released:
        return released[0], f"the hub id of {released[1]}"
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return _folder_arch(path)
    if path.suffix in (".safetensors", ".ckpt") or path.is_file():
        return detect_checkpoint(path)
    return "", "a hub id: its architecture is read when it is loaded"


# ------------------------------------------------------------------ configs
_CONFIG_FILES = {"unet": "unet/config.json", "transformer": "transformer/config.json", "vae": "vae/config.json",
                 "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json",
                 "text_encoder_3": "text_encoder_3/config.json", "scheduler": "scheduler/scheduler_config.json"}
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "spiece.model")


def _read_config_folder(folder: Path) -> dict:
    """Component configs of a diffusers folder (model_index.json, <component>/config.json, tokenizer files)."""
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"model.config = {folder}: no model_index.json there (a diffusers folder with the "
                             "component configs was expected)")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    out = {"index": index, "pad_tokens": index.get("_lora_sd_pad_tokens", {})}
    for comp, rel in _CONFIG_FILES.items():
        if (folder / rel).is_file():
            out[comp] = json.loads((folder / rel).read_text(encoding="utf-8"))
            if any((folder / comp).glob("*.safetensors")):
                out[f"{comp}_weights"] = str(folder / comp)     # a component the file may lack comes from here
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if any((folder / tok / f).is_file() for f in _TOKENIZER_FILES):
            out[f"{tok}_dir"] = str(folder / tok)
    return out


def _shipped(arch: str, prediction_type: str, global_step) -> tuple[str, str]:
    """The shipped config folder for `arch`, and why (SD 2.x: v-prediction cannot be seen in weights)."""
    if arch != "sd2":
        return {"sd1": "sd15", "sdxl": "sdxl-base"}[arch], ""
    if prediction_type:
        return ("sd21-base" if prediction_type == "epsilon" else "sd21-v"), f"; model.prediction_type = {prediction_type}"
    if global_step == 875000:
        return "sd21-base", "; global_step 875000: the 512-base model (as diffusers tells them apart)"
    return "sd21-v", ("; v-prediction cannot be seen in the weights: the 768-v model is assumed, as diffusers does; "
                      "set model.prediction_type = \"epsilon\" for a 512-base model")


def config_source(ck: Checkpoint, arch: str, config: str, prediction_type: str) -> tuple[dict, str, str]:
    """(configs, where from, why): model.config, else the file's metadata, else the shipped configs."""
    if config:
        check_local_path(config, "model.config")
        folder = Path(config).expanduser()
        if not folder.is_dir():
            lacking = [f"{c}/*.safetensors" for c in LAYOUT[arch] if c not in components_in_file(ck, arch)]
            try:
                folder = Path(snapshot_download(config, allow_patterns=["*.json", "*/*.json", "tokenizer*/*"] + lacking))
            except Exception as e:
                raise hub_error("model.config", config, e) from e
        return _read_config_folder(folder), f"configs from model.config = {config}", ""
    if META_CONFIGS in ck.metadata:
        try:
            return json.loads(ck.metadata[META_CONFIGS]), "configs from the file's metadata", ""
        except json.JSONDecodeError:
            raise checkpoint_error(ck.path, f"its {META_CONFIGS} metadata is not JSON") from None
    if arch in MMDIT:
        name, desc = mmdit_size(ck, arch)
        why = ""
        if not name:
            released = " or ".join(title for family, title, _ in SIZES.values() if family == arch)
            raise checkpoint_error(ck.path, f"an MMDiT with {desc}, a size lora_sd ships no configs for",
                                   f"{released} (or set model.config to a folder or hub id with this model's "
                                   "diffusers configs)")
    else:
        name, why = _shipped(arch, prediction_type, ck.global_step)
    configs = _read_config_folder(CONFIG_DIR / name)
    return configs, f"shipped configs {name}", f" ({configs['index'].get('_lora_sd_note', name)}){why}"


def check_configs(configs: dict, arch: str, source: str, path: Path) -> None:
    missing = [c for c in list(LAYOUT[arch]) + ["scheduler"] if c not in configs]
    if missing:
        raise ModelLoadError(f"{path}: {source}: no {', '.join(missing)} config ({TITLE[arch]} needs "
                             f"{', '.join(LAYOUT[arch])} and scheduler)")
    if arch in MMDIT:
        found = configs["transformer"].get("_class_name")
        if found != MMDIT_CLASS[arch]:
            raise ModelLoadError(f"{path}: the file is {TITLE[arch]} but the {source} have a {found or 'unnamed'} "
                                 f"transformer ({MMDIT_CLASS[arch]} expected); give matching configs")
        return
    is_xl = configs["unet"].get("addition_embed_type") == "text_time"
    if is_xl != (arch == "sdxl"):
        raise ModelLoadError(f"{path}: the file is {TITLE[arch]} but the {source} are "
                             f"{'SDXL' if is_xl else 'not SDXL'}; give matching configs")
