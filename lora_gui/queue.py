"""The job queue (workspace/queue.json, written atomically) and the scheduler thread.

Jobs run one after another. A queued job can be removed or moved; a running one can be
stopped (SIGTERM to its process group). All state is in the file and the run folders, so a
page reload, a second tab or a restarted app sees the same queue. Jobs and runs share one
vocabulary of states (lora_core.run.STATES), and the queue writes a run's status.json only
through RunDir.write_status.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from lora_core.files import atomic_write_json
from lora_core.run import FINAL_STATES, RunDir

from . import jobs, runview
from .errors import QueueError
from .jobs import Job

log = logging.getLogger("lora_gui")


class JobQueue:
    """The persisted list of jobs. Every method re-reads the file under a lock, so it is safe
    from the UI threads and the scheduler at once."""

    def __init__(self, path: Path, cwd: Path):
        self.path = Path(path)
        self.cwd = Path(cwd)
        self._lock = threading.RLock()
        self._procs: dict[str, "jobs.subprocess.Popen"] = {}

    # ---------------------------------------------------------------- file
    def _load(self) -> list[Job]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except json.JSONDecodeError as e:
            raise QueueError(f"{self.path}: not valid JSON ({e}); fix or delete it") from None
        return [Job(**j) for j in data.get("jobs", [])]

    def _save(self, items: list[Job]) -> None:
        atomic_write_json(self.path, {"jobs": [j.to_dict() for j in items]})

    def jobs(self) -> list[Job]:
        with self._lock:
            return self._load()

    def get(self, job_id: str) -> Job:
        for j in self.jobs():
            if j.id == job_id:
                return j
        raise QueueError(f"no job {job_id!r} in the queue")

    # ---------------------------------------------------------------- editing
    def add(self, kind: str, run_dir: Path, *, resume: bool = False, launcher: str = "accelerate",
            label: str = "", front: bool = False, extra: Optional[list[str]] = None) -> Job:
        job = Job(id=uuid.uuid4().hex[:8], kind=kind, run_dir=str(Path(run_dir).resolve()), resume=resume,
                  launcher=launcher, added=time.time(), label=label or Path(run_dir).name, extra=list(extra or []))
        with self._lock:
            items = self._load()
            if any(j.run_dir == job.run_dir and j.state in ("queued", "running") for j in items):
                raise QueueError(f"{job.label}: this run folder already has a queued or running job")
            if front:
                at = next((i for i, j in enumerate(items) if j.state == "queued"), len(items))
                items.insert(at, job)
            else:
                items.append(job)
            self._save(items)
            RunDir(run_dir).write_status("queued", job=job.id, kind=kind, error=None)
        return job

    def remove(self, job_id: str) -> None:
        with self._lock:
            items = self._load()
            job = next((j for j in items if j.id == job_id), None)
            if job is None:
                raise QueueError(f"no job {job_id!r} in the queue")
            if job.state == "running":
                raise QueueError(f"{job.label} is running: stop it first")
            self._save([j for j in items if j.id != job_id])
            run = RunDir(job.run_dir)
            if job.state == "queued" and run.read_status().get("state") == "queued":
                run.write_status("stopped", error="removed from the queue before it started")

    def move(self, job_id: str, delta: int) -> None:
        """Move a queued job `delta` places among the queued jobs (negative = earlier)."""
        with self._lock:
            items = self._load()
            waiting = [i for i, j in enumerate(items) if j.state == "queued"]
            where = next((k for k, i in enumerate(waiting) if items[i].id == job_id), None)
            if where is None:
                raise QueueError(f"job {job_id!r} is not queued: only queued jobs can be reordered")
            to = max(0, min(len(waiting) - 1, where + delta))
            if to == where:
                return
            order = [items[i] for i in waiting]
            order.insert(to, order.pop(where))
            for slot, job in zip(waiting, order):
                items[slot] = job
            self._save(items)

    def clear_finished(self) -> int:
        with self._lock:
            items = self._load()
            keep = [j for j in items if j.state not in FINAL_STATES]
            self._save(keep)
            return len(items) - len(keep)

    def _update(self, job_id: str, **fields) -> Job:
        with self._lock:
            items = self._load()
            for j in items:
                if j.id == job_id:
                    for k, v in fields.items():
                        setattr(j, k, v)
                    self._save(items)
                    return j
        raise QueueError(f"no job {job_id!r} in the queue")

    # ---------------------------------------------------------------- processes
    def running(self) -> Optional[Job]:
        return next((j for j in self.jobs() if j.state == "running"), None)

    def _alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            proc.poll()  # reap the leader so that a finished group reads as gone
        return jobs.group_alive(job.pgid)

    def _finish(self, job: Job) -> Job:
        """Record how a job ended. A final state the job wrote itself is kept; otherwise the state
        follows from the exit code, and a failure's error is the job's last output line (the CLI's
        one-line message)."""
        proc = self._procs.pop(job.id, None)
        rc = proc.poll() if proc is not None else None
        run = RunDir(job.run_dir)
        st = run.read_status().get("state")
        if st in FINAL_STATES:
            state = st
        elif st == "stopping":  # stopped before the trainer had installed its signal handler
            state = "stopped"
            run.write_status("stopped", error=f"stopped while starting (exit code {rc}); nothing to resume")
        elif rc == 0 and not job.is_train:  # a one-shot job that does not write its own status
            state = "done"
            run.write_status("done", finished=time.time())
        else:
            state = "failed"
            last = runview.last_line(run.path / "console.log")
            why = "without a final status" if rc == 0 else f"(code {rc})"
            note = f"the job exited {why}; see {run.path.name}/console.log"
            run.write_status("failed", error=f"{last} [{note}]" if last else note)
        return self._update(job.id, state=state, ended=time.time(), returncode=rc)

    def _start(self, job: Job) -> Job:
        run = RunDir(job.run_dir)
        try:
            proc = jobs.start(job, self.cwd)
        except OSError as e:
            run.write_status("failed", error=f"could not start {jobs.preview(job)}: {e}")
            return self._update(job.id, state="failed", ended=time.time())
        self._procs[job.id] = proc
        # "running" from the start (the trainer rewrites it with its own fields once its model is loaded)
        run.write_status("running", pid=proc.pid, started=time.time())
        log.info("started job %s: %s", job.id, jobs.preview(job))
        return self._update(job.id, state="running", pgid=proc.pid, started=time.time())

    def tick(self) -> Optional[Job]:
        """Reap a finished job, start the next queued one; returns the running job."""
        with self._lock:
            cur = self.running()
            if cur is not None:
                if self._alive(cur):
                    return cur
                self._finish(cur)
            nxt = next((j for j in self._load() if j.state == "queued"), None)
            if nxt is None:
                return None
            started = self._start(nxt)
            return started if started.state == "running" else None

    def stop(self, job_id: str) -> str:
        """Stop a job: SIGTERM to its group (a second Stop sends SIGKILL); a queued job is removed."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                self.remove(job_id)
                return f"{job.label}: removed from the queue"
            if job.state != "running":
                return f"{job.label} is not running ({job.state})"
            run = RunDir(job.run_dir)
            again = run.read_status().get("state") == "stopping"
            sig = signal.SIGKILL if again else signal.SIGTERM
            if not jobs.signal_group(job.pgid, sig):
                return f"{job.label} has already ended"
            if not again:
                run.write_status("stopping")
            return f"{job.label}: {'killed' if again else 'stopping (a checkpoint is being written)'}"

    def stop_all(self, wait: float = 0.0) -> None:
        """SIGTERM every running job (app shutdown); wait up to `wait` s for them to exit."""
        cur = self.running()
        if cur is None:
            return
        self.stop(cur.id)
        end = time.time() + wait
        while time.time() < end and self._alive(cur):
            time.sleep(0.2)


class Scheduler:
    """A daemon thread that calls queue.tick() every `interval` seconds."""

    def __init__(self, queue: JobQueue, interval: float = 1.0):
        self.queue = queue
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lora-gui-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue.tick()
            except Exception:  # keep scheduling whatever one job did
                log.exception("scheduler tick failed")
            self._stop.wait(self.interval)

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

