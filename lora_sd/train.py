"""`lora-sd train`: LoRA on a Stable Diffusion 1.x / 2.x / SDXL UNet (cross-attention by default, LoCon
on k×k convs, DoRA), optionally the text encoder(s) and a trained token embedding.

Everything loop-related (optimizer, schedule, accumulation, checkpoints, exact resume, NaN guard,
stop, metrics, status) is lora_core.training.train; this module supplies the model, the data and
the diffusion loss (min-SNR, noise offset, prior preservation, masks, output preservation), the
validation loss and images, and writes the adapters (their metadata: lora_sd.formats.adapter_metadata).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from lora_core import LoraConfig, add_lora, lora_disabled
from lora_core.config import resolve_indices
from lora_core.fields import values_checked
from lora_core.layers import supported
from lora_core.dtypes import torch_dtype
from lora_core.errors import ConfigError
from lora_core.lowmem import check_storage, store_frozen, stored_bytes
from lora_core.model import refuse_non_finite_base
from lora_core.offload import offload_blocks
from lora_core.run import RunDir, run_job
from lora_core.training import EMA, make_ema, optimizer_class, train

from . import formats
from .config import CROSS_ATTN, MMDIT_PRESETS, WEIGHT_PARTS, SDTrainConfig, text_is_cached
from .archs import ArchSpec, config_blocks, denoiser_config, spec_of
from .data import (BatchDataset, LatentCache, Preservation, checked_items, data_files, default_cache_dir, first,
                   load_items)
from .adapter_formats import embedding_path
from .embeddings import TOKEN_VECTORS, add_trained_token, trained_tokens, write_embedding
from .errors import DatasetError
from .flow import FlowMatch, Noised
from .generate import generate
from .resume_rules import SD_RESUME
from .grid import end_of_run_grid, grid_so_far
from .text_cache import CachedParts, TextCache
from .models import RANDOM_WEIGHTS_NOTE, arch_of, is_random_weights, load_pipeline, model_identity

log = logging.getLogger("lora_sd")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class NoiseSchedule:
    """The DDPM objective of the UNet models (SD 1.x/2.x, SDXL): timesteps drawn uniformly from [lo, hi), the
    scheduler's forward process, the target ε (or v with v-prediction), Min-SNR weights (min_snr_gamma)."""

    def __init__(self, scheduler, min_snr_gamma: float = 0.0, timesteps: tuple[int, int] = (0, 1000)):
        self.scheduler, self.min_snr_gamma = scheduler, min_snr_gamma
        n = scheduler.config.num_train_timesteps
        self.timesteps = (timesteps[0], min(timesteps[1], n))
        if self.timesteps[0] >= self.timesteps[1]:
            raise ValueError(f"loss.min_timestep {timesteps[0]}: the scheduler has only {n} timesteps; lower it")

    def at(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, weighted: bool = True) -> Noised:
        sched = self.scheduler
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        weight = None
        if weighted and self.min_snr_gamma:
            snr = compute_snr(sched, t)
            weight = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if v_pred else snr)
        return Noised(sched.add_noise(latents, noise, t), t, target, weight)

    def sample(self, latents: torch.Tensor, noise: torch.Tensor) -> Noised:
        return self.at(latents, noise, torch.randint(*self.timesteps, (latents.shape[0],), device=latents.device))

    def fixed(self, latents: torch.Tensor, noise: torch.Tensor, k: int, n: int) -> Noised:
        """The k-th of n evenly spaced timesteps, unweighted."""
        ts = torch.linspace(0, self.scheduler.config.num_train_timesteps - 1, n + 2)[1:-1].round().long()
        return self.at(latents, noise, ts[k].to(latents.device).expand(latents.shape[0]), weighted=False)


