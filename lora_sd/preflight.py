"""`lora-sd check`: everything that can be known before a run starts (lora_core.preflight holds the report,
the memory arithmetic and the CLI command).

1. the config loads (every field validated) and its settings do not conflict;
2. the data set: counts, captions, unreadable and too-small images, the bucket histogram (lora_sd.data.scan);
3. the adapter fits the model (lora.layers, flow.single_layers within its blocks); trainable parameters, alpha/r,
   and the peak-memory estimate at the chosen batch, resolution and precision;
4. two real optimisation steps through the normal train path (lora_sd.train.run_training) at a reduced size on
   the chosen device: shape errors and non-finite losses show here, not at step 3,000.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import diffusers
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lora_core import add_lora, lora_layers
from lora_core.dtypes import autocast_dtype
from lora_core.preflight import PreflightReport, fit_activations, memory_estimate, run_steps
from lora_core.errors import ConfigError
from lora_core.lowmem import storage_problem
from lora_core.offload import model_blocks
from lora_core.preflight_torch import (begin, block_order, common_conflicts, flash_attention_shapes,
                                      offloaded_frozen_bytes, saved_activations, saved_as_stored)

from .config import WEIGHT_PARTS, SDTrainConfig, load_train_config
from .data import idle_settings, load_items, make_buckets, pick_bucket, scan
from .errors import DatasetError
from .archs import spec_of
from .models import load_pipeline
from .single_file import CONFIG_DIR
from .train import lora_for_arch, run_training

log = logging.getLogger("lora")

DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def conflicts(cfg: SDTrainConfig, device: str, rep: PreflightReport) -> None:
    d, s = cfg.data, cfg.train
    common_conflicts(cfg, device, rep)
    for part, storage in cfg.model.weight_dtype.chosen().items():
        problem = storage_problem(storage, device)
        if problem:
            rep.error(f"model.weight_dtype.{part} = \"{storage}\": {problem}", f"model.weight_dtype.{part}")
    if d.cache_text and cfg.text_encoder_lora is not None:
        rep.warn("data.cache_text = true has no effect while the text encoder is trained ([text_encoder_lora] is "
                 "set): captions are encoded every step; set data.cache_text = false", "data.cache_text")
    if d.cache_latents and not d.center_crop:
        rep.warn("data.center_crop = false (random crop) with data.cache_latents = true: latents are cached "
                 "center-cropped, so no random crop happens; set data.cache_latents = false to crop at random",
                 "data.center_crop")
    if cfg.sample.grid and not s.checkpoint_every:
        rep.add("info", "sample.grid: with train.checkpoint_every = 0 the grid has two columns (base, final)",
                "train.checkpoint_every")


def audit(cfg: SDTrainConfig, rep: PreflightReport) -> list:
    """The data set as the trainer will see it; returns the usable items."""
    d = cfg.data
    try:
        sr = scan(d.path, d.caption_extension, d.repeats, d.max_images)
    except DatasetError as e:
        rep.error(str(e), "data.path")
        return []
    need = "{caption}" in d.caption_template
    items = sr.items + ([] if need else sr.missing_captions)
    small = [i for i in items if min(i.size) < d.resolution]
    buckets = make_buckets(d.resolution, d.bucket_step) if d.buckets else None
    hist = Counter("%dx%d" % (pick_bucket(i.size, buckets) if buckets else (d.resolution, d.resolution))
                   for i in items)
    rep.data = {"path": str(sr.root), "images": len(sr.items) + len(sr.missing_captions), "captioned": len(sr.items),
                "missing_captions": len(sr.missing_captions), "unreadable": len(sr.corrupt),
                "too_small": len(small), "samples_per_epoch": sum(i.repeats for i in items),
                "buckets": dict(sorted(hist.items()))}
    for c in sr.corrupt:
        rep.warn(f"unreadable image (it will be skipped): {c}", "data.path")
    if need and sr.missing_captions:
        rep.error(f"{len(sr.missing_captions)} image(s) have no caption (e.g. {sr.missing_captions[0].path}); add "
                  f"{d.caption_extension} sidecars or use a data.caption_template without {{caption}}", "data.path")
    if not sr.items and not sr.missing_captions:
        rep.error(f"data.path {sr.root}: no readable images", "data.path")
    if small:
        rep.warn(f"{len(small)} image(s) are smaller than data.resolution = {d.resolution} and will be upscaled "
                 f"(e.g. {small[0].path}: {small[0].size[0]}x{small[0].size[1]})", "data.resolution")
    if items and cfg.train.batch_size > sum(i.repeats for i in items):
        rep.warn(f"train.batch_size ({cfg.train.batch_size}) exceeds the samples per epoch", "train.batch_size")
    try:
        loaded = load_items(d)   # as the trainer reads it: captions templated, class images added
    except DatasetError:
        loaded = []              # reported above
    for line in idle_settings(loaded, d, cfg.embedding.token):
        rep.error(line, line.split(" ", 1)[0].rstrip(":"))
    return items


def _small_config(cfg: SDTrainConfig, work: Path) -> SDTrainConfig:
    """The same job at a reduced size: 2 steps, a smaller resolution and batch, a few images, no samples."""
    c = copy.deepcopy(cfg)
    res = cfg.data.resolution
    c.run_dir = str(work / "run")
    c.data.resolution = res if res <= 64 else max(64, min(256, res // 2) // 8 * 8)
    c.data.bucket_step = min(c.data.bucket_step, c.data.resolution)
    c.train.batch_size = min(cfg.train.batch_size, 2)
    c.data.max_images = max(2, c.train.batch_size * 2)
    c.data.cache_dir = str(work / "cache")
    c.train.max_steps, c.train.checkpoint_every, c.train.keep_checkpoints = 2, 0, 1
    c.train.lr_warmup_steps, c.train.sample_every, c.train.log_every, c.train.num_workers = 0, 0, 1, 0
    c.train.gradient_accumulation_steps = 1
    c.sample.prompts, c.sample.grid, c.output.save_diffusers = [], False, False
    return c


def two_steps(cfg: SDTrainConfig, pipe, device: str, rep: PreflightReport, steps: int = 2) -> None:
    """Run `steps` real optimisation steps through run_training at a reduced size (a temporary run folder)."""
    with tempfile.TemporaryDirectory(prefix="lora_sd_check_") as tmp:
        small = _small_config(cfg, Path(tmp))
        small.train.max_steps = steps
        AcceleratorState._reset_state(reset_partial_state=False)
        acc = Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision=small.train.mixed_precision)
        run_steps(rep, f"{steps} steps at {small.data.resolution}px, batch {small.train.batch_size}", small.run_dir,
                  lambda: run_training(small, accelerator=acc, pipe=pipe))


def _frozen_bytes(cfg: SDTrainConfig, pipe, order: Optional[list] = None) -> dict[str, int]:
    """Frozen weights as training keeps them on the device, by component name: each part in its
    model.weight_dtype, else the mixed precision (the VAE: fp32, bf16 under bf16), the denoiser's offloaded blocks
    (train.offload_blocks) but two left out (`order`: the denoiser's blocks in the order they run)."""
    mp = cfg.train.mixed_precision
    out = {}
    for part, names in WEIGHT_PARTS.items():
        default = (2 if mp == "bf16" else 4) if part == "vae" else DTYPE_BYTES[mp]
        n_off = cfg.train.offload_blocks if part == "denoiser" else 0
        for name in names:
            m = getattr(pipe, name, None)
            if m is not None:
                out[name] = offloaded_frozen_bytes(m, getattr(cfg.model.weight_dtype, part), default, n_off,
                                                   order if part == "denoiser" else None)
    return out


def unet_inputs(unet, latent: int, batch: int, context: int, device, dtype, resolution: int) -> dict:
    """Keyword arguments of one UNet call on random inputs: latents of side `latent`, `context` text tokens,
    SDXL's pooled embedding and time ids."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    kw = {"sample": rand(batch, unet.config.in_channels, latent, latent),
          "timestep": torch.full((batch,), 500, device=device), "encoder_hidden_states":
          rand(batch, context, unet.config.cross_attention_dim)}
    if unet.config.addition_embed_type == "text_time":   # SDXL: the pooled embedding and the time ids
        n = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        res = float(resolution)
        kw["added_cond_kwargs"] = {"text_embeds": rand(batch, n), "time_ids": torch.tensor(
            [[res, res, 0.0, 0.0, res, res]] * batch, device=device, dtype=dtype)}
    return kw


def _unet_activations(unet, inputs: dict, dtype, checkpointing: bool, storage: str = "") -> tuple[int, int]:
    """saved_activations of one UNet training forward on `inputs` under autocast to `dtype` (None: off), its frozen
    weights stored as `storage` (model.weight_dtype)."""
    return _saved(unet, lambda: unet(**inputs).sample, inputs["sample"].device.type, dtype, checkpointing, storage)


def _saved(den, forward, dev: str, dtype, checkpointing: bool, storage: str = "") -> tuple[int, int]:
    """saved_activations of one training forward of the denoiser `den` (`forward()` -> its prediction) under
    autocast to `dtype` (None: off), with what its layers save when its frozen weights are stored as `storage`
    (fp8 / int8 layers save nothing: lora_core.preflight_torch.saved_as_stored)."""
    def run():
        with torch.autocast(dev, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            return forward().float().pow(2).mean()
    was = den.training
    den.train()
    # the frozen weights in the compute dtype while measuring, as training keeps them: autocast's copies of
    # fp32 weights are not activations
    kept = {p: p.data for p in den.parameters() if not p.requires_grad and dtype is not None and p.dtype != dtype}
    for p in kept:
        p.data = p.data.to(dtype)
    try:
        with saved_as_stored(den, storage):
            return saved_activations(den, run, checkpointing)
    finally:
        den.train(was)
        for p, data in kept.items():
            p.data = data


def _forward(cfg: SDTrainConfig, pipe, device: str):
    """(one training forward of the denoiser on (1, C, s, s) latents with random text conditioning, C, the
    latent side's multiple); see denoiser_forward."""
    spec = spec_of(pipe)
    den = getattr(pipe, spec.denoiser)
    forward = denoiser_forward(cfg, den, device, pipe.tokenizer.model_max_length, cfg.data.resolution)
    return forward, *latent_shape(den)


def latent_shape(den) -> tuple[int, int]:
    """(the channels of the latents the denoiser `den` takes, the multiple their side must be): a UNet's
    in_channels and 2 ** (levels - 1); an MMDiT's 2 (2x2 patches; Flux's in_channels count the packed 2x2)."""
    spec = spec_of(den)
    if spec.flow:
        return den.config.in_channels // (4 if spec.name == "flux" else 1), 2
    return den.config.in_channels, 2 ** (len(den.config.block_out_channels) - 1)


def denoiser_forward(cfg: SDTrainConfig, den, device, clip_tokens: int, resolution: int, batch: int = 1,
                     dtype=None):
    """forward(latents) -> prediction: one training forward of the denoiser `den` with random text conditioning
    (`dtype`: of the random inputs): the UNet with SDXL's pooled embedding and time ids; an MMDiT with its text
    sequence (SD 3.5: CLIP's `clip_tokens` then T5's; Flux: T5's) and pooled embedding (and Flux dev's guidance)."""
    spec = spec_of(den)
    t = torch.full((batch,), 500.0 if spec.flow else 500, device=device)
    if spec.flow:
        n_text = spec.t5_length + (clip_tokens if spec.t5 == 3 else 0)
        ctx = torch.randn(batch, n_text, den.config.joint_attention_dim, device=device, dtype=dtype)
        extra = spec.extra(torch.randn(batch, den.config.pooled_projection_dim, device=device, dtype=dtype), {})
        extra = {**extra, "guidance": cfg.flow.guidance_scale} if spec.guidance else extra
        return lambda x: spec.predict(den, x, t, ctx, extra)
    kw = unet_inputs(den, 1, batch, clip_tokens, device, dtype, resolution)   # its 1x1 sample unused
    extra = {k: kw[k] for k in ("added_cond_kwargs",) if k in kw}
    return lambda x: spec.predict(den, x, t, kw["encoder_hidden_states"], extra)


def _activations(cfg: SDTrainConfig, pipe, device: str) -> tuple[float, float]:
    """(saved bytes of one training forward at the chosen batch and resolution, the largest saved tensor),
    measured with batch 1 at the chosen latent size (up to 64x64 latents, 512 px in SD 1.5), else at 1/4 and
    1/2 of it and extrapolated (lora_core.preflight.fit_activations); with train.gradient_checkpointing as set."""
    den = getattr(pipe, spec_of(pipe).denoiser)
    forward, channels, mult = _forward(cfg, pipe, device)
    target = cfg.data.resolution // pipe.vae_scale_factor
    sizes = [target] if target <= 64 else sorted({max(mult, s // mult * mult) for s in (target // 4, target // 2)})
    points, largest = [], 0.0
    for s in sizes:
        x = torch.randn(1, channels, s, s, device=device)
        total, big = _saved(den, lambda: forward(x), torch.device(device).type,
                            autocast_dtype(cfg.train.mixed_precision), cfg.train.gradient_checkpointing,
                            cfg.model.weight_dtype.denoiser)
        points.append((s * s, total))
        largest = big * target * target / (s * s)
    per_example = fit_activations(points, target * target)
    return per_example * cfg.train.batch_size, largest * cfg.train.batch_size


def measure(cfg: SDTrainConfig, pipe, device: str, rep: PreflightReport) -> None:
    """Trainable parameters, alpha/r and the memory estimate (adds the adapter to `pipe` if it has none)."""
    spec = spec_of(pipe)
    den = getattr(pipe, spec.denoiser)
    tes = {n: getattr(pipe, n) for n in spec.text_encoders if getattr(pipe, n, None) is not None}
    if not any(True for _ in lora_layers(den)):
        for m in (den, pipe.vae, *tes.values()):
            m.requires_grad_(False)
        add_lora(den, lora_for_arch(cfg, spec, den))
        for name, tcfg in (("text_encoder", cfg.text_encoder_lora), ("text_encoder_2", cfg.text_encoder_2_lora)):
            if tcfg is not None and name in tes:
                add_lora(tes[name], tcfg)
    pipe.to(device)
    mods = (den, pipe.vae, *tes.values())
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for m in mods for p in m.parameters())
    lo = cfg.lora
    scale = lo.alpha / (math.sqrt(lo.r) if lo.use_rslora else lo.r)
    rep.parameters = {"trainable": trainable, "total": total, "type": lo.type, "r": lo.r, "alpha": lo.alpha,
                      "scale": scale, "use_rslora": lo.use_rslora}
    with block_order(den) as order:
        acts, largest = _activations(cfg, pipe, device)
    try:
        frozen = _frozen_bytes(cfg, pipe, order)
    except ConfigError as e:   # more blocks to offload than the model has
        rep.error(str(e), e.key or "")
        return
    # the parts whose outputs are cached leave the device before the first step (ArchSpec.cached_parts): on the
    # device with the rest while caching (no activations then), not while training
    released = set(spec.cached_parts(cfg))
    rep.memory = memory_estimate(sum(v for k, v in frozen.items() if k not in released), [p.numel() for p in params],
                                 acts, largest, cfg.train.optimizer, torch.device(device).type, cfg.train.fused_backward)
    caching = sum(frozen.values()) + rep.memory["parts"]["adapter"]
    rep.memory.update(released=sorted(released), caching_bytes=caching,
                      total_bytes=max(rep.memory["total_bytes"], caching))
    s = cfg.train
    rep.memory.update(batch=s.batch_size, resolution=cfg.data.resolution, precision=s.mixed_precision,
                      weight_dtype=cfg.model.weight_dtype.chosen(), gradient_checkpointing=s.gradient_checkpointing,
                      offload_blocks=s.offload_blocks, optimizer=s.optimizer, fused_backward=s.fused_backward,
                      off_device=list(spec.cached_parts(cfg)))


# ------------------------------------------------------------------ `check --table`: the memory ladder
# label -> the lora_sd/model_configs folder whose unet/ or transformer/ config is the model
LADDER_MODELS = {"SD 1.5": "sd15", "SDXL": "sdxl-base", "SD 3.5 Medium": "sd35-medium", "Flux.1 dev": "flux1-dev"}
LADDER_WEIGHTS = ("bf16", "fp8_e4m3", "int8")


def ladder(config=None, overrides=(), cfg: Optional[SDTrainConfig] = None, resolution: int = 1024,
           batch: int = 1) -> list[dict]:
    """The memory ladder of `check --table`: for each real-size model of LADDER_MODELS, built on the meta device
    (no weights), with the config's [lora] (as that architecture trains it: lora_for_arch), optimizer and
    fused_backward, at `resolution` and `batch`, bf16 compute: the estimate for frozen weights bf16 / fp8 / int8 x
    checkpointing off / on x no offloading / every block offloaded (two on the device at a time). The attention
    is modelled as flash attention (what CUDA runs in bf16). Rows {model, weights, checkpointing, offload,
    resolution, batch, total_bytes, parts}. A model the config's adapter cannot train is left out with a
    warning that says why."""
    cfg = cfg or load_train_config(config, overrides)
    rows = []
    for label, folder in LADDER_MODELS.items():
        try:
            rows += model_ladder(cfg, label, meta_denoiser(CONFIG_DIR / folder), resolution, batch)
        except ConfigError as e:
            log.warning("check --table: %s left out: %s", label, e)
    return rows


def meta_denoiser(folder: Path):
    """The denoiser of the diffusers configs in `folder` (its unet/ or transformer/), on the meta device."""
    sub = folder / ("unet" if (folder / "unet").is_dir() else "transformer")
    cls = getattr(diffusers, json.loads((sub / "config.json").read_text())["_class_name"])
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(sub)))


def model_ladder(cfg: SDTrainConfig, label: str, den, resolution: int, batch: int) -> list[dict]:
    den.requires_grad_(False)
    add_lora(den, lora_for_arch(cfg, spec_of(den), den))
    for p in den.parameters():   # bf16 compute (on meta there is no autocast)
        p.data = p.data.to(torch.bfloat16)
    params = [p for p in den.parameters() if p.requires_grad]
    channels, _ = latent_shape(den)
    latents = torch.randn(batch, channels, resolution // 8, resolution // 8, device=den.device, dtype=torch.bfloat16)
    forward = denoiser_forward(cfg, den, den.device, 77, resolution, batch, torch.bfloat16)
    with flash_attention_shapes(), block_order(den) as order:   # flash: what CUDA runs, not meta's math kernel
        acts = {(w, ck): _saved(den, lambda: forward(latents), den.device.type, None, ck, w)
                for w in LADDER_WEIGHTS for ck in (False, True)}
    offloads = (0, len(model_blocks(den)))
    rows = []
    for weights in LADDER_WEIGHTS:
        for ck in (False, True):
            for off in offloads:
                est = memory_estimate(offloaded_frozen_bytes(den, weights, 2, off, order), [p.numel() for p in params],
                                      *acts[weights, ck], cfg.train.optimizer, "cuda", cfg.train.fused_backward)
                rows.append({"model": label, "weights": weights, "checkpointing": ck, "offload": off,
                             "resolution": resolution, "batch": batch, **est})
    return rows


def preflight(config=None, overrides=(), device: str = "", steps: int = 2, pipe=None,
              cfg: Optional[SDTrainConfig] = None) -> PreflightReport:
    """Check a `lora-sd train` config (a file with overrides, or `cfg`); `pipe` replaces loading the model."""
    rep, cfg, device = begin("sd-train", config, overrides, cfg, load_train_config, device)
    if cfg is None:
        return rep
    conflicts(cfg, device, rep)
    items = audit(cfg, rep)
    if pipe is None:
        try:
            pipe = load_pipeline(cfg.model.pretrained, cfg.model.config, cfg.model.revision, cfg.model.variant,
                                 prediction_type=cfg.model.prediction_type)
        except Exception as e:  # noqa: BLE001 - a model that cannot load blocks the run
            rep.error(f"model.pretrained {cfg.model.pretrained!r} cannot be loaded: {e}", "model.pretrained")
            return rep
    if not adapter_fits(cfg, pipe, rep):
        return rep
    if steps and items and rep.ok:
        two_steps(cfg, pipe, device, rep, steps)
    measure(cfg, pipe, device, rep)
    return rep


def adapter_fits(cfg: SDTrainConfig, pipe, rep: PreflightReport) -> bool:
    """[lora] fits the loaded model: its block selection (lora.layers, flow.single_layers) within the model's
    blocks and holding targeted modules; else one error line, before any step."""
    spec = spec_of(pipe)
    try:
        lora_for_arch(cfg, spec, getattr(pipe, spec.denoiser))
    except ConfigError as e:
        rep.error(str(e), e.key or "lora.target_modules")
        return False
    return True
