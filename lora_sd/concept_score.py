"""The concept score: does a generated image show the colour, shape and background its prompt names?

An analytic reader for images of the synthetic world (lora_sd.synth), no training:
- background: the median of the border pixels, named by the nearest background colour;
- object colour: the median of the pixels farthest from the background, named by the nearest colour
  (a colour farther than MAX_COLOUR_DIST from every named one has no name and matches no prompt);
- shape: the object mask (pixels at least half-way from the background colour to the object colour),
  compared with each shape drawn at the mask's centroid and area (the moments of the mask): the shape
  whose drawing overlaps the mask best (intersection over union) is the reading.
The reading is a classification over every colour, shape and background word (held-out ones included),
so a caption with a wrong word scores false.

Measured accuracy on ground truth (`measure_accuracy`: 100 images each of base, purple and star scenes,
64 px, seed 1234; blur = Gaussian radius in px, noise = Gaussian std in 0..255):
    clean                 colour 100 %, shape 100 %, background 100 %
    blur 1.0, noise 10    colour 100 %, shape 100 %, background 100 %
    blur 1.5, noise 10    colour 100 %, shape 100 % (98.3 % with seed 11), background 100 %
    blur 2.0, noise 20    colour 100 %, shape  81 %, background 100 % (the misses: small stars read as circles)
At 32 px (clean) shape is 97.7 %: small stars are then about 5 px across.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image, ImageFilter

from . import synth

ATTRIBUTES = ("colour", "shape", "background")
RANDOM_WEIGHTS = "random_weights"   # the generation parameter lora_sd.generate sets on a random-weight model's images
MIN_CONTRAST = 60.0      # RGB distance: below it the image shows no object at all
MAX_COLOUR_DIST = 60.0   # RGB distance from the nearest named colour: farther, the colour has no name (None)


@dataclass
class Reading:
    colour: Optional[str]
    shape: Optional[str]
    background: Optional[str]
    iou: dict[str, float] = field(default_factory=dict)   # shape -> overlap with the mask

    def as_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "background": self.background}


def noise_refusal(model: str) -> str:
    """Why the images of a random-weight model are not scored: `lora-sd score` refuses them, the GUI's grid says so."""
    return (f"{model} has random weights: its images are noise, which the concept score would read as colours and "
            "shapes; score images of a trained model (e.g. the model 'tiny')")


def _nearest(rgb: np.ndarray, palette: dict[str, tuple]) -> Optional[str]:
    """The palette word nearest to rgb, or None when even that is farther than MAX_COLOUR_DIST."""
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], np.float32) - rgb, axis=1)
    return names[int(np.argmin(d))] if d.min() <= MAX_COLOUR_DIST else None


def _pixels(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
    return arr


def _unit_moments(shape: str, n: int = 256) -> tuple[float, float]:
    """(area, centroid y) of the shape at half-extent 1 (its centroid x is 0 for every shape here)."""
    cov = synth.coverage(shape, n / 2, n / 2, n / 2, n, ss=1)
    area = float(cov.sum()) / (n / 2) ** 2
    ys = (np.arange(n) + 0.5 - n / 2) / (n / 2)
    return area, float((cov.sum(axis=1) * ys).sum() / cov.sum())


_MOMENTS = {s: _unit_moments(s) for s in synth.SHAPES}


def shape_overlaps(mask: np.ndarray) -> dict[str, float]:
    """IoU of a boolean mask with each shape drawn at the mask's centroid and area."""
    area = float(mask.sum())
    if area < 4:
        return {s: 0.0 for s in synth.SHAPES}
    ys, xs = np.nonzero(mask)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    out = {}
    for s, (unit_area, unit_cy) in _MOMENTS.items():
        r = (area / unit_area) ** 0.5
        tmpl = synth.coverage(s, mx, my - unit_cy * r, r, mask.shape[0], ss=2) >= 0.5
        out[s] = float((tmpl & mask).sum() / max(1, (tmpl | mask).sum()))
    return out


def read_image(image) -> Reading:
    """What the image shows (colour and shape None when nothing stands out from the background)."""
    px = _pixels(image)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3),
                             px[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, synth.BACKGROUNDS)
    dist = np.linalg.norm(px - bg, axis=2)
    top = float(np.percentile(dist, 99.7))
    if top < MIN_CONTRAST:
        return Reading(None, None, background)
    obj = np.median(px[dist >= 0.75 * top], axis=0)
    axis = obj - bg
    t = ((px - bg) @ axis) / float(axis @ axis)
    iou = shape_overlaps(t >= 0.5)
    return Reading(_nearest(obj, synth.COLOURS), max(iou, key=iou.get), background, iou)