class DiffusionLoss(nn.Module):
    """forward(batch) -> the denoising loss. Holds the denoiser (UNet or MMDiT, with LoRA), and the VAE / text
    encoders only when their outputs are not cached (or a text encoder is trained). `objective` is a diffusers
    noise scheduler (the DDPM objective, NoiseSchedule) or a lora_sd.flow.FlowMatch (rectified flow); the
    architecture's description (lora_sd.archs, from the denoiser) says how the text conditions it."""

    def __init__(self, denoiser, objective, *, text_encoder=None, vae=None, train_text_encoder=False,
                 scaling_factor: float = 0.18215, min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                 prior_loss_weight: float = 1.0, text_encoder_2=None, timesteps: tuple[int, int] = (0, 1000),
                 preserve_weight: float = 0.0, text_encoder_3=None, shift_factor: float = 0.0, guidance: float = 1.0):
        super().__init__()
        self.spec = spec_of(denoiser)
        setattr(self, self.spec.denoiser, denoiser)   # "unet" / "transformer": the checkpoint's key prefix
        self.text_encoder, self.vae = text_encoder, vae
        self.text_encoder_2, self.text_encoder_3 = text_encoder_2, text_encoder_3
        self.objective = (objective if isinstance(objective, FlowMatch)
                          else NoiseSchedule(objective, min_snr_gamma, timesteps))
        self.train_text_encoder, self.guidance = train_text_encoder, guidance
        self.noise_offset = noise_offset
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.prior_loss_weight, self.preserve_weight = prior_loss_weight, preserve_weight

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.spec.denoiser)

    def text_encoders(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(self, n) is not None}

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.vae, *self.text_encoders().values()):   # frozen ones: no dropout
            if m is not None and not (self.train_text_encoder and any(p.requires_grad for p in m.parameters())):
                m.eval()
        return self

    def condition(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The denoiser's text conditioning: (encoder_hidden_states, extra keyword arguments). The hidden states
        are cached, or encoded here as the architecture's pipeline encodes them (lora_sd.archs: SD 1.x/2.x's last
        hidden state; SDXL's data.sdxl_text; SD 3.5's data.sd3_text); the extra carries the pooled embedding
        (SDXL's added_cond_kwargs with each sample's time_ids, SD 3.5's and Flux's pooled_projections) and
        Flux dev's guidance constant."""
        if "text_emb" in batch:
            cond, pooled = batch["text_emb"], batch.get("pooled")
        else:
            cond, pooled = self.spec.encode(self.text_encoders(), {k: v for k, v in batch.items()
                                                                   if k.startswith("input_ids")})
        extra = self.spec.extra(pooled, batch)
        return cond, {**extra, "guidance": self.guidance} if self.spec.guidance else extra

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
        return self.spec.predict(self.denoiser, noisy, t, cond, extra)

    def latents(self, batch: dict, sample: bool = True) -> torch.Tensor:
        """The model's latents: the VAE distribution (cached, or encoded here) sampled (or its mean), shifted
        and scaled by the VAE's factors (SD 3.5 has a shift; the UNet models' is 0)."""
        if "latent_params" in batch:   # cached VAE distribution: sample it here, as the VAE would
            mean, logvar = batch["latent_params"].float().chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            lat = mean + std * torch.randn_like(mean) if sample else mean
        else:
            px = batch["pixels"].to(next(self.vae.parameters()).dtype)
            with torch.no_grad(), torch.autocast(px.device.type, enabled=False):   # the VAE keeps its own dtype
                dist = self.vae.encode(px).latent_dist
                lat = (dist.sample() if sample else dist.mean).float()
        return (lat - self.shift_factor) * self.scaling_factor

    def forward(self, batch: dict) -> torch.Tensor:
        latents = self.latents(batch)
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                            device=latents.device)
        nz = self.objective.sample(latents, noise)
        cond, extra = self._condition(batch)
        pred = self.predict(nz.noisy, nz.timestep, cond, extra)
        loss = self._per_item(F.mse_loss(pred, nz.target.float(), reduction="none"), batch.get("mask"))
        if nz.weight is not None:
            loss = loss * nz.weight
        if "is_reg" in batch:   # prior preservation (data.reg_path): kohya's per-item weights
            reg = batch["is_reg"].to(loss.device)
            loss = loss * torch.where(reg, self.prior_loss_weight, 1.0)
        if self.preserve_weight and self.training and any(k.startswith("pres_") for k in batch):
            return loss.mean() + self.preserve_weight * self.preservation(batch, nz.noisy, nz.timestep)
        return loss.mean()

    def _condition(self, batch: dict) -> tuple[torch.Tensor, dict]:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.condition(batch)

    def preservation(self, batch: dict, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Differential output preservation (loss.preserve_weight): the mean squared difference between the
        denoiser's prediction with the adapters and without them (the base model's, the target), on the same
        noisy latents, for the batch's preserved captions (the "pres_" keys; see BatchDataset)."""
        pres = {k[len("pres_"):]: v for k, v in batch.items() if k.startswith("pres_")}
        if "time_ids" in batch:
            pres["time_ids"] = batch["time_ids"]
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for m in (self.denoiser, *self.text_encoders().values()):
                stack.enter_context(lora_disabled(m))
            target = self.predict(noisy, t, *self.condition(pres))
        return F.mse_loss(self.predict(noisy, t, *self._condition(pres)), target)

    @staticmethod
    def _per_item(err: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B,) mean error per item; with a mask (B, 1, H, W) in pixels: resized to the latents ("area"), the
        mean weighted by it (a zero-weight latent pixel gets no gradient)."""
        dims = list(range(1, err.dim()))
        if mask is None:
            return err.mean(dim=dims)
        w = F.interpolate(mask.to(err.device, err.dtype), size=err.shape[-2:], mode="area").expand_as(err)
        return (err * w).sum(dim=dims) / w.sum(dim=dims).clamp(min=1e-8)


def _cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def training_metadata(cfg: SDTrainConfig, n_images: int, resolution: int, steps: int,
                      prediction_type: str = "") -> dict[str, str]:
    """The run's facts as kohya ss_* and modelspec.* keys (strings), plus our exact LoRA config;
    formats.adapter_metadata adds the base's and the network's keys from the adapter written.
    `prediction_type` is the scheduler's (default: model.prediction_type or epsilon), "flow" for rectified flow."""
    prediction_type = prediction_type or cfg.model.prediction_type or "epsilon"
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    s = cfg.train
    meta = {
        "ss_network_dropout": str(cfg.lora.dropout),
        "ss_v_parameterization": str(prediction_type == "v_prediction"), "ss_sd_model_name": cfg.model.pretrained,
        "ss_resolution": f"({resolution}, {resolution})", "ss_num_train_images": str(n_images),
        "ss_learning_rate": str(s.learning_rate), "ss_unet_lr": str(s.learning_rate),
        "ss_text_encoder_lr": str(s.learning_rate) if cfg.trains_text_encoder else "0",
        "ss_max_train_steps": str(s.max_steps), "ss_steps": str(steps), "ss_seed": str(s.seed),
        "ss_batch_size_per_device": str(s.batch_size), "ss_gradient_accumulation_steps": str(s.gradient_accumulation_steps),
        "ss_lr_scheduler": s.lr_scheduler, "ss_lr_warmup_steps": str(s.lr_warmup_steps),
        "ss_mixed_precision": s.mixed_precision, "ss_optimizer": s.optimizer,
        "ss_min_snr_gamma": str(cfg.loss.min_snr_gamma), "ss_noise_offset": str(cfg.loss.noise_offset),
        "ss_min_timestep": str(cfg.loss.min_timestep), "ss_max_timestep": str(cfg.loss.max_timestep),
        "ss_output_name": cfg.output.name, "ss_training_finished_at": now,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "diffusers", "modelspec.title": cfg.output.name, "modelspec.date": now,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": prediction_type,
        "lora_sd.lora_config": json.dumps(cfg.lora.to_dict()),
    }
    if prediction_type == "flow":   # rectified flow: kohya's SD 3 keys and our [flow]
        f = cfg.flow
        meta.update({"ss_weighting_scheme": f.timestep_density, "ss_logit_mean": str(f.logit_mean),
                     "ss_logit_std": str(f.logit_std), "ss_mode_scale": str(f.mode_scale),
                     "lora_sd.flow": json.dumps(asdict(f), sort_keys=True)})
    if cfg.text_encoder_lora is not None:
        meta["lora_sd.text_encoder_lora_config"] = json.dumps(cfg.text_encoder_lora.to_dict())
    if cfg.text_encoder_2_lora is not None:
        meta["lora_sd.text_encoder_2_lora_config"] = json.dumps(cfg.text_encoder_2_lora.to_dict())
    return meta


