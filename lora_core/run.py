"""The run contract, without torch: run states, the run folder, the `[train]` settings, logging
setup and resume bookkeeping. The GUI process and every backend (torch, MindSpore) import it.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Optional

from .files import atomic_write_json
from .settings import TrainSettings  # noqa: F401 (re-exported)

log = logging.getLogger("lora")
STATES = ("queued", "running", "stopping", "stopped", "failed", "done")


class NonFiniteLoss(RuntimeError):
    pass


# ------------------------------------------------------------------ run folder
class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.status_file = self.path / "status.json"
        self.metrics = self.path / "metrics.jsonl"
        self.log_file = self.path / "train.log"
        self.samples = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"

    def create(self) -> "RunDir":
        for d in (self.path, self.samples, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_status(self, state: str, **fields) -> dict:
        assert state in STATES, state
        status = {**self.read_status(), **fields, "state": state, "updated": time.time()}
        atomic_write_json(self.status_file, status)
        return status

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        out = []
        try:
            for line in self.metrics.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written right now
        except FileNotFoundError:
            pass
        return out

    def checkpoints(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                      and (p / "trainer_state.json").is_file())

    def latest_checkpoint(self) -> Optional[Path]:
        c = self.checkpoints()
        return c[-1] if c else None


def setup_logging(run: Optional[RunDir], main_process: bool = True) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if run is not None and main_process:
        handlers.append(logging.FileHandler(run.log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def resolve_resume(run: RunDir, resume: Optional[str]) -> Optional[Path]:
    if not resume:
        return None
    if resume == "latest":
        return run.latest_checkpoint()  # None: nothing to resume, start fresh
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return p


class StopFlag:
    """Context manager: SIGTERM/SIGINT set `.stop` (a second signal interrupts at once)."""
    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        log.warning("signal %s received: stopping after this step and saving a checkpoint", signum)
        self.stop = True

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