def check(image, prompt: str) -> dict[str, Optional[bool]]:
    """Per attribute: does the image show what the prompt names (None: the prompt names none)."""
    want, got = synth.parse_caption(prompt), read_image(image).as_dict()
    return {a: (None if want[a] is None else got[a] == want[a]) for a in ATTRIBUTES}


def fractions(checks: list[dict]) -> dict:
    """{"n", each attribute's fraction of True among the checks naming it, "all"}."""
    out: dict = {"n": len(checks)}
    for a in ATTRIBUTES:
        vals = [c[a] for c in checks if c[a] is not None]
        out[a] = sum(vals) / len(vals) if vals else None
    named = [c for c in checks if any(c[a] is not None for a in ATTRIBUTES)]
    out["all"] = (sum(all(c[a] is not False for a in ATTRIBUTES) for c in named) / len(named)) if named else None
    return out


def score(pairs: Iterable[tuple[object, str]]) -> dict:
    """{"n", "colour", "shape", "background", "all"}: the fraction of (image, prompt) pairs whose image
    shows the prompted colour / shape / background / all of them."""
    return fractions([check(img, p) for img, p in pairs])


def score_generator(make_image: Callable[[str, int], object], prompts: list[str], seeds: list[int]) -> dict:
    """Score `make_image(prompt, seed)` over prompts x seeds; adds "per_prompt" scores and "samples"
    (prompt, seed, reading) to the totals."""
    samples, per_prompt = [], {}
    for p in prompts:
        checks = []
        for s in seeds:
            img = make_image(p, s)
            c = check(img, p)
            checks.append(c)
            samples.append({"prompt": p, "seed": s, "read": read_image(img).as_dict(), "ok": c})
        per_prompt[p] = fractions(checks)
    total = fractions([x["ok"] for x in samples])
    return {**total, "per_prompt": per_prompt, "samples": samples}


# ------------------------------------------------------------------ accuracy on ground truth
def degrade(image, blur: float = 0.0, noise: float = 0.0, seed: int = 0):
    """A blurred (Gaussian radius `blur` px) and noisy (Gaussian, std `noise` in 0..255) copy."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        rng = np.random.default_rng(seed)
        arr = np.asarray(image, np.float32) + rng.normal(0, noise, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return image


def measure_accuracy(n: int = 200, seed: int = 1234, side: int = 64, blur: float = 0.0, noise: float = 0.0,
                     concepts=("base",) + synth.HELD_OUT_COLOURS + synth.HELD_OUT_SHAPES) -> dict:
    """Per attribute: the fraction of generated ground-truth images (n per concept) read correctly."""
    pairs = [(degrade(synth.render(sc, side), blur, noise, seed + i), sc.caption)
             for k, concept in enumerate(concepts)
             for i, sc in enumerate(synth.concept_scenes(concept, n, seed + 1000 * k))]
    return score(pairs)


def format_table(rows: list[dict]) -> str:
    """One line per (scale, prompt group): the fractions in percent."""
    head = f"{'scale':>6}  {'prompts':<14} {'n':>4}  {'colour':>6} {'shape':>6} {'bg':>6} {'all':>6}"
    lines = [head, "-" * len(head)]
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}%"   # noqa: E731
    for r in rows:
        lines.append(f"{r['scale']:>6g}  {r['group']:<14} {r['n']:>4}  {pct(r['colour']):>6} {pct(r['shape']):>6} "
                     f"{pct(r['background']):>6} {pct(r['all']):>6}")
    return "\n".join(lines)