def run_training(cfg: SDTrainConfig, resume: Optional[str] = None, accelerator=None, pipe=None,
                 overwrite: bool = False) -> dict:
    """Train as configured; returns the final status dict (see lora_core.run). The run folder's rules
    (refusing another run's files, --overwrite, the lock, final states) are lora_core.run.run_job's.
    `pipe` replaces loading cfg.model.pretrained (an in-memory pipeline, e.g. the benchmark's)."""
    s = cfg.train
    if accelerator is None:
        # a second run in the same process may use another precision: AcceleratorState is a singleton
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(mixed_precision=s.mixed_precision, gradient_accumulation_steps=s.gradient_accumulation_steps)

    def body(run: RunDir, items) -> dict:
        return _run(cfg, run, accelerator, resume, pipe, items)

    return run_job("sd-train", RunDir(cfg.run_dir), body, config=cfg, resume=resume, overwrite=overwrite,
                   resume_rules=SD_RESUME, main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                   validate=lambda: checked_items(cfg.data, cfg.embedding.token),   # dataset errors before anything is written
                   data_files=lambda items: data_files(items, cfg.data))   # a resume on changed data is refused


def _dataset(cfg: SDTrainConfig, items, pipe, accelerator, train_te: bool, preserve: Optional[Preservation] = None):
    """(BatchDataset, cached text embeddings or None): sizes, latent cache, text cache (lora_sd.text_cache, on
    disk: the hidden states and, SDXL / SD 3.5, the pooled embedding)."""
    s, d, spec = cfg.train, cfg.data, spec_of(pipe)
    if d.cache_latents and not d.center_crop:
        log.warning("data.center_crop = false (random crop) cannot be cached: latents are cached center-cropped")
    text_emb = pooled = cache = None
    if d.cache_text and not train_te and d.shuffle_tags:
        log.warning("data.shuffle_tags varies the captions: the text is encoded every step "
                    "(data.cache_text is not used)")
    elif text_is_cached(d, train_te):   # caption dropout: the empty caption's row comes last (BatchDataset)
        cache = TextCache(Path(d.cache_dir or default_cache_dir()) / "text", spec, pipe, d.cache_to_disk)
        text_emb, pooled = cache.get([i.caption for i in items] + ([""] if d.caption_dropout else []))
    ds = BatchDataset(items, d, s.batch_size, s.seed, spec.tokenizers(pipe), text_emb=text_emb, pooled=pooled,
                      preserve=preserve, time_ids=spec.time_ids)
    if preserve is not None and cache is not None:   # the preserved captions' text, cached alike
        ds.preserve_text = cache.get(ds.preserved_captions)
    if d.cache_latents:
        cache = LatentCache(Path(d.cache_dir or default_cache_dir()) / "latents", pipe.vae, model_identity(pipe.vae),
                            d.cache_to_disk)
        n = cache.ensure(ds.latent_jobs(), accelerator.process_index, accelerator.num_processes)
        accelerator.wait_for_everyone()
        log.info("latent cache %s: %d encoded by this process", cache.folder, n)
        ds.load_latents(cache)
    log.info("%d batches per epoch; buckets %s", len(ds), ds.bucket_counts())
    return ds, text_emb


