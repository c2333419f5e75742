"""What differs between the architectures the trainer handles, in one place: which pipeline part denoises,
which text encoders it has and how their outputs condition it, the training objective (the DDPM noise
schedule or rectified flow, lora_sd.flow), and SDXL's micro-conditioning. lora_sd.train reads the
description of the pipeline at hand (`spec_of`) instead of asking which architecture it is."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .data import Tokenizers, sd1_text, sd3_text, sdxl_cond
from .models import arch_of


def _no_extra(pooled, batch: dict) -> dict:
    return {}


def _sdxl_extra(pooled, batch: dict) -> dict:
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": batch["time_ids"]}}


def _sd3_extra(pooled, batch: dict) -> dict:
    return {"pooled_projections": pooled}


@dataclass(frozen=True)
class ArchSpec:
    name: str
    denoiser: str                      # the pipeline part that denoises: "unet" | "transformer"
    text_encoders: tuple[str, ...]     # the pipeline's text encoders, by component name
    encode: Callable                   # (encoders by name, token ids by batch key) -> (embeddings, pooled or None)
    extra: Callable = _no_extra        # (pooled, batch) -> the denoiser's further keyword arguments
    flow: bool = False                 # rectified flow (lora_sd.flow) instead of the DDPM noise schedule
    time_ids: bool = False             # SDXL's micro-conditioning (original size, crop, target size)
    t5_length: int = 0                 # the T5 tokenizer's padded length (SD 3.5: 256, as its pipeline)

    def predict(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, extra: dict) -> torch.Tensor:
        """The denoiser's output in fp32 (UNets take (sample, timestep, states); MMDiTs take keywords)."""
        if self.denoiser == "unet":
            return denoiser(noisy, t, cond, **extra).sample.float()
        return denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=cond, **extra).sample.float()

    def tokenizers(self, pipe) -> Tokenizers:
        names = [n.replace("text_encoder", "tokenizer") for n in self.text_encoders]
        return Tokenizers(*(getattr(pipe, n) for n in names), t5_length=self.t5_length)


_CLIP = ("text_encoder",)
SPECS = {
    "sd1": ArchSpec("sd1", "unet", _CLIP, sd1_text),
    "sd2": ArchSpec("sd2", "unet", _CLIP, sd1_text),
    "sdxl": ArchSpec("sdxl", "unet", ("text_encoder", "text_encoder_2"), sdxl_cond, _sdxl_extra, time_ids=True),
    "sd3": ArchSpec("sd3", "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"), sd3_text,
                    _sd3_extra, flow=True, t5_length=256),
}


def spec_of(pipe_or_denoiser) -> ArchSpec:
    """The description of a pipeline's (or a denoiser's) architecture; a module without a diffusers config (a
    test's stand-in UNet) is SD 1.x."""
    if getattr(pipe_or_denoiser, "config", None) is None and not hasattr(pipe_or_denoiser, "components"):
        return SPECS["sd1"]
    return SPECS[arch_of(pipe_or_denoiser)]
