"""A synthetic captioned world: one coloured shape on a plain background, drawn exactly.

Deterministic from a seed, no data files: `sample_scenes(n, seed)` draws scenes, `render(scene)` draws
one as a PIL image (anti-aliased by 4x4 supersampling, numpy only), `write_folder` writes a kohya-style
image folder (`img_00000.png` + `img_00000.txt`) that `lora-sd train` reads.

Captions look like "a small red circle at the top left on a grey background"; the size and the
position phrase are each left out of half of the captions, so the short prompt form
"a red circle on a grey background" is in the training distribution too.

Concepts are split: the base model is trained on BASE_COLOURS x BASE_SHAPES only; HELD_OUT_COLOURS and
HELD_OUT_SHAPES never appear in its data and are what a demo LoRA teaches (`concept="purple"` writes
a folder of base shapes in purple; `concept="star"` one of base colours as stars).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

# RGB of each word. Object colours and background colours are disjoint sets.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (235, 235, 235), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "star")
BASE_COLOURS = ("red", "green", "blue", "yellow")
BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_COLOURS = ("purple",)
HELD_OUT_SHAPES = ("star",)
SIZES = {"small": 0.17, "large": 0.30}          # shape half-extent as a fraction of the image side
# position: (x, y) in -1..1: -1 puts the shape's edge MARGIN from the left (top) border, 1 from the right (bottom)
POSITIONS = {"at the top left": (-1, -1), "at the top right": (1, -1), "at the bottom left": (-1, 1),
             "at the bottom right": (1, 1), "in the centre": (0, 0)}
MARGIN = 0.06          # fraction of the side; the centre jitter (+-JITTER) keeps every shape inside the image
JITTER = 0.02
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str          # a key of POSITIONS
    jitter: tuple[float, float] = (0.0, 0.0)   # centre offset, fraction of the image side
    caption: str = ""


def caption_for(colour: str, shape: str, background: str, size: str = "", position: str = "") -> str:
    words = ["a", size, colour, shape, position, "on a", background, "background"]
    return " ".join(w for w in words if w)


def parse_caption(text: str) -> dict[str, Optional[str]]:
    """{"colour", "shape", "background"} named in a caption or prompt (None where it names none)."""
    text = text.lower()
    bg = re.search(r"on an? (\w+) background", text)
    rest = text[:bg.start()] + text[bg.end():] if bg else text
    words = re.findall(r"[a-z]+", rest)
    return {"colour": next((w for w in words if w in COLOURS), None),
            "shape": next((w for w in words if w in SHAPES), None),
            "background": bg.group(1) if bg and bg.group(1) in BACKGROUNDS else None}


def sample_scenes(n: int, seed: int = 0, colours=BASE_COLOURS, shapes=BASE_SHAPES,
                  backgrounds=tuple(BACKGROUNDS), detail: float = 0.5, balanced: bool = False) -> list[Scene]:
    """n scenes drawn uniformly from the given concepts; each caption names its size and its position
    with probability `detail` (each independently). balanced: the (colour, shape, background)
    combinations take turns, each round in a new seeded order, so that a small set shows each of them
    as often as n allows."""
    for name, given, known in (("colour", colours, COLOURS), ("shape", shapes, SHAPES), ("background", backgrounds, BACKGROUNDS)):
        bad = [w for w in given if w not in known]
        if bad or not given:
            raise ValueError(f"unknown {name}(s) {bad or 'none given'}; choose from {sorted(known)}")
    rng = np.random.default_rng(seed)
    pos_names = list(POSITIONS)
    combos = [(c, s, b) for c in colours for s in shapes for b in backgrounds]
    out = []
    for i in range(n):
        if not balanced:
            c, s, b = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))], backgrounds[rng.integers(len(backgrounds))]
        else:
            if i % len(combos) == 0:
                order = rng.permutation(len(combos))
            c, s, b = combos[order[i % len(combos)]]
        size = list(SIZES)[rng.integers(len(SIZES))]
        pos = pos_names[rng.integers(len(pos_names))]
        jitter = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, 2))
        say_size, say_pos = rng.random() < detail, rng.random() < detail
        out.append(Scene(c, s, b, size, pos, jitter,
                         caption_for(c, s, b, size if say_size else "", pos if say_pos else "")))
    return out


# ------------------------------------------------------------------ drawing
def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


_POLYGONS = {"triangle": np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), "star": _star_polygon()}


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) in the shape's unit frame (centre 0, half-extent 1, y down) are inside it."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.886) & (np.abs(v) <= 0.886)   # the circle's area: sizes read alike
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def coverage(shape: str, cx: float, cy: float, r: float, side: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """(side, side) float array: the fraction of each pixel inside the shape centred at (cx, cy) px with
    half-extent r px (ss x ss samples per pixel)."""
    t = (np.arange(side * ss, dtype=np.float64) + 0.5) / ss
    y, x = np.meshgrid(t, t, indexing="ij")
    m = inside(shape, (x - cx) / r, (y - cy) / r).astype(np.float32)
    return m.reshape(side, ss, side, ss).mean(axis=(1, 3))


def render(scene: Scene, side: int = 64) -> "Image.Image":
    r = SIZES[scene.size] * side
    (px, py), (jx, jy) = POSITIONS[scene.position], scene.jitter
    reach = side / 2 - r - MARGIN * side
    a = coverage(scene.shape, side / 2 + px * reach + jx * side, side / 2 + py * reach + jy * side, r, side)[..., None]
    fg, bg = np.array(COLOURS[scene.colour], np.float32), np.array(BACKGROUNDS[scene.background], np.float32)
    return Image.fromarray(np.rint(a * fg + (1 - a) * bg).astype(np.uint8))


# ------------------------------------------------------------------ folders
def concept_scenes(concept: str, n: int, seed: int = 0) -> list[Scene]:
    """"base": base colours x base shapes; a held-out colour or shape word: that concept with the base
    shapes (or base colours), balanced over them and the backgrounds (a LoRA's few examples show each)."""
    if concept == "base":
        return sample_scenes(n, seed)
    if concept in HELD_OUT_COLOURS:
        return sample_scenes(n, seed, colours=(concept,), balanced=True)
    if concept in HELD_OUT_SHAPES:
        return sample_scenes(n, seed, shapes=(concept,), balanced=True)
    raise ValueError(f"unknown concept {concept!r}; choose base, {', '.join(HELD_OUT_COLOURS + HELD_OUT_SHAPES)}")


def write_folder(out, n: int, seed: int = 0, concept: str = "base", side: int = 64) -> Path:
    """A kohya-style folder: img_NNNNN.png + img_NNNNN.txt (the caption). Byte-identical for a seed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(concept_scenes(concept, n, seed)):
        render(sc, side).save(out / f"img_{i:05d}.png", optimize=False)
        (out / f"img_{i:05d}.txt").write_text(sc.caption + "\n", encoding="utf-8")
    return out


def prompts_for(concept: str = "base", backgrounds=("grey",)) -> list[str]:
    """The short-form prompts of a concept (every colour x shape on the given backgrounds)."""
    colours = (concept,) if concept in HELD_OUT_COLOURS else BASE_COLOURS
    shapes = (concept,) if concept in HELD_OUT_SHAPES else BASE_SHAPES
    if concept not in ("base",) + HELD_OUT_COLOURS + HELD_OUT_SHAPES:
        raise ValueError(f"unknown concept {concept!r}; choose base, {', '.join(HELD_OUT_COLOURS + HELD_OUT_SHAPES)}")
    bad = [b for b in backgrounds if b not in BACKGROUNDS]
    if bad:
        raise ValueError(f"unknown background(s) {bad}; choose from {sorted(BACKGROUNDS)}")
    return [caption_for(c, s, b) for b in backgrounds for c in colours for s in shapes]


def scene_from_prompt(prompt: str, size: str = "large", position: str = "in the centre") -> Scene:
    """The scene a prompt names (for reference images; unnamed parts default to red / circle / grey)."""
    p = parse_caption(prompt)
    return Scene(p["colour"] or "red", p["shape"] or "circle", p["background"] or "grey", size, position, (0.0, 0.0), prompt)


def main(argv=None) -> int:
    """`python -m lora_sd.synth OUT --concept purple -n 20`: write a captioned folder."""
    p = argparse.ArgumentParser(prog="python -m lora_sd.synth", description=main.__doc__)
    p.add_argument("out", help="folder for img_NNNNN.png + .txt")
    p.add_argument("-n", type=int, default=20, help="how many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concept", default="base", help=f"base or a held-out word: {HELD_OUT_COLOURS + HELD_OUT_SHAPES}")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    a = p.parse_args(argv)
    try:
        out = write_folder(a.out, a.n, a.seed, a.concept, a.size)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {a.n} images with captions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