def _text_encoders(pipe) -> dict[str, nn.Module]:
    """The pipeline's text encoders by component name (those it has: SD 3.5 may come without T5)."""
    return {n: getattr(pipe, n) for n in spec_of(pipe).text_encoders if getattr(pipe, n, None) is not None}


def lora_for_arch(cfg: SDTrainConfig, spec: ArchSpec, denoiser) -> LoraConfig:
    """[lora] for this architecture: SD 3.5's default targets are the joint attention (the UNet default,
    cross_attn, names no MMDiT module), the MMDiT presets are refused on a UNet, and the MMDiT's blocks are
    selected by index (_select_blocks)."""
    lora, targets = cfg.lora, cfg.lora.target_modules
    if cfg.flow.single_layers and not any(key == "flow.single_layers" for _, key, _ in spec.blocks):
        raise ConfigError(f"flow.single_layers = {cfg.flow.single_layers!r}: model.pretrained = {cfg.model.pretrained} "
                          f"is an {spec.name} model, which has no single-stream blocks (Flux has): remove "
                          "flow.single_layers", "flow.single_layers")
    if not spec.flow:
        if targets in MMDIT_PRESETS.values():
            name = next(k for k, v in MMDIT_PRESETS.items() if v == targets)
            raise ConfigError(f"lora.target_modules = {name!r} is an SD 3.5 / Flux (MMDiT) preset; model.pretrained = "
                              f"{cfg.model.pretrained} is an {spec.name} UNet: use cross_attn, attn or a regex")
        return lora
    odd = [(key, a.type) for key, a in (("lora", lora), ("text_encoder_lora", cfg.text_encoder_lora),
                                          ("text_encoder_2_lora", cfg.text_encoder_2_lora))
           if a is not None and a.type != "lora"]
    if odd:
        raise ConfigError(f"{odd[0][0]}.type = {odd[0][1]!r}: the {spec.name} files (kohya's native names, diffusers' "
                          "layout) hold LoRA only so far: use lora.type = \"lora\"", f"{odd[0][0]}.type")
    if targets == CROSS_ATTN:
        log.info("lora.target_modules: %s trains the joint attention by default (preset joint_attn)", spec.name)
        targets = MMDIT_PRESETS["joint_attn"]
    with values_checked():
        return _select_blocks(cfg, spec, denoiser, replace(lora, target_modules=targets, layers=[]))


def _select_blocks(cfg: SDTrainConfig, spec: ArchSpec, denoiser, lora: LoraConfig) -> LoraConfig:
    """`lora` narrowed to the blocks picked by index (kohya's train_double_block_indices /
    train_single_block_indices): lora.layers picks the joint (Flux: double) blocks, flow.single_layers Flux's
    single blocks, each a list of indices or 'top:K'; each leaves the other kind of block, and the modules outside
    the blocks, as lora.target_modules names them. An index beyond the blocks, or a selection that holds no
    targeted module, is one line."""
    picked = {}   # block attribute -> the indices picked
    for attr, key, kind in spec.blocks:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value:
            continue
        blocks = getattr(denoiser, attr)
        try:
            picked[attr] = resolve_indices(value, len(blocks), key)
        except ValueError as e:
            raise ConfigError(f"{e} ({key} counts {spec.name}'s {kind} blocks)", key) from None
        if not any(lora.matches(f"{attr}.{i}.{n}") for i in picked[attr] for n, m in blocks[i].named_modules()
                   if supported(m)):
            hint = " (the presets attn+ff and all_linear train them, joint_attn does not)" if kind == "single" else ""
            raise ConfigError(f"{key} = {value!r} picks {spec.name}'s {kind} blocks {picked[attr]}, but "
                              f"lora.target_modules names no module in them{hint}: target them or remove {key}", key)
    if not picked:
        return lora
    targets = lora.target_modules
    if not isinstance(targets, str):   # PEFT's list matching: equal, or ending with "." + a name
        targets = rf"(?:.*\.)?(?:{'|'.join(map(re.escape, targets))})"
    inside = "|".join(rf"{re.escape(attr)}\.({'|'.join(map(str, picked[attr]))})\." if attr in picked
                      else rf"{re.escape(attr)}\." for attr, _, _ in spec.blocks)
    outside = "|".join(re.escape(attr) for attr, _, _ in spec.blocks)
    return replace(lora, target_modules=rf"(?:(?={inside})|(?!(?:{outside})\.))(?:{targets})")


