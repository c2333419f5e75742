"""`lora-sd grid`, `lora-sd sweep`, `lora-sd check`: the commands that help decide (added to lora_sd.cli)."""
from __future__ import annotations

import json

from tqdm import tqdm

from lora_core.adapter_files import inspect
from lora_core.cli_errors import add_overwrite_flag, add_sweep_and_check, moved_note
from lora_core.errors import ConfigError
from lora_core.files import check_output, room_for

from .config import AUTO_SAMPLER, SAMPLER_HELP


CONFIRM_CELLS = 1000   # a larger grid (hours of generation) is made only with --yes


def _axis_values(axis: str, text: str, run: str) -> list:
    """'step' (all of the run's steps), 'step=0,200,final', 'scale=0,0.5,1', 'prompt=a cat|a dog', 'seed=1,2',
    'adapter=A.safetensors,RUN2'."""
    from .grid import FINAL, run_steps  # lazy: torch (--help stays torch-free)
    if axis == "step" and not text:
        if not run:
            raise ConfigError("--x/--y step needs --run (the run folder)")
        steps = run_steps(run)
        if steps == [0]:
            raise ConfigError(f"--x/--y step: {run} has no checkpoint and no final adapter, so the grid would show "
                              "only the base model; give a run that has written a checkpoint")
        return steps
    if not text:
        raise ConfigError(f"give the {axis} values, e.g. --x {axis}=...")
    parts = [t.strip() for t in text.split("|" if axis == "prompt" else ",")]
    try:
        if axis == "step":
            return [FINAL if p == "final" else int(p) for p in parts]
        if axis == "scale":
            return [float(p) for p in parts]
        if axis == "seed":
            return [int(p) for p in parts]
    except ValueError as e:
        raise ConfigError(f"--x/--y: bad {axis} value ({e})") from None
    return parts


def _cmd_grid(a) -> int:
    from .grid import AXES, CELLS, GRID_FILE, INDEX_FILE, GridSpec, make_grid  # lazy: torch (--help stays torch-free)
    from .models import load_pipeline, pick_device  # lazy: torch (--help stays torch-free)
    axes = []
    for spec in (a.x, a.y):
        if not spec:
            continue
        axis, _, text = spec.partition("=")
        if axis not in AXES:
            raise ConfigError(f"--x/--y: unknown axis {axis!r}; choose from {', '.join(AXES)}")
        axes.append((axis, _axis_values(axis, text, a.run)))
    (x, xv), (y, yv) = axes[0], (axes[1] if len(axes) > 1 else ("", [None]))
    if len(xv) * len(yv) > CONFIRM_CELLS and not a.yes:
        raise ConfigError(f"the grid has {len(xv) * len(yv):,} cells ({len(yv)} x {len(xv)}), each a full generation "
                          f"of {a.steps} steps: pass --yes to make it, or give fewer values")
    found = check_output(a.out, overwrite=a.overwrite, flag="--out", results=[GRID_FILE, INDEX_FILE, CELLS],
                         inputs=[a.run, a.adapter, a.model])
    spec = GridSpec(x=x, x_values=xv, y=y, y_values=yv, run=a.run, adapter=a.adapter, step=a.step, scale=a.scale,
                    prompt=a.prompt, seed=a.seed, negative_prompt=a.negative_prompt, steps=a.steps,
                    guidance_scale=a.guidance, width=a.width, height=a.height, scheduler=a.scheduler)
    pipe = load_pipeline(a.model, a.model_config)
    pipe.to(pick_device(a.device))
    bar = tqdm(total=len(xv) * len(yv), desc="grid", unit="cell")
    with room_for(found) as moved:
        make_grid(pipe, spec, a.out, progress=lambda done, total, cell: bar.update(1), model=a.model)
    bar.close()
    moved_note(moved)
    print(f"{a.out}/{GRID_FILE} ({len(yv)} x {len(xv)} cells; index.json lists each cell's parameters)")
    return 0


def inspect_base(a) -> int:
    """`lora-sd inspect FILE --base MODEL`: the load report of FILE against MODEL, before any load."""
    from . import formats  # lazy: torch (--help stays torch-free)
    from .models import load_pipeline  # lazy: torch (--help stays torch-free)
    pipe = load_pipeline(a.base, getattr(a, "model_config", ""))
    comps = {n: getattr(pipe, n) for n in formats.COMPONENTS if getattr(pipe, n, None) is not None}
    if not a.file:   # the base's adaptable modules {key: [in, out]}, for a header-only fit check (GUI badge)
        print(json.dumps({"base": a.base, "modules": formats.model_shapes(comps)[0]}))
        return 0
    desc = inspect(a.file)
    adapter, _, _ = formats.read_adapter(a.file, comps)
    rep = formats.load_report(adapter, comps, a.file, formats.made_for_shapes(adapter, desc.get("architecture", "")),
                              base=a.base)
    print(json.dumps(rep.to_dict(), indent=2) if a.json else rep.text())
    return 0 if rep.fits else 1


def add_commands(sub) -> None:
    """Add grid, sweep and check to the `lora-sd` subparsers."""
    g = sub.add_parser("grid", help="comparison grid over checkpoint steps, adapter scales, prompts, seeds or adapters")
    g.add_argument("--x", required=True, metavar="AXIS[=V1,V2,...]",
                   help="columns: step (all of --run's, or step=0,200,final), scale=0,0.5,1, prompt=a cat|a dog, "
                        "seed=1,2, adapter=FILE_OR_RUN,...")
    g.add_argument("--y", default="", metavar="AXIS[=V1,V2,...]", help="rows (same forms); default: one row")
    g.add_argument("--run", default="", help="the run folder whose checkpoints the step axis takes")
    g.add_argument("--adapter", default="", help="fixed adapter file or run folder (when it is no axis)")
    g.add_argument("--step", type=int, default=None, help="fixed checkpoint step of --run/--adapter (default: final)")
    g.add_argument("--scale", type=float, default=1.0, help="fixed adapter scale")
    g.add_argument("--prompt", default="a photo", help="fixed prompt")
    g.add_argument("--seed", type=int, default=0, help="fixed seed (every cell uses exactly this seed)")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--model", default="tiny", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    g.add_argument("--model-config", default="")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--scheduler", default=AUTO_SAMPLER, help=SAMPLER_HELP)
    g.add_argument("--device", default="")
    g.add_argument("--out", required=True, help="folder for grid.png, cells/ and index.json")
    g.add_argument("--yes", action="store_true", help=f"make a grid of more than {CONFIRM_CELLS:,} cells")
    add_overwrite_flag(g, "an earlier grid there (grid.png, cells/, index.json)")
    g.set_defaults(fn=_cmd_grid)

    add_sweep_and_check(sub, "lora-sd", "lora_sd.config:SDTrainConfig",
                        "lora_sd.config:load_train_config", "lora_sd.train:run_training", "lora_sd.preflight:preflight",
                        "lora_sd.preflight:ladder")

