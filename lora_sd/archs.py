"""What differs between the architectures the trainer handles, in one place: which pipeline part denoises,
which text encoders it has and how their outputs condition it, the training objective (the DDPM noise
schedule or rectified flow, lora_sd.flow), and SDXL's micro-conditioning. lora_sd.train reads the
description of the pipeline at hand (`spec_of`) instead of asking which architecture it is."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import FLOW_ARCHS
from .data import Tokenizers, flux_text, sd1_text, sd3_text, sdxl_cond
from .models import arch_of
from .single_file import CONFIG_DIR, SIZES


def _no_extra(pooled, batch: dict) -> dict:
    return {}


def _sdxl_extra(pooled, batch: dict) -> dict:
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": batch["time_ids"]}}


def _pooled_projections(pooled, batch: dict) -> dict:
    return {"pooled_projections": pooled}


def unet_call(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
    """A UNet takes (sample, timestep, encoder_hidden_states)."""
    return denoiser(noisy, t, cond, **extra).sample


def mmdit_call(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
    """SD 3.5's MMDiT takes keywords (the pooled embedding as pooled_projections) and the timestep σ·1000."""
    return denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=cond, **extra).sample


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): 2x2 patches as tokens, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_latents for latents of height h and width w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """The position ids of the packed tokens of (h, w) latents: (h/2 · w/2, 3) with (0, row, column)."""
    rows = torch.arange(h // 2, device=device)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)


def flux_call(denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
    """Flux's transformer on packed latents with their position ids and zero text ids, the timestep σ (the
    objective's σ·1000 / 1000), dev's guidance embedding fed the constant extra["guidance"] (schnell has
    none); its output unpacked to the latents' shape."""
    extra = dict(extra)
    scale = extra.pop("guidance", 1.0)
    b, _, h, w = noisy.shape
    guidance = torch.full((b,), scale, device=noisy.device) if denoiser.config.guidance_embeds else None
    out = denoiser(hidden_states=pack_latents(noisy), timestep=t / 1000, guidance=guidance, encoder_hidden_states=cond,
                   txt_ids=torch.zeros(cond.shape[1], 3, device=noisy.device, dtype=cond.dtype),
                   img_ids=image_ids(h, w, noisy.device, cond.dtype), **extra).sample
    return unpack_latents(out, h, w)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    denoiser: str                      # the pipeline part that denoises: "unet" | "transformer"
    text_encoders: tuple[str, ...]     # the pipeline's text encoders, by component name
    encode: Callable                   # (encoders by name, token ids by batch key) -> (embeddings, pooled or None)
    extra: Callable = _no_extra        # (pooled, batch) -> the denoiser's further keyword arguments
    call: Callable = unet_call         # (denoiser, noisy latents, timestep, embeddings, extra) -> prediction
    time_ids: bool = False             # SDXL's micro-conditioning (original size, crop, target size)
    t5: int = 0                        # which text encoder is T5 (1-based; 0: none) and its padded length
    t5_length: int = 0
    guidance: bool = False             # a guidance embedding fed a constant (Flux dev: flow.guidance_scale)
    # the MMDiT's block lists that a config selects by index: (the transformer's attribute, the config key that
    # selects them, what they are called); the UNets' lora.layers is PEFT's layers_to_transform (lora_core)
    blocks: tuple[tuple[str, str, str], ...] = ()

    @property
    def flow(self) -> bool:
        """Rectified flow (lora_sd.flow) instead of the DDPM noise schedule (lora_sd.config.FLOW_ARCHS)."""
        return self.name in FLOW_ARCHS

    def predict(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
        """The denoiser's output in fp32."""
        return self.call(denoiser, noisy, t, cond, extra).float()

    def cached_parts(self, cfg) -> tuple[str, ...]:
        """The frozen parts whose outputs a run of `cfg` caches before the first step, which then need not stay on
        the device (lora_sd.text_cache.CachedParts): the text encoders (SDTrainConfig.caches_text), the VAE
        (data.cache_latents)."""
        return (self.text_encoders if cfg.caches_text else ()) + (("vae",) if cfg.data.cache_latents else ())

    def tokenizers(self, pipe) -> Tokenizers:
        names = [n.replace("text_encoder", "tokenizer") for n in self.text_encoders]
        return Tokenizers(*(getattr(pipe, n) for n in names), t5_length=self.t5_length, t5=self.t5)


_CLIP = ("text_encoder",)
SPECS = {
    "sd1": ArchSpec("sd1", "unet", _CLIP, sd1_text),
    "sd2": ArchSpec("sd2", "unet", _CLIP, sd1_text),
    "sdxl": ArchSpec("sdxl", "unet", ("text_encoder", "text_encoder_2"), sdxl_cond, _sdxl_extra, time_ids=True),
    "sd3": ArchSpec("sd3", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"), sd3_text,
                    _pooled_projections, mmdit_call, t5=3, t5_length=256,
                    blocks=(("transformer_blocks", "lora.layers", "joint"),)),
    "flux": ArchSpec("flux", "transformer", ("text_encoder", "text_encoder_2"), flux_text, _pooled_projections, flux_call,
                     t5=2, t5_length=512, guidance=True,
                     blocks=(("transformer_blocks", "lora.layers", "double"),
                             ("single_transformer_blocks", "flow.single_layers", "single"))),
}


def spec_of(pipe_or_denoiser) -> ArchSpec:
    """The description of a pipeline's (or a denoiser's) architecture; a module without a diffusers config (a
    test's stand-in UNet) is SD 1.x."""
    if getattr(pipe_or_denoiser, "config", None) is None and not hasattr(pipe_or_denoiser, "components"):
        return SPECS["sd1"]
    return SPECS[arch_of(pipe_or_denoiser)]


def denoiser_config(pretrained: str, config: str = "") -> tuple[Optional[dict], str]:
    """(the denoiser's diffusers config, the file it was read from), read before any model loads: from a diffusers
    folder (model.config, else model.pretrained) or a released model's shipped configs; (None, "") where only
    loading tells (a tiny model, another hub id, a single file without model.config)."""
    released = [CONFIG_DIR / name for name, size in SIZES.items() if size[2] == pretrained]
    for folder in [Path(p).expanduser() for p in (config, pretrained) if p] + released:
        for part in ("unet", "transformer"):
            path = folder / part / "config.json"
            if path.is_file():
                return json.loads(path.read_text(encoding="utf-8")), str(path)
    return None, ""


def config_blocks(den: dict) -> int:
    """How many blocks block offloading (lora_core.offload.model_blocks) finds in the denoiser of diffusers config
    `den`: a UNet's down, mid and up blocks; an MMDiT's transformer blocks (Flux: and its single blocks)."""
    if "down_block_types" in den:
        return len(den["down_block_types"]) + len(den["up_block_types"]) + (den.get("mid_block_type") is not None)
    return den.get("num_layers", 0) + den.get("num_single_layers", 0)
