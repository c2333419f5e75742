"""Comparison grids: one labelled PNG over two axes (checkpoint step, adapter scale, prompt, seed, adapter /
run), each cell's PNG with its generation parameters, and a JSON index.

    spec = GridSpec(x="step", x_values=run_steps("runs/sd"), y="scale", y_values=[0.0, 0.5, 1.0],
                    run="runs/sd", prompt="a photo of sks dog")
    index = make_grid(pipe, spec, "runs/sd/grid", progress=lambda done, total, cell: ...)

Every cell is one call of lora_sd.generate.generate with one prompt and its own seed, so a cell is
reproducible alone (`lora-sd generate` with the cell's parameters gives the same image). Step 0 is the
base model (no adapter); scale 0 is the adapter switched off. The GUI runs `lora-sd grid` (lora_sd.cli_decide)
and reads `index.json` (cell -> PNG, parameters) to show a cell's parameters on click.
"""
from __future__ import annotations

import itertools
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image, ImageDraw, ImageFont

from lora_core import lora_layers, remove_lora, set_scale
from lora_core.adapter_files import detect
from lora_core.errors import LoraLoadError
from lora_core.files import atomic_write_json

from .config import AUTO_SAMPLER
from .embeddings import set_embedding_scale, unload_embeddings
from .generate import generate, load_adapters, pipeline_components, save_png

log = logging.getLogger("lora_sd")
AXES = ("step", "scale", "prompt", "seed", "adapter")
FINAL = -1          # the step value of a run's final adapter (RUN/<name>.safetensors)
INDEX_FILE, GRID_FILE, CELLS = "index.json", "grid.png", "cells"


@dataclass
class GridSpec:
    """Two axes (y may be "") and the fixed values of the others."""
    x: str
    x_values: list
    y: str = ""
    y_values: list = field(default_factory=lambda: [None])
    run: str = ""                 # the run folder the "step" values refer to
    adapter: str = ""             # an adapter file or run folder ("" with no run: the base model)
    step: Optional[int] = None    # fixed step of `run` / a run-folder adapter; None: its final adapter
    scale: float = 1.0
    prompt: str = "a photo"
    seed: int = 0
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = AUTO_SAMPLER

    def __post_init__(self):
        for axis in (self.x, self.y):
            if axis and axis not in AXES:
                raise ValueError(f"grid axis {axis!r}: choose from {', '.join(AXES)}")
        if self.x == self.y:
            raise ValueError(f"grid axes must differ (both are {self.x!r})")
        if not self.x_values or not self.y_values:
            raise ValueError("every grid axis needs at least one value")
        if "step" in (self.x, self.y) and not (self.run or self.adapter) and "adapter" not in (self.x, self.y):
            raise ValueError("a step axis needs the run folder (run=...)")


# ------------------------------------------------------------------ adapters of a run
def adapter_in(folder) -> Optional[Path]:
    """The SD adapter file a run folder or checkpoint holds: kohya first, else diffusers (formats detected
    from the headers; the checkpoint's own state files are no adapters)."""
    found = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        try:
            found.setdefault(detect(p).format, p)
        except LoraLoadError:
            continue
    return found.get("kohya") or found.get("diffusers")


def run_steps(run) -> list[int]:
    """0 (the base model), every kept checkpoint holding an adapter, and FINAL when the run folder holds a
    final adapter that no checkpoint repeats."""
    ckpt = Path(run) / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in ckpt.glob("step_*") if p.name[5:].isdigit() and adapter_in(p))
    done = adapter_in(run) is not None
    return [0, *steps] + ([FINAL] if done and not steps else [])


def adapter_file(source: str, step: Optional[int]) -> Optional[Path]:
    """The adapter of `source` (a file, or a run folder at `step`); None for step 0 (the base model)."""
    if not source or step == 0:
        return None
    p = Path(source)
    if p.is_file():
        return p
    folder = p if step in (None, FINAL) else p / "checkpoints" / f"step_{step:08d}"
    found = adapter_in(folder)
    if found is None:
        raise FileNotFoundError(f"{folder}: no adapter file (.safetensors) here")
    return found


