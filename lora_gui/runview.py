"""Reading a run folder for the page: progress with ETA, loss curve, validation images, log tail.

Everything comes from the files the trainer writes (lora_core.run.RunDir), so any tab,
after any reload, shows the same state.
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lora_core.configfile import read_toml
from lora_core.run import RunDir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLI_LINE = re.compile(r"lora-(sd|llm) [\w-]+: ")   # how the CLIs' one-line messages start (lora_core.cli_errors)


@dataclass
class RunSnapshot:
    path: Path
    state: str = "none"
    step: int = 0
    max_steps: int = 0
    eta_s: float | None = None
    loss: float | None = None
    error: str | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)     # validation loss (train.val_every), where present
    val_losses: list[float] = field(default_factory=list)
    best_val_step: Optional[int] = None
    samples: list[Path] = field(default_factory=list)
    log_tail: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


def tail(path: Path, max_bytes: int = 6000, max_lines: int = 12) -> str:
    """The last lines of a text file (tqdm's carriage-return redraws collapsed to the last one)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return ""
    lines = [ln.rsplit("\r", 1)[-1] for ln in data.replace("\r\n", "\n").split("\n")]
    if size > max_bytes:
        lines = lines[1:]  # the first line is cut
    return "\n".join(lines[-max_lines:]).strip("\n")


def last_line(path: Path) -> str:
    """A job's own last word in its console: the last line of the CLI's own (`lora-sd train: error: ...`), not
    the launcher's traceback after it (`accelerate launch` ends with CalledProcessError); else the last
    non-empty line ("" when there is none)."""
    lines = [ln.strip() for ln in tail(path, max_lines=40).splitlines() if ln.strip()]
    own = [ln for ln in lines if CLI_LINE.match(ln)]
    return (own or lines or [""])[-1]


def snapshot(run_dir: Path) -> RunSnapshot:
    run = RunDir(run_dir)
    st = run.read_status()
    snap = RunSnapshot(path=Path(run_dir), state=st.get("state", "none"), step=int(st.get("step") or 0),
                       max_steps=int(st.get("max_steps") or 0), eta_s=st.get("eta_s"), loss=st.get("loss"),
                       error=st.get("error"))
    for rec in run.read_metrics():
        if "step" in rec and "loss" in rec:
            snap.steps.append(int(rec["step"]))
            snap.losses.append(float(rec["loss"]))
        if "step" in rec and "val_loss" in rec:
            snap.val_steps.append(int(rec["step"]))
            snap.val_losses.append(float(rec["val_loss"]))
    snap.best_val_step = st.get("best_val_step")
    if not snap.max_steps:
        snap.max_steps = _max_steps_from_config(run.config)
    if run.samples.is_dir():
        snap.samples = sorted(p for p in run.samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    # console.log (the process's stdout/stderr) has the log records plus tqdm and any traceback;
    # train.log alone exists when the run was started outside the GUI
    snap.log_tail = tail(run.path / "console.log") or tail(run.log_file)
    return snap


def _max_steps_from_config(path: Path) -> int:
    try:
        return int(read_toml(path).get("train", {}).get("max_steps", 0))
    except (ValueError, TypeError):   # ConfigError: missing or not valid TOML
        return 0


def format_eta(seconds) -> str:
    if seconds is None:
        return "--"
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


STATE_COLORS = {"running": "#2563eb", "done": "#16a34a", "failed": "#dc2626", "stopped": "#d97706",
                "stopping": "#d97706", "queued": "#6b7280", "none": "#6b7280"}


def progress_html(snap: RunSnapshot, unit: str = "step") -> str:
    """A progress bar with the state and step, loss and ETA (plain HTML, no scripts); another `unit` ("cells",
    "tasks"): the units done of all, without loss and ETA."""
    pct = 100 * snap.fraction
    color = STATE_COLORS.get(snap.state, "#6b7280")
    eta = format_eta(snap.eta_s) if snap.state == "running" else "--"
    loss = f"{snap.loss:.4f}" if isinstance(snap.loss, (int, float)) else "--"
    err = (f'<div class="run-error" style="color:#dc2626;margin-top:4px">{html.escape(str(snap.error))}</div>'
           if snap.error and snap.state in ("failed", "stopped") else "")
    return (
        f'<div class="run-progress" data-state="{html.escape(snap.state)}" data-step="{snap.step}">'
        f'<div style="display:flex;justify-content:space-between;font-size:14px">'
        f'<span><b>{html.escape(snap.path.name)}</b> &middot; <span class="run-state" style="color:{color}">'
        f'{html.escape(snap.state)}</span></span>'
        f'{_counts(snap, unit, loss, eta)}</div>'
        f'<div style="background:#e5e7eb;border-radius:4px;height:14px;margin-top:4px">'
        f'<div style="width:{pct:.1f}%;background:{color};height:14px;border-radius:4px"></div></div>{err}</div>')


SAMPLE_NAME = re.compile(r"step_(\d+)_(\d+)$")   # the trainer's samples/step_<step>_<prompt index>.png


def sample_steps(snap: RunSnapshot) -> list[int]:
    """The steps the run has validation images of, in order."""
    return sorted({int(m.group(1)) for p in snap.samples if (m := SAMPLE_NAME.match(p.stem))})


def sample_prompts(run_dir: Path) -> list[str]:
    """The run's validation prompts (sample.prompts of its config.toml; [] when unreadable)."""
    try:
        prompts = read_toml(Path(run_dir) / "config.toml").get("sample", {}).get("prompts", [])
    except (ValueError, TypeError):
        return []
    return [str(p) for p in prompts] if isinstance(prompts, list) else []


def _counts(snap: RunSnapshot, unit: str, loss: str, eta: str) -> str:
    done = f'<span class="run-step">{snap.step}</span> / {snap.max_steps}'
    if unit != "step":   # a grid's cells, a suite's tasks
        return f'<span>{done} {unit}</span>'
    return f'<span>step {done} &middot; loss {loss} &middot; ETA {eta}</span>'


def gallery_items(snap: RunSnapshot, step: Optional[int] = None, limit: int = 24) -> list[tuple[str, str]]:
    """(path, caption) of the validation images at `step` (the newest step at or below it; None: the newest
    step), each captioned "step N · <its prompt>"; images of another naming: the newest `limit`, by name."""
    steps = sample_steps(snap)
    if not steps:
        return [(str(p), p.stem) for p in snap.samples[-limit:]]
    at = max([s for s in steps if step is None or s <= step] or steps[:1])
    prompts = sample_prompts(snap.path)
    out = []
    for p in snap.samples:
        m = SAMPLE_NAME.match(p.stem)
        if m and int(m.group(1)) == at:
            i = int(m.group(2))
            out.append((str(p), f"step {at} · {prompts[i] if i < len(prompts) else f'prompt {i}'}"))
    return out
