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
from .config import AUTO_SAMPLER, FLOW_ARCHS, FLOW_SAMPLERS, SAMPLERS
from .adapter_formats import embedding_path, embeddings_used
from .embeddings import load_embedding, set_embedding_scale, trained_tokens
from .concept_score import RANDOM_WEIGHTS
from .models import arch_of, is_random_weights


def denoiser(pipe):
    """The pipeline's denoising network: its UNet (SD 1.x / 2.x / SDXL) or its transformer (SD 3.5, Flux)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def sampler_name(pipe, name: str) -> str:
    """The sampler `name` names for this pipeline ("auto": the architecture's own); a sampler of the other
    family (a diffusion sampler for a flow-matching model, or the reverse) is refused."""
    flow = arch_of(pipe) in FLOW_ARCHS
    if name == AUTO_SAMPLER:
        return FLOW_SAMPLERS[0] if flow else "ddim"
    if name not in SAMPLERS:   # the names sample.scheduler declares
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SAMPLERS)} or {AUTO_SAMPLER!r}")
    if (name in FLOW_SAMPLERS) != flow:
        fits = FLOW_SAMPLERS if flow else tuple(n for n in SAMPLERS if n not in FLOW_SAMPLERS)
        kind = "a flow-matching model" if flow else "a diffusion model (SD 1.x / 2.x / SDXL)"
        raise ValueError(f"scheduler {name!r} does not fit this {arch_of(pipe)} pipeline, {kind}: choose one of "
                         f"{', '.join(fits)} (or {AUTO_SAMPLER!r})")
    return name


def set_scheduler(pipe, name: str) -> str:
    """Give the pipeline the sampler `name` (sampler_name) with its own scheduler's settings; returns the name."""
    name = sampler_name(pipe, name)
    pipe.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(pipe.scheduler.config)
    return name


def size_multiple(pipe) -> int:
    """What an image side must be a multiple of: the VAE's factor, times the patch size of SD 3.5's transformer
    or the 2x2 packing of Flux's latents (16 for both at full size)."""
    packing = 2 if arch_of(pipe) == "flux" else getattr(pipe, "patch_size", 1)
    return pipe.vae_scale_factor * packing


def check_size(pipe, width: int, height: int) -> None:
    """Refuse a size the pipeline's latent grid does not divide (size_multiple)."""
    multiple = size_multiple(pipe)
    for name, v in (("--width", width), ("--height", height)):
        if v % multiple:
            raise ValueError(f"{name} {v}: this {arch_of(pipe)} pipeline needs a multiple of {multiple} "
                             f"(e.g. {max(multiple, v - v % multiple)})")


def check_generation(*, steps: int, guidance_scale: float, width: int, height: int, seed: int,
                     scheduler: str = AUTO_SAMPLER) -> None:
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
    if scheduler not in SAMPLERS and scheduler != AUTO_SAMPLER:
        raise ValueError(f"--scheduler {scheduler!r}: unknown; choose from {sorted(SAMPLERS)} or {AUTO_SAMPLER!r}")


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
    """The components an adapter may touch, by lora_sd.formats' component names (formats.COMPONENTS) that the
    pipeline has."""
    return {n: getattr(pipe, n) for n in formats.COMPONENTS if getattr(pipe, n, None) is not None}


def load_adapters(pipe, adapters: list[tuple[str, float]], fuse: bool = False, embeddings=(),
                  skip_embeddings=(), embedding_from=()) -> list[dict]:
    """Add each (file, scale) as its own adapter (strict key matching; a file holding NaN or inf, or
    given twice, is refused); optionally fuse them into the base. `embeddings`: textual-inversion files
    (lora_sd.embeddings) installed for their words at scale 1; an adapter trained with [embedding] brings
    its own (<name>_emb.safetensors beside it) at the adapter's scale, unless it is in `skip_embeddings`;
    when several bring one for the same word, the word uses the one of the adapter in `embedding_from`
    (so two adapters trained with the same word combine: one brings the word, the other only its LoRA;
    adapter_formats.embeddings_used)."""
    check_adapter_list(adapters)
    with_embedding = set(embeddings_used([p for p, _ in adapters], skip_embeddings, embedding_from))
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
    own = [(embedding_path(path), scale) for path, scale in adapters if Path(path).resolve() in with_embedding]
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
    adapters = params.get("adapters", [])
    loras = " ".join(f"<lora:{Path(a['file']).stem}:{a['scale']}>" for a in adapters if a.get("format") != "embedding")
    embeddings = ", ".join(f"{a.get('word', '')}: {Path(a['file']).stem} x{a['scale']}" for a in adapters
                           if a.get("format") == "embedding")   # a word's vector, not a LoRA
    a1111 = (f"{params['prompt']} {loras}".strip() + "\n"
             f"Negative prompt: {params.get('negative_prompt', '')}\n"
             f"Steps: {params['steps']}, Sampler: {params['scheduler']}, CFG scale: {params['guidance_scale']}, "
             f"Seed: {params['seed']}, Size: {params['width']}x{params['height']}, Model: {params.get('model', '')}"
             + (f", Embeddings: \"{embeddings}\"" if embeddings else ""))
    info.add_text("parameters", a1111)
    info.add_text("lora_sd", json.dumps(params, sort_keys=True))
    return info


def save_png(image, path, params: dict) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(params))


