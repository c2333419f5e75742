"""lora_sd: LoRA for Stable Diffusion 1.x UNets (cross-attention by default), on lora_core.

Modules: config (the TOML job), models (load / tiny pipeline), data (folders, buckets, caches),
train (the diffusion loss + lora_core.training.train), formats (kohya <-> diffusers files),
generate (images with adapters), cli (`lora-sd`). See docs/sd.md.
"""