def label(axis: str, value: Any) -> str:
    if axis == "step":
        return "base (step 0)" if value == 0 else "final" if value == FINAL else f"step {value}"
    if axis == "adapter":
        p = Path(str(value))
        return p.stem if p.suffix else p.name
    if axis == "scale":
        return f"scale {value:g}"
    if axis == "seed":
        return f"seed {value}"
    return str(value)


# ------------------------------------------------------------------ cells
@dataclass
class Cell:
    row: int
    col: int
    params: dict                       # the axes' values of this cell (step, scale, prompt, seed, adapter)
    file: Optional[str] = None         # the adapter file used (None: base model)
    png: str = ""
    generation: dict = field(default_factory=dict)


def cells(spec: GridSpec) -> list[Cell]:
    fixed = {"step": spec.step, "scale": spec.scale, "prompt": spec.prompt, "seed": spec.seed,
             "adapter": spec.adapter or spec.run}
    out = []
    for (r, yv), (c, xv) in itertools.product(enumerate(spec.y_values), enumerate(spec.x_values)):
        p = {**fixed, spec.x: xv, **({spec.y: yv} if spec.y else {})}
        f = adapter_file(p["adapter"], p["step"])
        out.append(Cell(r, c, p, str(f) if f else None))
    return out


class _Loader:
    """Keeps one adapter loaded at a time; switching scale needs no reload."""

    def __init__(self, pipe):
        self.pipe, self.file = pipe, None

    def use(self, file: Optional[str], scale: float) -> list[dict]:
        if file != self.file:
            for m in pipeline_components(self.pipe).values():
                remove_lora(m)
            unload_embeddings(self.pipe.text_encoder)   # the word embedding trained with the last adapter
            self.file = None
            if file is not None:
                self.report = load_adapters(self.pipe, [(file, scale)])
                self.file = file
        if file is None:
            return []
        for m in pipeline_components(self.pipe).values():
            if any("adapter_0" in layer.lora_A for _, layer in lora_layers(m)):
                set_scale(m, "adapter_0", scale)
        set_embedding_scale(self.pipe.text_encoder, scale)
        return [{**r, "scale": scale} for r in self.report]


def make_grid(pipe, spec: GridSpec, out_dir, progress: Optional[Callable[[int, int, Cell], None]] = None,
              model: str = "") -> dict:
    """Generate every cell (grouped by adapter, so each file loads once), write `cells/r<row>_c<col>.png`
    (with its parameters), `grid.png` and `index.json`; `progress(done, total, cell)` after each cell.
    Returns the index. The pipeline's adapters are removed at the end."""
    out = Path(out_dir)
    todo = cells(spec)
    loader, done = _Loader(pipe), 0
    try:
        for cell in sorted(todo, key=lambda c: (c.file or "", c.row, c.col)):
            adapters = loader.use(cell.file, float(cell.params["scale"]))
            cell.png = f"{CELLS}/r{cell.row}_c{cell.col}.png"
            (image, params), = generate(
                pipe, [str(cell.params["prompt"])], negative_prompt=spec.negative_prompt, steps=spec.steps,
                guidance_scale=spec.guidance_scale, seed=int(cell.params["seed"]), width=spec.width,
                height=spec.height, scheduler=spec.scheduler, out_dir=None,
                base={"model": model, "adapters": adapters, "grid_cell": _jsonable(cell.params)})
            save_png(image, out / cell.png, params)
            cell.generation = params
            cell.image = image
            done += 1
            if progress is not None:
                progress(done, len(todo), cell)
    finally:
        loader.use(None, 0.0)
    compose(spec, todo).save(out / GRID_FILE)
    index = {"spec": _jsonable(asdict(spec)), "grid": GRID_FILE, "rows": len(spec.y_values),
             "cols": len(spec.x_values), "cells": [{k: _jsonable(v) for k, v in asdict(c).items()} for c in todo]}
    atomic_write_json(out / INDEX_FILE, index)
    return index