def _add_adapters(cfg: SDTrainConfig, pipe) -> dict[str, nn.Module]:
    """Freeze the pipeline, add the LoRA of [lora] to the denoiser (UNet or MMDiT) and of [text_encoder_lora] /
    [text_encoder_2_lora] to the text encoders; returns the adapted components by name."""
    spec, tes = spec_of(pipe), _text_encoders(pipe)
    denoiser = getattr(pipe, spec.denoiser)
    if cfg.text_encoder_2_lora is not None and "text_encoder_2" not in tes:
        raise ConfigError(f"text_encoder_2_lora: model.pretrained = {cfg.model.pretrained} is an {arch_of(pipe)} "
                          "model with one text encoder; [text_encoder_2_lora] is for SDXL and SD 3.5 only (remove the "
                          "table, use [text_encoder_lora])")
    if cfg.text_encoder_2_lora is not None and spec.t5 == 2:
        raise ConfigError(f"text_encoder_2_lora: {spec.name}'s second text encoder is T5, which lora-sd does not train; "
                          "remove the table ([text_encoder_lora] trains CLIP-L)")
    for m in (denoiser, pipe.vae, *tes.values()):
        m.requires_grad_(False)
    targets = add_lora(denoiser, lora_for_arch(cfg, spec, denoiser), strict="lora")
    components = {spec.denoiser: denoiser}
    if cfg.embedding.token:
        if "text_encoder_2" in tes:
            raise ConfigError(f"embedding.token: model.pretrained = {cfg.model.pretrained} is an {spec.name} model; "
                              "trained token embeddings are for SD 1.x / 2.x (one text encoder) only; remove [embedding]")
        add_trained_token(tes["text_encoder"], pipe.tokenizer, cfg.embedding.token, cfg.embedding.init_word)
        targets.append(f"text_encoder embedding of {cfg.embedding.token!r}")
    for name, tcfg in (("text_encoder", cfg.text_encoder_lora), ("text_encoder_2", cfg.text_encoder_2_lora)):
        if tcfg is not None:
            targets += [f"{name}.{n}" for n in add_lora(tes[name], tcfg, strict=f"{name}_lora")]
            components[name] = tes[name]
    log.info("%s: %s r=%d alpha=%g on %d modules (%d trainable parameters)", spec.name, cfg.lora.type, cfg.lora.r,
             cfg.lora.alpha, len(targets),
             sum(p.numel() for m in (denoiser, *tes.values()) for p in m.parameters() if p.requires_grad))
    return components


def _place(cfg: SDTrainConfig, pipe, components: dict, accelerator) -> None:
    """Frozen weights in the mixed-precision dtype, the VAE in fp32 or bf16 (never fp16: SD's VAEs, SDXL's
    above all, give NaN latents in fp16), gradient checkpointing, the device."""
    s, spec = cfg.train, spec_of(pipe)
    weight_dtype = torch_dtype(s.mixed_precision)
    for m in (getattr(pipe, spec.denoiser), *_text_encoders(pipe).values()):
        _cast_frozen(m, weight_dtype)
    vae = pipe.vae
    if weight_dtype == torch.bfloat16:
        vae.to(torch.bfloat16)
    elif next(vae.parameters()).dtype == torch.float16:
        log.info("the VAE was loaded in fp16: upcast to fp32 (its fp16 gives NaN latents)")
        vae.to(torch.float32)
    elif weight_dtype == torch.float16 and spec.name == "sdxl":
        log.info("train.mixed_precision = fp16: the SDXL VAE stays fp32 (its fp16 gives NaN latents)")
    _store_small(cfg, pipe, weight_dtype)
    if s.gradient_checkpointing:
        getattr(pipe, spec.denoiser).enable_gradient_checkpointing()
        for name, m in components.items():
            if name != spec.denoiser:
                m.gradient_checkpointing_enable()
        log.info("gradient checkpointing: on for %s", ", ".join(components))
    if s.offload_blocks:   # before the move: the offloaded blocks' weights never reach the device whole
        offload_blocks(getattr(pipe, spec.denoiser), s.offload_blocks, accelerator.device)
    pipe.to(accelerator.device)


