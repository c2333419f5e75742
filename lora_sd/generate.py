"""Images from a pipeline with adapters; PNGs carry their generation parameters."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable

import diffusers
import torch
from PIL import PngImagePlugin

from lora_core import LoraLoadError, lora_layers, merge_lora, set_scale
from lora_core.files import atomic_path

from . import formats
from .config import SAMPLERS
from .embeddings import load_embedding, set_embedding_scale, sibling_embedding, trained_tokens


def set_scheduler(pipe, name: str) -> None:
    if name not in SAMPLERS:   # the names sample.scheduler declares
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SAMPLERS)}")
    pipe.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)


def check_generation(*, steps: int, guidance_scale: float, width: int, height: int, seed: int,
                     scheduler: str = "ddim") -> None:
    """Refuse generation settings that would fail late or give silently wrong images (one ValueError)."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: the number of denoising steps must be at least 1")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"--guidance {guidance_scale}: the guidance scale must be a finite number >= 0 "
                         "(1 turns classifier-free guidance off; 5-9 is usual)")
    for name, v in (("--width", width), ("--height", height)):
        if v < 8 or v % 8:
            raise ValueError(f"{name} {v}: must be a positive multiple of 8 (e.g. 512)")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed {seed}: must be between 0 and 2**63-1")
    if scheduler not in SAMPLERS:
        raise ValueError(f"--scheduler {scheduler!r}: unknown; choose from {sorted(SAMPLERS)}")


def check_adapter_list(adapters: list[tuple[str, float]]) -> None:
    """Refuse a file given twice (it would apply at double strength) and scales that are not finite."""
    seen: dict[str, str] = {}
    for path, scale in adapters:
        if not math.isfinite(scale):
            raise ValueError(f"--lora {path}:{scale}: the scale must be a finite number")
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--lora {path}: no such file or folder" if not p.exists()
                                    else f"--lora {path}: is a folder; give the .safetensors file")
        key = str(p.resolve())
        if key in seen:
            raise ValueError(f"--lora {path}: the same adapter file is given twice (as {seen[key]!r} too); "
                             "give it once, with the scale you want (FILE:SCALE)")
        seen[key] = path


def pipeline_components(pipe) -> dict:
    """The components an adapter may touch, by lora_sd.formats' component names: unet, text_encoder and,
    for SDXL, text_encoder_2; SD 3.x / Flux: transformer and their text encoders."""
    return {n: getattr(pipe, n) for n in formats.COMPONENTS if getattr(pipe, n, None) is not None}


def load_adapters(pipe, adapters: list[tuple[str, float]], fuse: bool = False, embeddings=()) -> list[dict]:
    """Add each (file, scale) as its own adapter (strict key matching; a file holding NaN or inf, or
    given twice, is refused); optionally fuse them into the base. `embeddings`: textual-inversion files
    (lora_sd.embeddings) installed for their words at scale 1; an adapter trained with [embedding] brings
    its own (<name>_emb.safetensors beside it) at the adapter's scale."""
    check_adapter_list(adapters)
    comps = pipeline_components(pipe)
    report = []
    for i, (path, scale) in enumerate(adapters):
        try:
            adapter, _, fmt = formats.read_adapter(path, comps)
        except ValueError as e:   # name the file when the reader's message does not
            if str(path) in str(e):
                raise
            raise LoraLoadError(f"{path}: {e}") from None
        n = formats.apply_to_components(adapter, comps, name=f"adapter_{i}", scale=scale, source=str(path))
        report.append({"file": str(path), "format": fmt, "scale": scale, "matched_modules": n})
    if fuse and adapters:
        for m in comps.values():
            merge_lora(m)
    own = [(e, scale) for path, scale in adapters if (e := sibling_embedding(path)) is not None]
    for path, scale in own + [(e, 1.0) for e in embeddings]:
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise LoraLoadError(f"--embedding {path}: embeddings are for SD 1.x / 2.x pipelines (one text encoder)")
        word = load_embedding(pipe.text_encoder, pipe.tokenizer, path)
        trained_tokens(pipe.text_encoder).set_scale(word, scale)
        report.append({"file": str(path), "format": "embedding", "word": word, "scale": scale})
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
    check_generation(steps=steps, guidance_scale=guidance_scale, width=width, height=height, seed=seed,
                     scheduler=scheduler)
    set_scheduler(pipe, scheduler)
    device = pipe.unet.device
    results = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        with _vae_outside_autocast(pipe):
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


@contextlib.contextmanager
def _vae_outside_autocast(pipe):
    """SDXL: the VAE decodes in its own dtype (fp32 or bf16) even under an fp16 autocast (the validation
    images of an fp16 run): its fp16 gives NaN. Other pipelines are left as they are."""
    vae = pipe.vae
    if getattr(pipe, "text_encoder_2", None) is None or not torch.is_autocast_enabled(pipe.unet.device.type):
        yield
        return
    decode = vae.decode

    def plain(z, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = plain
    try:
        yield
    finally:
        del vae.decode   # the class's method again


# ------------------------------------------------------------------ images for the concept score
def set_adapter_scale(pipe, adapters: list[str], scale: float) -> None:
    """Scale every named adapter in the UNet and the text encoder, and every loaded embedding (0 = the
    base model alone)."""
    for comp in (pipe.unet, pipe.text_encoder):
        present = {a for _, layer in lora_layers(comp) for a in layer.lora_A}
        for name in adapters:
            if name in present:   # an adapter may touch the UNet only
                set_scale(comp, name, scale)
    set_embedding_scale(pipe.text_encoder, scale)


def pipeline_images(pipe, *, steps: int = 20, guidance_scale: float = 5.0, side: int = 64,
                    scheduler: str = "ddim", save_dir=None) -> Callable[[str, int], object]:
    """make_image(prompt, seed) for concept_score.score_generator: one image through lora_sd.generate (saved as
    <save_dir>/p<prompt index>_s<seed>_0.png when save_dir is given)."""
    index: dict[str, int] = {}

    def make_image(prompt: str, seed: int):
        n = index.setdefault(prompt, len(index))
        (img, _), = generate(pipe, [prompt], steps=steps, guidance_scale=guidance_scale, seed=seed, width=side,
                             height=side, scheduler=scheduler, out_dir=Path(save_dir) if save_dir else None,
                             prefix=f"p{n:03d}_s{seed}_")
        return img
    return make_image