def _jsonable(v):
    return {k: _jsonable(x) for k, x in v.items()} if isinstance(v, dict) else \
        [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v if v is None or \
        isinstance(v, (bool, int, float, str)) else str(v)


def compose(spec: GridSpec, done: list[Cell]):
    """The labelled grid image: axis titles, column and row labels, cells in place."""
    font = ImageFont.load_default()
    w, h = spec.width, spec.height
    left = 12 + max((len(label(spec.y, v)) for v in spec.y_values), default=0) * 6 if spec.y else 8
    top = 40
    sheet = Image.new("RGB", (left + w * len(spec.x_values) + 8, top + h * len(spec.y_values) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((left, 4), f"x: {spec.x}" + (f"   y: {spec.y}" if spec.y else ""), fill="black", font=font)
    for c, v in enumerate(spec.x_values):
        draw.text((left + c * w + 2, 22), label(spec.x, v)[: max(4, w // 6)], fill="black", font=font)
    for r, v in enumerate(spec.y_values):
        if spec.y:
            draw.text((4, top + r * h + h // 2 - 5), label(spec.y, v), fill="black", font=font)
    for cell in done:
        image = getattr(cell, "image", None)
        if image is not None:
            sheet.paste(image.convert("RGB").resize((w, h)), (left + cell.col * w, top + cell.row * h))
    return sheet


# ------------------------------------------------------------------ end of a training run
def end_of_run_grid(cfg, pipe, run_dir, progress=None) -> Optional[dict]:
    """`[sample] grid = true`: RUN/grid/ over the run's checkpoints (columns: step 0 = the base model,
    each kept checkpoint, the final adapter) and its validation prompts (rows), at sample.grid_scale.
    Removes the training adapter from `pipe` first (call it after the adapter files are written)."""
    sc = cfg.sample
    if not getattr(sc, "grid", False) or not sc.prompts:
        return None
    for m in pipeline_components(pipe).values():
        remove_lora(m)
    unload_embeddings(pipe.text_encoder)   # the word embedding of [embedding] training
    res = cfg.data.resolution
    spec = GridSpec(x="step", x_values=run_steps(run_dir), y="prompt", y_values=list(sc.prompts), run=str(run_dir),
                    scale=sc.grid_scale, seed=sc.seed, negative_prompt=sc.negative_prompt, steps=sc.steps,
                    guidance_scale=sc.guidance_scale, width=sc.width or res, height=sc.height or res,
                    scheduler=sc.scheduler)
    index = make_grid(pipe, spec, Path(run_dir) / "grid", progress, model=cfg.model.pretrained)
    log.info("comparison grid: %s", Path(run_dir) / "grid" / GRID_FILE)
    return index


def grid_so_far(cfg, run_dir, step: int, device: str = "") -> Optional[Path]:
    """`[sample] grid_every = N`: at each validation step that is a multiple of N, RUN/grid/step_<N>/ over the
    checkpoints written so far (step 0 = the base model, each kept checkpoint) and the validation prompts,
    made by `lora-sd grid` in a subprocess (the training adapter stays in this process's model)."""
    sc = cfg.sample
    if not (sc.grid_every and sc.prompts and step % sc.grid_every == 0) or any("|" in p for p in sc.prompts):
        return None
    out = Path(run_dir) / "grid" / f"step_{step:06d}"
    res = cfg.data.resolution
    args = ["--x", "step=" + ",".join(str(v) for v in run_steps(run_dir) if v != FINAL),
            "--y", "prompt=" + "|".join(sc.prompts), "--run", str(run_dir), "--scale", str(sc.grid_scale),
            "--seed", str(sc.seed), "--negative-prompt", sc.negative_prompt, "--model", cfg.model.pretrained,
            "--model-config", cfg.model.config,
            "--steps", str(sc.steps), "--guidance", str(sc.guidance_scale), "--width", str(sc.width or res),
            "--height", str(sc.height or res), "--scheduler", sc.scheduler, "--device", device, "--out", str(out),
            "--overwrite", "--yes"]   # a resumed run makes the same grid again: the earlier one is moved aside
    done = subprocess.run([sys.executable, "-m", "lora_sd.cli", "grid", *args], capture_output=True, text=True)
    if done.returncode:
        log.warning("step %d: the comparison grid failed: %s", step, (done.stderr.strip().splitlines() or ["?"])[-1])
        return None
    log.info("step %d: comparison grid over the checkpoints so far: %s", step, out / GRID_FILE)
    return out
