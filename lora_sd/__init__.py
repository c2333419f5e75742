"""lora_sd: LoRA for Stable Diffusion 1.x, 2.x and SDXL, on lora_core: the UNet (cross-attention by
default; any attention or projection, and LoCon on k×k convs), the text encoder(s), DoRA, rank and alpha
patterns, and a trained token embedding beside the adapter; kohya and diffusers files in and out.

Modules: config (the TOML job), models (load SD 1.x / 2.x / SDXL pipelines, single-file checkpoints in
and out, the tiny pipelines), single_file and unet_names (the original LDM / SGM names), data (folders,
buckets, caches), train (the diffusion loss + lora_core.training.train), embeddings (trained words),
formats / adapter_formats / metadata (kohya <-> diffusers files and their metadata), generate (images
with adapters), grid (comparison grids), synth and concept_score (the synthetic shapes world and its
score), pretrain (the tiny model's pretraining), preflight (`lora-sd check`), errors, testing (test
helpers), cli and cli_decide (`lora-sd`). See docs/sd.md.
"""

import lora_core  # noqa: F401,E402 - first: it quiets what optional packages print as diffusers imports them