def _store_small(cfg: SDTrainConfig, pipe, weight_dtype: torch.dtype) -> None:
    """model.weight_dtype: each part set there stored so (fp8_e4m3 / int8: lora_core.lowmem), after the
    adapters are added (they wrap the full-precision layers)."""
    for part, storage in cfg.model.weight_dtype.chosen().items():
        for name in WEIGHT_PARTS[part]:
            m = getattr(pipe, name, None)
            if m is not None:   # the VAE's other weights keep the dtype chosen above (never fp16)
                n = store_frozen(m, storage, next(m.parameters()).dtype if part == "vae" else weight_dtype)
                log.info("model.weight_dtype.%s = %s: %s frozen weights %.1f MiB%s", part, storage, name,
                         stored_bytes(m) / 2**20, f" ({n} layers quantized)" if n else "")


def check_memory_settings(cfg: SDTrainConfig, device) -> None:
    """The memory settings this device or this install cannot do, as one line each, before any model loads."""
    for part, storage in cfg.model.weight_dtype.chosen().items():
        check_storage(storage, str(device), f"model.weight_dtype.{part}")
    optimizer_class(cfg.train)
    n = cfg.train.offload_blocks
    den, path = denoiser_config(cfg.model.pretrained, cfg.model.config) if n else (None, "")
    most = config_blocks(den) if den is not None else n   # no config file: lora_core.offload says it once loaded
    if n > most:
        raise ConfigError(f"train.offload_blocks = {n}: the {den.get('_class_name', 'denoiser')} has only {most} "
                          f"blocks ({path}); use at most {most}", "train.offload_blocks")


def _objective(cfg: SDTrainConfig, pipe, spec: ArchSpec):
    """The training objective: rectified flow (lora_sd.flow, [flow]) for an MMDiT, the DDPM scheduler for a UNet
    (its [flow] and SD 3.5's its UNet-only fields are refused in one line where they cannot apply)."""
    timesteps = (cfg.loss.min_timestep, cfg.loss.max_timestep)
    if not spec.flow:
        if cfg.flow != type(cfg.flow)():
            raise ConfigError(f"[flow]: model.pretrained = {cfg.model.pretrained} is an {spec.name} UNet model trained "
                              "with the DDPM noise schedule; [flow] is for SD 3.5 and Flux (rectified flow) only: remove it")
        if cfg.model.prediction_type:
            pipe.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
        return DDPMScheduler.from_config(pipe.scheduler.config)
    for key, value in (("loss.min_snr_gamma", cfg.loss.min_snr_gamma), ("model.prediction_type", cfg.model.prediction_type)):
        if value:
            raise ConfigError(f"{key} = {value!r}: {spec.name} is trained with rectified flow (it predicts the velocity); "
                              f"remove {key} and weight the loss with flow.loss_weighting instead")
    f = cfg.flow
    if f.guidance_scale != 1.0 and not getattr(pipe.transformer.config, "guidance_embeds", False):
        raise ConfigError(f"flow.guidance_scale = {f.guidance_scale}: {cfg.model.pretrained} has no guidance embedding "
                          "(only Flux dev has); remove flow.guidance_scale")
    _check_patches(cfg, pipe, spec)
    return FlowMatch(pipe.scheduler.config, f.timestep_density, f.loss_weighting, logit_mean=f.logit_mean,
                     logit_std=f.logit_std, mode_scale=f.mode_scale, shift=f.shift, timesteps=timesteps,
                     sigmoid_scale=f.sigmoid_scale, flux_shift=f.flux_shift)


def _check_patches(cfg: SDTrainConfig, pipe, spec: ArchSpec) -> None:
    """The MMDiTs take 2x2 latent patches as tokens (SD 3.5's patch_size, Flux's packing): every image side must
    be a multiple of twice the VAE's downscale."""
    unit = 2 * pipe.vae_scale_factor
    d = cfg.data
    for key, value in (("data.resolution", d.resolution), ("data.bucket_step", d.bucket_step if d.buckets else unit)):
        if value % unit:
            raise ConfigError(f"{key} = {value}: {spec.name} takes 2x2 latent patches, so image sides must be "
                              f"multiples of {unit}; use a multiple of {unit}")


def _loss_module(cfg: SDTrainConfig, pipe, objective, train_te: bool, text_cached: bool) -> DiffusionLoss:
    """The DiffusionLoss of the run: the text encoders only where their outputs are not cached (or trained)."""
    keep = train_te or not text_cached
    tes = _text_encoders(pipe) if keep else {}
    vae = pipe.vae
    return DiffusionLoss(getattr(pipe, spec_of(pipe).denoiser), objective, train_text_encoder=train_te, **tes,
                         vae=None if cfg.data.cache_latents else vae,
                         scaling_factor=float(vae.config.scaling_factor),
                         shift_factor=float(vae.config.get("shift_factor", None) or 0.0),
                         min_snr_gamma=cfg.loss.min_snr_gamma, noise_offset=cfg.loss.noise_offset,
                         prior_loss_weight=cfg.loss.prior_loss_weight,
                         timesteps=(cfg.loss.min_timestep, cfg.loss.max_timestep),
                         preserve_weight=cfg.loss.preserve_weight, guidance=cfg.flow.guidance_scale)


