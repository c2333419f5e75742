"""Images from a pipeline with adapters; PNGs carry their generation parameters."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from PIL import PngImagePlugin

from lora_core import merge_lora
from lora_core.io import atomic_path

from . import formats
from .config import SAMPLERS

def set_scheduler(pipe, name: str) -> None:
    import diffusers
    if name not in SAMPLERS:   # the names sample.scheduler declares
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SAMPLERS)}")
    pipe.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


def load_adapters(pipe, adapters: list[tuple[str, float]], fuse: bool = False) -> list[dict]:
    """Add each (file, scale) as its own adapter (strict key matching); optionally fuse them into the base."""
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    report = []
    for i, (path, scale) in enumerate(adapters):
        adapter, _, fmt = formats.read_adapter(path, comps)
        n = formats.apply_to_components(adapter, comps, name=f"adapter_{i}", scale=scale, source=str(path))
        report.append({"file": str(path), "format": fmt, "scale": scale, "matched_modules": n})
    if fuse and adapters:
        for m in comps.values():
            merge_lora(m, safe=True)
    return report


def png_info(params: dict) -> PngImagePlugin.PngInfo:
    """`parameters` in AUTOMATIC1111's layout (other tools parse it) plus the full JSON in `lora_sd`."""
    info = PngImagePlugin.PngInfo()
    loras = " ".join(f"<lora:{Path(a['file']).stem}:{a['scale']}>" for a in params.get("adapters", []))
    a1111 = (f"{params['prompt']} {loras}".strip() + "\n"
             f"Negative prompt: {params.get('negative_prompt', '')}\n"
             f"Steps: {params['steps']}, Sampler: {params['scheduler']}, CFG scale: {params['guidance_scale']}, "
             f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, Model: {params.get('model', '')}")
    info.add_text("parameters", a1111)
    info.add_text("lora_sd", json.dumps(params, sort_keys=True))
    return info


def save_png(image, path, params: dict) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(params))


@torch.no_grad()
def generate(pipe, prompts: list[str], *, negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.5,
             seed: int = 0, width: int = 512, height: int = 512, scheduler: str = "ddim", out_dir=None,
             prefix: str = "", base: dict | None = None) -> list[tuple[object, dict]]:
    """One image per prompt, image i seeded with seed + i through its own generator (the global RNG is
    untouched). Saves `<out_dir>/<prefix><i>.png` when out_dir is given. Returns (image, params) pairs."""
    set_scheduler(pipe, scheduler)
    device = pipe.unet.device
    results = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                     guidance_scale=guidance_scale, width=width, height=height, generator=g,
                     latents=torch.randn((1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                                          width // pipe.vae_scale_factor), generator=g).to(device, pipe.unet.dtype)
                     ).images[0]
        params = {**(base or {}), "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                  "guidance_scale": guidance_scale, "seed": seed + i, "width": width, "height": height,
                  "scheduler": scheduler}
        if out_dir is not None:
            save_png(image, Path(out_dir) / f"{prefix}{i}.png", params)
        results.append((image, params))
    return results


def read_png_params(path) -> Optional[dict]:
    from PIL import Image
    with Image.open(path) as im:
        text = im.text.get("lora_sd") if hasattr(im, "text") else None
    return json.loads(text) if text else None
