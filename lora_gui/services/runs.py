"""Training runs and the queue: preview and start a run, list runs by kind, stop, resume, queue rows."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from lora_core.configfile import dumps, save_config
from lora_core.run import why_not_resumable

from .. import job_kinds, jobs, runview
from ..errors import UserError
from ..queue import JobQueue
from ..workspace import Workspace, check_name
from .job_configs import ConfigService


class RunService:
    def __init__(self, ws: Workspace, queue: JobQueue, configs: ConfigService):
        self.ws, self.queue, self.configs = ws, queue, configs

    def fresh_name(self, name: str = "") -> str:
        """The run folder name Start gives `name` now (a taken name gets a suffix; none: a timestamp)."""
        return self.ws.new_run_dir(name).name

    def config(self, kind: str, name: str) -> dict:
        """The config data of run `name` (its config.toml, validated as job kind `kind`): what the form shows."""
        return self.configs.load_file(kind, self.path(name) / "config.toml")

    def preview(self, kind: str, base: dict, values: dict, run_name: str, launcher: str) -> tuple[str, str]:
        """(config TOML, exact command) of the run the Start button would queue."""
        run_dir = self.ws.new_run_dir(run_name)
        cfg = self.configs.build(kind, base, values)
        cfg.run_dir = str(run_dir)
        job = jobs.Job(id="preview", kind=kind, run_dir=str(run_dir), launcher=launcher)
        return dumps(cfg), jobs.preview(job)

    def start(self, kind: str, base: dict, values: dict, run_name: str, launcher: str) -> tuple[str, str]:
        """Write RUN/config.toml and queue the training; returns (run name, message)."""
        cfg = self.configs.build(kind, base, values)
        run_dir = self.ws.new_run_dir(run_name)
        cfg.run_dir = str(run_dir)
        run_dir.mkdir(parents=True)
        save_config(run_dir / "config.toml", cfg)
        job = self.queue.add(kind, run_dir, launcher=launcher)
        running = self.queue.tick()
        where = "started" if running is not None and running.id == job.id else "queued"
        return run_dir.name, f"{run_dir.name}: {where} ({jobs.preview(job)})"

    def names(self, kind: str) -> list[str]:
        """Run folders of this kind (status.json `kind`), newest first."""
        return [p.name for p in self.ws.run_dirs() if job_kinds.run_kind(p) == kind]

    def path(self, name: str) -> Path:
        return self.ws.resolve(Path("runs") / check_name(name, "run name"), must_exist=True)

    def active(self, kind: str) -> Optional[str]:
        """The run to show when none is chosen: the running one of this kind, else the newest."""
        running = self.running(kind)
        if running is not None:
            return running
        names = self.names(kind)
        return names[0] if names else None

    def running(self, kind: str) -> Optional[str]:
        """The run of this kind the queue is running now (None: none)."""
        cur = self.queue.running()
        return Path(cur.run_dir).name if cur is not None and cur.kind == kind else None

    def stop(self, name: str) -> str:
        run = str(self.path(name))
        for j in reversed(self.queue.jobs()):
            if j.run_dir == run and j.state in ("queued", "running"):
                return self.queue.stop(j.id)
        raise UserError(f"{name} is not running or queued")

    def resume(self, name: str, launcher: str) -> str:
        run = self.path(name)
        snap = runview.snapshot(run)
        if snap.state in ("running", "stopping", "queued"):
            raise UserError(f"{name} is {snap.state}: nothing to resume")
        if snap.state == "done":
            raise UserError(f"{name} has finished all its steps; raise train.max_steps in a new run instead")
        why = why_not_resumable(run)
        if why:
            raise UserError(f"{name}: nothing to resume: {why}")
        kind = job_kinds.run_kind(run)
        if kind is None or not job_kinds.get(kind).train:
            raise UserError(f"{name}: its status.json names no training job kind; resume it with the CLI")
        self._wait_until_idle(run)
        job = self.queue.add(kind, run, resume=True, launcher=launcher, front=True)
        self.queue.tick()
        return f"{name}: resume queued ({jobs.preview(job)})"

    def _wait_until_idle(self, run: Path, timeout: float = 20.0) -> None:
        """A stopped trainer has written its status but may still be exiting: wait for its job to end."""
        end = time.time() + timeout
        while any(j.run_dir == str(run) and j.state == "running" for j in self.queue.jobs()):
            if time.time() > end:
                raise UserError(f"{run.name} is still shutting down; try again in a moment")
            self.queue.tick()
            time.sleep(0.2)

    def queue_rows(self) -> list[list]:
        rows = []
        for j in self.queue.jobs():
            snap = runview.snapshot(Path(j.run_dir))
            prog = f"{snap.step}/{snap.max_steps}" if snap.max_steps else ""
            rows.append([j.id, j.label, j.kind, j.state + (" (resume)" if j.resume else ""), prog,
                         time.strftime("%H:%M:%S", time.localtime(j.added))])
        return rows