def _run(cfg: SDTrainConfig, run: RunDir, accelerator, resume, pipe, items) -> dict:
    s, d = cfg.train, cfg.data
    items, val_items = split_val(cfg, items)
    log.info("dataset %s: %d images, %d samples per epoch", d.path, len(items), sum(i.repeats for i in items))

    set_seed(s.seed)   # same LoRA init on every process
    check_memory_settings(cfg, accelerator.device)
    owned = pipe is None   # a pipeline given by the caller is returned whole (CachedParts)
    if pipe is None:
        pipe = load_pipeline(cfg.model.pretrained, cfg.model.config, cfg.model.revision, cfg.model.variant,
                             prediction_type=cfg.model.prediction_type)
    spec = spec_of(pipe)
    refuse_non_finite_base({n: getattr(pipe, n) for n in (spec.denoiser, *spec.text_encoders, "vae")
                            if getattr(pipe, n, None) is not None}, cfg.model.pretrained)
    objective = _objective(cfg, pipe, spec)
    components = _add_adapters(cfg, pipe)
    train_te = cfg.trains_text_encoder
    _place(cfg, pipe, components, accelerator)

    preserve = None
    if cfg.loss.preserve_weight:   # the training set only: the validation loss leaves the term out
        preserve = Preservation(cfg.preserve_trigger, tuple(cfg.loss.preserve_class), cfg.loss.preserve_empty)
        preserve.check(items)
    ds, text_emb = _dataset(cfg, items, pipe, accelerator, train_te, preserve)
    module = _loss_module(cfg, pipe, objective, train_te, text_emb is not None)
    dl = torch.utils.data.DataLoader(ds, batch_size=1, sampler=ds.sampler, collate_fn=first,
                                     num_workers=s.num_workers)

    ema = make_ema(module, s)
    # the parts whose outputs are cached leave the device; dropped unless validation images will need them (or
    # the pipeline is the caller's)
    parts = CachedParts(pipe, spec.cached_parts(cfg), accelerator.device,
                        drop=owned and not (cfg.sample.prompts or cfg.sample.grid))
    export, sample = _export_and_sample(cfg, run, accelerator, pipe, module, components, len(items), ema, parts)
    val_fn = _val_fn(cfg, val_items, pipe, accelerator, train_te, module)
    parts.leave()

    set_seed(s.seed, device_specific=True)   # different noise on each process
    try:
        status = train(accelerator=accelerator, run=run, model=module, dataloader=dl, loss_fn=lambda m, b: m(b),
                       settings=s, resume=resume, export_fn=export, sample_fn=sample, ema=ema, val_fn=val_fn,
                       part_lrs={TOKEN_VECTORS: cfg.embedding.learning_rate} if cfg.embedding.learning_rate else None)
        if accelerator.is_main_process and cfg.sample.grid and status.get("state") == "done":   # lora_sd.grid
            with accelerator.autocast(), parts.on_device():
                end_of_run_grid(cfg, pipe, run.path)
    finally:
        parts.restore()
    return status


