"""`lora-sd pretrain-tiny`: train a tiny SD-architecture pipeline from scratch on the synthetic world.

Its phases are each a run of the shared loop (lora_core.training.train: checkpoints, exact resume, NaN
guard, stop on SIGTERM, metrics.jsonl), in `<run_dir>/vae`, `decoder`, `denoiser` and `offset`:
1. the VAE (AutoencoderKL, 4x down) learns to reconstruct the images (MSE + a small KL term);
   its latent scaling factor is then set to 1 / (std of the latents), as SD's 0.18215 is;
2. the UNet (cross-attention) and the CLIP-architecture text encoder learn together, from scratch,
   to predict the noise (epsilon, SD's 1000-step schedule) on the frozen VAE's cached latents, with
   10 % of captions dropped to "" so classifier-free guidance works;
2b. the same UNet and text encoder continue with offset noise (a per-channel constant added to the
   noise) and a fresh, lower cosine schedule. SD's schedule leaves 7 % of the latent in x_T, and on
   16x16 latents the mean of pure noise is small enough that a model trained without offset noise
   reads the background from it instead of from the prompt (white prompts came out grey); the offset
   hides that mean, so the prompt decides.
The result is a diffusers folder (safetensors) with the CLIP tokenizer, a model card (README.md) and
pretrain.json (settings, timings, losses, file hashes). Everything follows from the seed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from lora_core.files import atomic_write_json, atomic_write_text
from lora_core.run import RunDir
from lora_core.settings import TrainSettings
from lora_core.training import EpochSampler, train

from . import synth
from .data import first, tokenize
from .models import load_tokenizer, weight_hashes
from .train import DiffusionLoss

log = logging.getLogger("lora_sd")
MAX_BYTES = 20 * 1024 * 1024     # the committed weights' budget


@dataclass
class PretrainSettings:
    seed: int = 0
    side: int = 64                        # image side; latents are side / 4
    n_images: int = 8192                  # synthetic training images (base concepts only)
    steps_vae: int = 600                  # the shipped model's settings (lora_sd/pretrained/tiny_synth/pretrain.json):
    steps_decoder: int = 300              # about 97 min in all with 2 torch threads on 2 CPU cores
    steps_unet: int = 6500
    steps_offset: int = 2000              # phase 2b: offset-noise continuation of the UNet + text encoder
    lr_offset: float = 3e-4
    noise_offset: float = 0.3
    n_decoder_images: int = 2048          # phase 1b: every colour x shape, held-out ones included
    batch_size: int = 32
    lr_vae: float = 1e-3
    lr_unet: float = 1e-3
    caption_dropout: float = 0.1
    kl_weight: float = 1e-5
    min_snr_gamma: float = 5.0
    vae_channels: tuple = (16, 32, 64)
    unet_channels: tuple = (32, 64, 64)
    text_hidden: int = 32                 # = the UNet's cross_attention_dim
    text_layers: int = 3
    checkpoint_every: int = 500


def build_components(s: PretrainSettings, tokenizer):
    """(vae, unet, text_encoder) with fresh weights drawn from the current torch RNG."""
    n = len(s.unet_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(s.vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * len(s.vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(s.vae_channels), layers_per_block=1,
                        norm_num_groups=min(32, min(s.vae_channels)), sample_size=s.side)
    with torch.no_grad():   # start with a small posterior std (0.05): sampling noise would drown the young encoder's mean
        vae.quant_conv.bias[4:].fill_(-6.0)
    unet = UNet2DConditionModel(
        sample_size=s.side // 2 ** (len(s.vae_channels) - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(s.unet_channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=s.text_hidden, attention_head_dim=8,
        norm_num_groups=min(32, min(s.unet_channels)))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=s.text_hidden, intermediate_size=2 * s.text_hidden,
        num_attention_heads=4, num_hidden_layers=s.text_layers, max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return vae, unet, text_encoder


def noise_scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type="epsilon", steps_offset=1)


def _pixels(scenes: list, side: int) -> torch.Tensor:
    """(N, 3, side, side) pixels in [-1, 1] of the rendered scenes."""
    px = np.stack([np.asarray(synth.render(sc, side)) for sc in scenes])
    return torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_data(s: PretrainSettings) -> tuple[torch.Tensor, list[str]]:
    """The pixels and the captions of n_images base-concept scenes."""
    scenes = synth.sample_scenes(s.n_images, s.seed)
    return _pixels(scenes, s.side), [sc.caption for sc in scenes]


class Batches(torch.utils.data.Dataset):
    """Item i = batch i of fixed, seeded batches over the tensors; input_ids are replaced by the empty
    caption's with probability `dropout` (drawn from (seed, epoch, batch), not the global RNG)."""

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, dropout: float = 0.0,
                 empty_ids: Optional[torch.Tensor] = None):
        n = len(next(iter(tensors.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        self.tensors, self.seed, self.dropout, self.empty_ids = tensors, seed, dropout, empty_ids
        self.sampler = EpochSampler(len(self.batches), seed)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        idx = self.batches[i]
        out = {k: v[idx] for k, v in self.tensors.items()}
        if self.dropout and "input_ids" in out:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sampler.epoch * 10_007 + i)
            drop = torch.rand(len(idx), generator=g) < self.dropout
            out["input_ids"] = torch.where(drop[:, None], self.empty_ids, out["input_ids"])
        return out


class VaeLoss(nn.Module):
    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict) -> torch.Tensor:
        dist = self.vae.encode(batch["pixels"]).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        return F.mse_loss(recon, batch["pixels"]) + self.kl_weight * dist.kl().mean() / dist.mean[0].numel()


class DecoderLoss(nn.Module):
    """Phase 1b: the decoder (and post_quant_conv) reconstructs images from the frozen encoder's latent means."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            z = self.vae.encode(batch["pixels"]).latent_dist.mode()
        return F.mse_loss(self.vae.decode(z).sample, batch["pixels"])


def _run_phase(run: RunDir, module: nn.Module, ds: Batches, settings: TrainSettings, resume, export) -> dict:
    run.create()   # a finished phase resumes from its final checkpoint: its weights load, no step runs
    dl = torch.utils.data.DataLoader(ds, batch_size=1, sampler=ds.sampler, collate_fn=first)
    set_seed(settings.seed)   # each phase's noise follows from its own seed, whatever ran before it
    status = train(accelerator=Accelerator(), run=run, model=module, dataloader=dl, loss_fn=lambda m, b: m(b),
                   settings=settings, resume=resume if resume and run.checkpoints() else None, export_fn=export)
    if status.get("state") != "done":
        raise RuntimeError(f"{run.path}: phase ended in state {status.get('state')}: {status.get('error', '')}")
    return status


def _settings(s: PretrainSettings, steps: int, lr: float, seed: int) -> TrainSettings:
    return TrainSettings(max_steps=steps, batch_size=s.batch_size, learning_rate=lr, weight_decay=0.0,
                         lr_scheduler="cosine", lr_warmup_steps=min(100, steps // 10), seed=seed,
                         log_every=10, checkpoint_every=s.checkpoint_every, keep_checkpoints=1)


def _phase_stats(run: RunDir, cpu_s: Optional[float] = None) -> dict:
    """Steps, first and final loss (mean of the last 5 logged steps), median wall seconds per step and
    the process CPU seconds per step (all threads) of a phase."""
    m = run.read_metrics()
    times = [r["step_time"] for r in m[1:]]   # the first step includes start-up
    tail = [r["loss"] for r in m[-5:]]
    steps = m[-1]["step"] if m else 0
    return {"steps": steps, "first_loss": m[0]["loss"] if m else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "median_step_s": float(np.median(times)) if times else None,
            "cpu_s_per_step": cpu_s / steps if cpu_s is not None and steps else None}


@torch.no_grad()
def latent_parameters(vae, pixels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    dev = next(vae.parameters()).device
    return torch.cat([vae.encode(pixels[i:i + batch].to(dev)).latent_dist.parameters.cpu()
                      for i in range(0, len(pixels), batch)])


def train_vae(s: PretrainSettings, vae, pixels: torch.Tensor, run: RunDir, resume) -> dict:
    """Phase 1; leaves the trained VAE (scaling factor set) in `vae` and in run/vae_final."""
    final = run.path / "vae_final"
    if resume and (final / "config.json").is_file():
        vae.load_state_dict(type(vae).from_pretrained(str(final)).state_dict())
        vae.register_to_config(scaling_factor=json.loads((final / "config.json").read_text())["scaling_factor"])
        return _phase_stats(run)
    cpu = time.process_time()
    ds = Batches({"pixels": pixels}, s.batch_size, s.seed + 1)
    _run_phase(run, VaeLoss(vae, s.kl_weight), ds, _settings(s, s.steps_vae, s.lr_vae, s.seed + 1), resume, None)
    vae.eval().requires_grad_(False)
    mean = latent_parameters(vae, pixels[:1024]).chunk(2, dim=1)[0]
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    vae.save_pretrained(str(final), safe_serialization=True)
    return _phase_stats(run, time.process_time() - cpu)


def decoder_data(s: PretrainSettings) -> torch.Tensor:
    """Phase 1b's images: every colour, shape and background of the world, held-out ones included."""
    return _pixels(synth.sample_scenes(s.n_decoder_images, s.seed + 3, colours=tuple(synth.COLOURS),
                                       shapes=synth.SHAPES), s.side)


def finetune_decoder(s: PretrainSettings, vae, run: RunDir, resume) -> dict:
    """Phase 1b; leaves the VAE with its fine-tuned decoder in `vae` and in run/vae_final."""
    final = run.path / "vae_final"
    if resume and (final / "config.json").is_file():
        vae.load_state_dict(type(vae).from_pretrained(str(final)).state_dict())
        return _phase_stats(run)
    cpu = time.process_time()
    vae.requires_grad_(False)
    for part in (vae.decoder, vae.post_quant_conv):
        part.requires_grad_(True)
    ds = Batches({"pixels": decoder_data(s)}, s.batch_size, s.seed + 3)
    _run_phase(run, DecoderLoss(vae), ds, _settings(s, s.steps_decoder, s.lr_vae, s.seed + 3), resume, None)
    vae.eval().requires_grad_(False)
    vae.save_pretrained(str(final), safe_serialization=True)
    return _phase_stats(run, time.process_time() - cpu)


def denoiser_data(s: PretrainSettings, pipe, pixels: torch.Tensor, captions: list[str]) -> dict:
    """Phases 2 and 2b's tensors: the frozen VAE's latent distributions and the token ids."""
    pipe.vae.eval().requires_grad_(False)
    return {"latent_params": latent_parameters(pipe.vae, pixels), "input_ids": tokenize(pipe.tokenizer, captions)}


def train_denoiser(s: PretrainSettings, pipe, tensors: dict, run: RunDir, resume, *, steps: int, lr: float,
                   seed: int, noise_offset: float = 0.0) -> dict:
    """Phase 2 (and 2b, with noise_offset): UNet + text encoder on the frozen VAE's latents."""
    cpu = time.process_time()
    ds = Batches(tensors, s.batch_size, seed, s.caption_dropout, tokenize(pipe.tokenizer, [""])[0])
    module = DiffusionLoss(pipe.unet, pipe.scheduler, text_encoder=pipe.text_encoder, train_text_encoder=True,
                           scaling_factor=float(pipe.vae.config.scaling_factor), min_snr_gamma=s.min_snr_gamma,
                           noise_offset=noise_offset)
    _run_phase(run, module, ds, _settings(s, steps, lr, seed), resume, None)
    return _phase_stats(run, time.process_time() - cpu)


def pretrain(out, s: Optional[PretrainSettings] = None, run_dir=None, resume: Optional[str] = None) -> Path:
    """Train and write the pipeline to `out` (a new folder). run_dir (default <out>.run) keeps the two
    phases' run folders; with resume="latest" a stopped pretraining continues where it stopped."""
    s = s or PretrainSettings()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new folder for the pipeline")
    run_dir = Path(run_dir) if run_dir else out.with_name(out.name + ".run")
    t0 = time.time()
    set_seed(s.seed)
    tokenizer = load_tokenizer()
    vae, unet, text_encoder = build_components(s, tokenizer)
    pixels, captions = make_data(s)
    t_data = time.time() - t0
    vae_stats = train_vae(s, vae, pixels, RunDir(run_dir / "vae"), resume)
    decoder_stats = finetune_decoder(s, vae, RunDir(run_dir / "decoder"), resume)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=noise_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tensors = denoiser_data(s, pipe, pixels, captions)
    unet_stats = train_denoiser(s, pipe, tensors, RunDir(run_dir / "denoiser"), resume, steps=s.steps_unet,
                                lr=s.lr_unet, seed=s.seed + 2)
    offset_stats = train_denoiser(s, pipe, tensors, RunDir(run_dir / "offset"), resume, steps=s.steps_offset,
                                  lr=s.lr_offset, seed=s.seed + 4, noise_offset=s.noise_offset) \
        if s.steps_offset else None
    tmp = out.with_name(f".{out.name}.tmp")   # written beside, renamed into place when complete
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    info = {"settings": asdict(s), "tokenizer": _tokenizer_name(tokenizer), "data_seconds": round(t_data, 1),
            "total_seconds": round(time.time() - t0, 1), "vae": vae_stats, "decoder": decoder_stats,
            "denoiser": unet_stats, "offset": offset_stats,
            "latent_scaling_factor": float(vae.config.scaling_factor), "files": weight_hashes(tmp),
            "torch_threads": torch.get_num_threads()}
    info["weights_bytes"] = sum(f["bytes"] for f in info["files"].values())
    atomic_write_json(tmp / "pretrain.json", info)
    atomic_write_text(tmp / "README.md", model_card(info))
    if out.exists():
        out.rmdir()   # empty (checked above)
    os.replace(tmp, out)
    if info["weights_bytes"] > MAX_BYTES:
        log.warning("%s: weights are %.1f MB, over the %d MB budget", out, info["weights_bytes"] / 2**20, MAX_BYTES >> 20)
    return out


def _tokenizer_name(tokenizer) -> str:
    return "CLIP BPE (openai/clip-vit-large-patch14 vocabulary)" if len(tokenizer) > 10000 else \
        "character-level CLIP tokenizer (the CLIP BPE files were absent)"


def model_card(info: dict) -> str:
    s, v, d, dec, o = info["settings"], info["vae"], info["denoiser"], info.get("decoder") or {}, info.get("offset")
    fmt = lambda x: "-" if x is None else f"{x:.4f}"   # noqa: E731
    return (
        "---\ntags: [stable-diffusion, tiny, synthetic, lora-workbench]\n---\n"
        "# Tiny Stable Diffusion pipeline trained on the synthetic shapes world\n\n"
        "An SD-1.x-architecture pipeline (AutoencoderKL, UNet2DConditionModel with cross-attention, "
        f"CLIPTextModel, {info['tokenizer']}, DDPMScheduler) trained from scratch by `lora-sd pretrain-tiny` "
        f"(seed {s['seed']}) on {s['n_images']} generated {s['side']}x{s['side']} images of `lora_sd.synth`: one "
        f"shape ({', '.join(synth.BASE_SHAPES)}) in one colour ({', '.join(synth.BASE_COLOURS)}) on a "
        f"{', '.join(synth.BACKGROUNDS)} background, captioned like \"a small red circle at the top left on a grey "
        "background\".\n\n"
        f"- VAE: {s['steps_vae']} steps, batch {s['batch_size']}, loss {fmt(v['first_loss'])} -> {fmt(v['final_loss'])}, "
        f"{fmt(v['median_step_s'])} s/step (wall); latent scaling factor {info['latent_scaling_factor']:.4f}.\n"
        f"- VAE decoder alone, on {s.get('n_decoder_images')} images of every colour and shape, the held-out ones "
        f"included, without captions (the encoder, and so the latent space, is unchanged): {s.get('steps_decoder')} "
        f"steps, loss {fmt(dec.get('first_loss'))} -> {fmt(dec.get('final_loss'))}.\n"
        f"- UNet + text encoder: {s['steps_unet']} steps, batch {s['batch_size']}, caption dropout "
        f"{s['caption_dropout']}, loss {fmt(d['first_loss'])} -> {fmt(d['final_loss'])}, {fmt(d['median_step_s'])} s/step (wall).\n"
        + (f"- Then both again with noise offset {s['noise_offset']} (so the prompt, not the mean of the starting "
           f"noise, decides the background): {s['steps_offset']} steps from learning rate {s['lr_offset']}, loss "
           f"{fmt(o['first_loss'])} -> {fmt(o['final_loss'])}.\n" if o else "") +
        f"- Total {info['total_seconds'] / 60:.1f} min with {info['torch_threads']} torch thread(s); weights "
        f"{info['weights_bytes'] / 2**20:.1f} MB (hashes in pretrain.json).\n\n"
        "What it can do: draw the prompted base colour, shape and background, blurrily, at "
        f"{s['side']}x{s['side']} (measure it: `lora-sd score --model THIS_FOLDER`; the shipped copy's scores are in "
        "the project's RESULTS.md, SD section, from results/sd/synth_purple.json).\n"
        f"What it cannot do: anything outside that world. Its UNet and text encoder have never seen the held-out "
        f"words {', '.join(synth.HELD_OUT_COLOURS + synth.HELD_OUT_SHAPES)} nor their images (only the VAE's "
        "decoder saw their pixels): those are what a demo LoRA teaches it.\n"
        + (f"\n{info['note']}\n" if info.get("note") else ""))
