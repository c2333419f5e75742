"""The request of a comparison grid: the chosen runs or adapter files, checkpoints, scales, prompts and
seeds -> the `lora-sd grid` arguments (at most two of them vary: they become the columns and rows) and the
labels the page shows over the cells."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_sd.config import AUTO_SAMPLER

from ..errors import UserError
from ..model_refs import resolve_model_ref
from ..workspace import Workspace

AXIS_ORDER = ("step", "adapter", "scale", "seed", "prompt")   # the first varying one is the columns
FINAL = "final"


def step_label(step) -> str:
    return "0 (base)" if step == 0 else FINAL if step in (FINAL, -1, None) else f"step {step}"


def parse_step(label: str):
    text = str(label).strip()
    if text.startswith("0"):
        return 0
    if text == FINAL:
        return FINAL
    try:
        return int(text.removeprefix("step").strip())
    except ValueError:
        raise UserError(f"checkpoint {label!r}: expected '0 (base)', 'step N' or 'final'") from None


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        return [kind(t) for t in str(text or "").replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a comma-separated list of numbers") from None


@dataclass
class GridRequest:
    """What the grid form asks for: sources (workspace paths of run folders / adapter files; none: the base
    model alone), steps (checkpoint labels), scales and seeds (comma-separated), prompts (one per line)
    and the sampling settings."""
    sources: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    scales: str = "1"
    prompts: str = ""
    seeds: str = "0"
    model: str = "tiny"
    size: int = 64
    sample_steps: int = 4
    guidance: float = 7.5
    scheduler: str = AUTO_SAMPLER

    def values(self, ws: Workspace) -> dict[str, list]:
        """The values of each axis (one value: that axis is fixed)."""
        srcs = [str(ws.resolve(s, must_exist=True)) for s in (self.sources or [])]
        dims = {"step": [parse_step(s) for s in (self.steps or [])] or [FINAL], "adapter": srcs or [""],
                "scale": _numbers(self.scales, float, "Scales") or [1.0],
                "seed": _numbers(self.seeds, int, "Seeds") or [0],
                "prompt": [p.strip() for p in str(self.prompts or "").splitlines() if p.strip()]}
        if not dims["prompt"]:
            raise UserError("Prompts: write at least one prompt (one per line)")
        if any("|" in p for p in dims["prompt"]) or any("," in s for s in srcs):
            raise UserError("a prompt may not hold '|' and a path no ',' (they separate the grid's values)")
        return dims

    def cli_args(self, ws: Workspace) -> tuple[list[str], dict]:
        """`lora-sd grid` arguments and the request {x, y, x_labels, y_labels, rows, cols} the page shows."""
        dims = self.values(ws)
        x, y = _axes(dims)
        args = ["grid", "--x", _axis(x, dims[x])] + (["--y", _axis(y, dims[y])] if y else [])
        fixed = {a: dims[a][0] for a in AXIS_ORDER if a not in (x, y)}
        source = fixed.get("adapter", "")
        if source:
            args += ["--run" if Path(source).is_dir() else "--adapter", source]
        if "step" in fixed and fixed["step"] != FINAL:
            args += ["--step", str(fixed["step"])]
        args += ["--scale", str(fixed.get("scale", 1.0)), "--seed", str(fixed.get("seed", 0)),
                 "--prompt", str(fixed.get("prompt", dims["prompt"][0])),
                 "--model", resolve_model_ref(ws, self.model, "Base model"),
                 "--width", str(int(self.size)), "--height", str(int(self.size)),
                 "--steps", str(int(self.sample_steps)), "--guidance", str(float(self.guidance)),
                 "--scheduler", self.scheduler or AUTO_SAMPLER]
        request = {"x": x, "y": y, "x_labels": [_label(x, v, ws) for v in dims[x]],
                   "y_labels": [_label(y, v, ws) for v in dims[y]] if y else [""],
                   "cols": len(dims[x]), "rows": len(dims[y]) if y else 1}
        return args, request


def _axes(dims: dict) -> tuple[str, str]:
    """(columns, rows) axes: the varying ones in AXIS_ORDER (rows "" when one varies, columns scale when none)."""
    vary = [a for a in AXIS_ORDER if len(dims[a]) > 1]
    if len(vary) > 2:
        raise UserError(f"a grid has two axes, but {', '.join(vary)} each have several values: keep one value "
                        "for all but two of them")
    x, y = (vary[0] if vary else "scale"), (vary[1] if len(vary) > 1 else "")
    one_run = len(dims["adapter"]) == 1 and dims["adapter"][0] and Path(dims["adapter"][0]).is_dir()
    if "step" in (x, y) and not one_run:
        raise UserError("comparing checkpoints needs exactly one run folder (runs/<name>)")
    return x, y


def _axis(axis: str, values: list) -> str:
    if axis == "prompt":
        return "prompt=" + "|".join(values)
    return f"{axis}=" + ",".join(str(v) for v in values)


def _label(axis: str, value, ws: Workspace) -> str:
    if axis == "step":
        return step_label(value)
    if axis == "adapter":
        return ws.rel(value) if value else "base"
    return f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}" if axis == "seed" else str(value)