def _export_and_sample(cfg: SDTrainConfig, run: RunDir, accelerator, pipe, module, components, n_images: int,
                       ema: Optional[EMA], parts: CachedParts):
    """(export_fn, sample_fn) of the training loop: the adapter files (and <name>_ema.safetensors with
    train.ema_decay), and the validation images (with the EMA weights when sample.use_ema; the parked text
    encoders and VAE on the device meanwhile)."""
    resolution = cfg.data.resolution
    main_format = formats.KOHYA
    if spec_of(pipe).flow and cfg.lora.use_dora:   # lora_sd.formats: fused q/k/v have no kohya DoRA form
        log.warning("lora.use_dora on %s: the kohya layout fuses q/k/v, which has no DoRA form; %s.safetensors is "
                    "written in the diffusers layout", spec_of(pipe).name, cfg.output.name)
        main_format = formats.DIFFUSERS

    def export(folder: Path, step: int) -> None:
        adapter = formats.from_model(components)
        prediction = "flow" if spec_of(pipe).flow else pipe.scheduler.config.get("prediction_type", "")
        meta = training_metadata(cfg, n_images, resolution, step, prediction)
        if is_random_weights(pipe):
            meta["lora_sd.base_model_note"] = RANDOM_WEIGHTS_NOTE
        dtype = torch_dtype(cfg.output.save_dtype)
        main = folder / f"{cfg.output.name}.safetensors"
        formats.write_adapter(main, adapter, main_format, meta, dtype)
        if cfg.output.save_diffusers:
            formats.write_adapter(folder / DIFFUSERS_FILE, adapter, formats.DIFFUSERS, meta, dtype)
        tokens = trained_tokens(pipe.text_encoder)
        if tokens is not None:
            write_embedding(embedding_path(main), tokens, meta)
        with ema.swapped() if ema is not None else contextlib.nullcontext(False) as used:
            if used:
                meta = {**meta, "lora_sd.ema_decay": str(ema.decay)}
                ema_file = folder / f"{cfg.output.name}_ema.safetensors"
                formats.write_adapter(ema_file, formats.from_model(components), main_format, meta, dtype)
                if tokens is not None:
                    write_embedding(embedding_path(ema_file), tokens, meta)

    def sample(step: int) -> None:
        sc = cfg.sample
        if not sc.prompts:
            return
        was_training = module.training
        module.eval()
        use_ema = ema is not None and sc.use_ema
        try:
            with accelerator.autocast(), ema.swapped() if use_ema else contextlib.nullcontext(), parts.on_device():
                # fp16/bf16 UNet and text encoder, fp32 VAE and LoRA weights
                results = generate(pipe, sc.prompts, negative_prompt=sc.negative_prompt, steps=sc.steps,
                                   guidance_scale=sc.guidance_scale, seed=sc.seed, width=sc.width or resolution,
                                   height=sc.height or resolution, scheduler=sc.scheduler, out_dir=run.samples,
                                   prefix=f"step_{step:06d}_", base={"model": cfg.model.pretrained, "train_step": step})
        finally:
            module.train(was_training)
        log.info("step %d: %d validation image(s) in %s", step, len(results), run.samples)
        if sc.grid_every:   # [sample] grid_every: lora_sd.grid
            grid_so_far(cfg, run.path, step, str(accelerator.device))

    return export, sample


# ------------------------------------------------------------------ validation loss
def split_val(cfg: SDTrainConfig, items: list) -> tuple[list, list]:
    """(training items, held-out items): data.val_path, or data.val_fraction of the images chosen with train.seed."""
    d = cfg.data
    if d.val_path:
        return items, load_items(replace(d, path=d.val_path, max_images=0, reg_path="", reg_repeats=1))
    if not d.val_fraction:
        return items, []
    own = [k for k, it in enumerate(items) if not it.is_reg]   # class images are never held out
    n = max(1, round(len(own) * d.val_fraction))
    if n >= len(own):
        raise DatasetError(f"data.val_fraction = {d.val_fraction} holds out all {len(own)} image(s) of {d.path}; "
                           "lower it or use data.val_path")
    perm = torch.randperm(len(own), generator=torch.Generator().manual_seed(cfg.train.seed))[:n].tolist()
    held = {own[k] for k in perm}
    return [it for k, it in enumerate(items) if k not in held], [it for k, it in enumerate(items) if k in held]


@torch.no_grad()
def validation_loss(module: DiffusionLoss, ds, n_points: int, seed: int, device) -> float:
    """The mean denoising MSE over the batches of `ds` at n_points fixed noise levels (evenly spaced timesteps;
    rectified flow: evenly spaced draws of its σ table), with noise from its own generator and the VAE
    distribution's mean, in eval mode (no dropout): the same weights give the same number, and the global RNG
    is untouched."""
    was = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for i in range(len(ds)):
            batch = {k: v.to(device) for k, v in ds[i].items()}
            lat = module.latents(batch, sample=False)
            cond, extra = module.condition(batch)
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            for k in range(n_points):
                noise = torch.randn(lat.shape, generator=g).to(device)
                nz = module.objective.fixed(lat, noise, k, n_points)
                pred = module.predict(nz.noisy, nz.timestep, cond, extra)
                total += F.mse_loss(pred, nz.target.float(), reduction="none").flatten(1).mean(1).sum().item()
                count += lat.shape[0]
    finally:
        module.train(was)
    return total / count


def _val_fn(cfg: SDTrainConfig, val_items: list, pipe, accelerator, train_te: bool, module: DiffusionLoss):
    """val_fn(step) of the training loop, or None without a validation split: center-cropped, unflipped
    held-out images (cached like the training ones)."""
    if not val_items:
        if cfg.train.val_every:
            log.warning("train.val_every is set but there is no validation split (data.val_path / data.val_fraction)")
        return None
    # fixed images and captions: no flip, no random crop, no caption dropout or tag shuffling
    d = replace(cfg.data, random_flip=False, center_crop=True, caption_dropout=0.0, shuffle_tags=False, keep_tokens=0,
                reg_path="", reg_repeats=1)
    vds, _ = _dataset(replace(cfg, data=d), [replace(i, repeats=1) for i in val_items], pipe, accelerator, train_te)
    log.info("validation loss on %d held-out image(s) at %d timesteps", len(val_items), cfg.data.val_timesteps)

    def val(step: int) -> float:
        with accelerator.autocast():
            return validation_loss(module, vds, cfg.data.val_timesteps, cfg.train.seed, accelerator.device)
    return val