@torch.no_grad()
def generate(pipe, prompts: list[str], *, negative_prompt: str = "", steps: int = 20, guidance_scale: float = 7.5,
             seed: int = 0, width: int = 512, height: int = 512, scheduler: str = AUTO_SAMPLER, out_dir=None,
             prefix: str = "", base: dict | None = None) -> list[tuple[object, dict]]:
    """One image per prompt, image i seeded with seed + i through its own generator (the global RNG is
    untouched; the starting latents are drawn on the CPU, so a seed gives the same image on every device).
    Saves `<out_dir>/<prefix><i>.png` when out_dir is given. Returns (image, params) pairs; params name the
    sampler used (never "auto")."""
    check_generation(steps=steps, guidance_scale=guidance_scale, width=width, height=height, seed=seed,
                     scheduler=scheduler)
    check_size(pipe, width, height)
    if negative_prompt and arch_of(pipe) == "flux":
        raise ValueError("--negative-prompt: Flux takes no negative prompt (its guidance is distilled into the "
                         "model, set with --guidance); leave it empty")
    scheduler = set_scheduler(pipe, scheduler)
    results = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        latents = start_latents(pipe, g, width, height)
        with _vae_outside_autocast(pipe):
            image = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                         guidance_scale=guidance_scale, width=width, height=height, generator=g,
                         latents=latents).images[0]
        params = {**(base or {}), "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                  "guidance_scale": guidance_scale, "seed": seed + i, "width": width, "height": height,
                  "scheduler": scheduler, **({RANDOM_WEIGHTS: True} if is_random_weights(pipe) else {})}
        if out_dir is not None:
            save_png(image, Path(out_dir) / f"{prefix}{i}.png", params)
        results.append((image, params))
    return results


def start_latents(pipe, g: torch.Generator, width: int, height: int) -> torch.Tensor:
    """The starting noise of one image, drawn on the CPU from `g`, on the denoiser's device and dtype: the
    latent grid's shape (16 channels for the MMDiTs), or for Flux the pipeline's own packed 2x2 patches."""
    net = denoiser(pipe)
    if arch_of(pipe) == "flux":
        z, _ = pipe.prepare_latents(1, net.config.in_channels // 4, height, width, torch.float32, torch.device("cpu"), g)
    else:
        z = torch.randn((1, net.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor),
                        generator=g)
    return z.to(net.device, net.dtype)


@contextlib.contextmanager
def _vae_outside_autocast(pipe):
    """SDXL and SD 3.5: the VAE decodes in its own dtype (fp32 or bf16) even under an fp16 autocast (the
    validation images of an fp16 run): SDXL's VAE gives NaN in fp16. SD 1.x / 2.x are left as they are."""
    vae = pipe.vae
    if getattr(pipe, "text_encoder_2", None) is None or not torch.is_autocast_enabled(denoiser(pipe).device.type):
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
    """Scale every named adapter in every component (pipeline_components), and every loaded embedding
    (0 = the base model alone)."""
    for comp in pipeline_components(pipe).values():
        present = {a for _, layer in lora_layers(comp) for a in layer.lora_A}
        for name in adapters:
            if name in present:   # an adapter may touch the denoiser only
                set_scale(comp, name, scale)
    set_embedding_scale(pipe.text_encoder, scale)


def pipeline_images(pipe, *, steps: int = 20, guidance_scale: float = 5.0, side: int = 64,
                    scheduler: str = AUTO_SAMPLER, save_dir=None) -> Callable[[str, int], object]:
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
