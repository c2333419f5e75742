"""The rectified-flow objective shared by the MMDiT families (SD 3.5; Flux builds on it).

A training sample at noise level σ in [0, 1] is x_t = (1 − σ)·x_0 + σ·ε and the model predicts the velocity
ε − x_0 (the SD 3 paper's rectified flow; diffusers' train_dreambooth_lora_sd3.py without output
preconditioning). σ is drawn as diffusers draws it: u from a density on [0, 1] (`uniform`, `logit_normal`
with mean and std, `mode` with its scale), then the scheduler's shifted σ table read at index ⌊u·N⌋
(FlowMatchEulerDiscreteScheduler, N = num_train_timesteps, the model's timestep is σ·N); each item's loss is
weighted by `none`, `sigma_sqrt` (σ⁻²) or `cosmap`. The validation loss uses fixed σ (see `fixed`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

DENSITIES = ("uniform", "logit_normal", "mode", "sigmoid")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class Noised(NamedTuple):
    """One noised batch: what the model sees (noisy latents, timestep), what it should predict, and the
    per-item loss weight (None = 1)."""
    noisy: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor]


def timestep_density(density: str, n: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29, sigmoid_scale: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n draws u in [0, 1] (on the CPU): uniform; logit_normal = sigmoid of N(logit_mean, logit_std²) (the SD 3
    paper's choice); mode = the SD 3 paper's mode sampling with heavy tails, u' = 1 − u − s·(cos²(πu/2) − 1 + u);
    sigmoid = sigmoid(sigmoid_scale · N(0, 1)) (kohya's Flux timestep_sampling = sigmoid)."""
    if density == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator))
    if density == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn((n,), generator=generator))
    u = torch.rand((n,), generator=generator)
    if density == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if density != "uniform":
        raise ValueError(f"flow.timestep_density = {density!r}: use one of {', '.join(DENSITIES)}")
    return u


def loss_weight(weighting: str, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-item loss weight at noise levels `sigmas`: None (none), σ⁻² (sigma_sqrt), or the cosine-map
    weighting 2 / (π (1 − 2σ + 2σ²)) (cosmap)."""
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    if weighting != "none":
        raise ValueError(f"flow.loss_weighting = {weighting!r}: use one of {', '.join(WEIGHTINGS)}")
    return None


def flux_mu(seq_len: int, config) -> float:
    """Flux's resolution-dependent shift parameter, as diffusers computes it from the image's sequence length
    (packed tokens): linear from base_shift at base_image_seq_len to max_shift at max_image_seq_len."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    return seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]


def time_shift(mu: float, u: torch.Tensor) -> torch.Tensor:
    """The exponential time shift σ = e^μ / (e^μ + (1/u − 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def noise_at(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) = ((1 − σ)·x_0 + σ·ε, ε − x_0), σ per item."""
    s = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise, noise - latents


class FlowMatch:
    """The objective of one run: sample(latents, noise) draws σ for each item (global RNG, as the rest of a
    training step) and returns the Noised batch; fixed(latents, noise, k, n) is the k-th of n fixed
    validation points. `timesteps` = (lo, hi) restricts the table indices to [lo, hi) (loss.min_timestep /
    max_timestep; the default is all of them). `shift` replaces the scheduler's own shift when > 0. With
    `flux_shift` σ is continuous: u shifted by flux_mu of the batch's packed sequence length (Flux dev's
    resolution-dependent shift), timestep σ·N."""

    def __init__(self, scheduler_config, density: str = "logit_normal", weighting: str = "none", *,
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 0.0,
                 timesteps: tuple[int, int] = (0, 1000), sigmoid_scale: float = 1.0, flux_shift: bool = False):
        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config, **({"shift": shift} if shift else {}))
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.sigma_table, self.timestep_table = sched.sigmas.clone(), sched.timesteps.clone()
        self.lo, self.hi = timesteps[0], min(timesteps[1], self.num_train_timesteps)
        if self.lo >= self.hi:
            raise ValueError(f"loss.min_timestep {timesteps[0]}: the scheduler has only {self.num_train_timesteps} "
                             "timesteps; lower it")
        self.density, self.weighting, self.flux_shift = density, weighting, flux_shift
        self.shift_config = dict(sched.config)
        self.density_args = dict(logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                                 sigmoid_scale=sigmoid_scale)
        loss_weight(weighting, torch.ones(1))   # an unknown name fails here, not at the first step
        timestep_density(density, 1, generator=torch.Generator(), **self.density_args)

    def indices(self, u: torch.Tensor) -> torch.Tensor:
        """The σ-table indices of draws u in [0, 1]: ⌊u·N⌋ over [lo, hi) (diffusers' ⌊u·N⌋ by default)."""
        return (u * (self.hi - self.lo) + self.lo).long().clamp(self.lo, self.hi - 1)

    def sigmas(self, u: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, timestep) of draws u for these latents: the table at ⌊u·N⌋, or with flux_shift u shifted."""
        if self.flux_shift:
            seq_len = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
            sigmas = time_shift(flux_mu(seq_len, self.shift_config), u)
            return sigmas, sigmas * self.num_train_timesteps
        idx = self.indices(u)
        return self.sigma_table[idx], self.timestep_table[idx]

    def at(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor, weighted: bool = True) -> Noised:
        sigmas, timesteps = self.sigmas(u, latents)
        noisy, target = noise_at(latents, noise, sigmas)
        weight = loss_weight(self.weighting, sigmas) if weighted else None
        return Noised(noisy, timesteps.to(latents.device), target, None if weight is None else weight.to(latents.device))

    def sample(self, latents: torch.Tensor, noise: torch.Tensor) -> Noised:
        return self.at(latents, noise, timestep_density(self.density, latents.shape[0], **self.density_args))

    def fixed(self, latents: torch.Tensor, noise: torch.Tensor, k: int, n: int) -> Noised:
        """The k-th of n evenly spaced validation points, u = (k + 1) / (n + 1), unweighted."""
        return self.at(latents, noise, torch.full((latents.shape[0],), (k + 1) / (n + 1)), weighted=False)
