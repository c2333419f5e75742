"""Jobs: the exact command a run executes, and starting / stopping it as a process group.

The GUI has no training logic: a job is a config file in a run folder plus one CLI command.
Each job runs in its own session (process group), so Stop reaches every process it started
(`accelerate launch` and its worker) with one SIGTERM; the trainer then checkpoints and marks
its run "stopped".
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from lora_core.configfile import read_toml
from lora_core.run import STATES

from . import job_kinds
from .job_kinds import REPO_ROOT

LAUNCHERS = ("accelerate", "python")


@dataclass
class Job:
    """One queued command. `run_dir` is absolute; `kind` is a lora_gui.job_kinds name; `state` is one
    of the run states (lora_core.run.STATES): queued, running, stopping, stopped, failed, done."""
    id: str
    kind: str
    run_dir: str
    resume: bool = False
    launcher: str = "accelerate"
    state: str = "queued"
    pgid: Optional[int] = None
    added: float = 0.0
    started: Optional[float] = None
    ended: Optional[float] = None
    returncode: Optional[int] = None
    label: str = ""
    extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        job_kinds.get(self.kind)  # an unknown kind raises ValueError
        if self.state not in STATES:
            raise ValueError(f"job {self.id}: unknown state {self.state!r}; known: {list(STATES)}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")

    @property
    def spec(self) -> job_kinds.JobKind:
        return job_kinds.get(self.kind)

    @property
    def is_train(self) -> bool:
        return self.spec.train

    def to_dict(self) -> dict:
        return asdict(self)


def python_executable() -> str:
    return sys.executable or "python3"


def accelerate_prefix(mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` for one local process, every value it would otherwise warn about given."""
    exe = Path(python_executable()).parent / "accelerate"
    head = [str(exe)] if exe.is_file() else [python_executable(), "-m", "accelerate.commands.accelerate_cli"]
    return head + ["launch", "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
                   "--mixed_precision", mixed_precision]


def _mixed_precision(config: Path) -> str:
    """The job's train.mixed_precision (so that accelerate launch agrees with the config)."""
    try:
        value = read_toml(config).get("train", {}).get("mixed_precision", "no")
    except ValueError:   # ConfigError: missing or not valid TOML
        return "no"
    return value if value in ("no", "fp16", "bf16") else "no"


def build_command(job: Job) -> list[str]:
    """The argv of a job, e.g. `accelerate launch ... -m lora_sd.cli train --config RUN/config.toml
    --run-dir RUN [--resume latest]`."""
    spec = job.spec
    run = Path(job.run_dir)
    config = str(run / "config.toml")
    args = [spec.command, "--config", config, spec.out_flag, str(run)]
    if job.resume and spec.train:
        args += ["--resume", "latest"]
    args += list(job.extra)
    if job.launcher == "accelerate" and spec.train:
        return accelerate_prefix(_mixed_precision(Path(config))) + ["-m", spec.cli] + args
    return [python_executable(), "-m", spec.cli] + args


def preview(job: Job) -> str:
    return shlex.join(build_command(job))


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(k, "1")
    return env


def start(job: Job, cwd: Path) -> subprocess.Popen:
    """Start the job in a new session; its stdout/stderr go to RUN/console.log."""
    run = Path(job.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "console.log", "ab") as out:
        proc = subprocess.Popen(build_command(job), cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    return proc


def group_alive(pgid: Optional[int]) -> bool:
    """True while any process of the group still exists (zombies of our own children are reaped
    by the caller's Popen.poll() first)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: Optional[int], sig: int = signal.SIGTERM) -> bool:
    """Send `sig` to the whole process group; False when it is already gone."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
