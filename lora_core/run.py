"""The run protocol, without torch: the run folder, its states, the job wrapper and the training loop
that drives a backend's step engine. The GUI process and every backend (torch, MindSpore) import it.

Run folder (the contract with the GUI):
    config.toml   the resolved job config        status.json   kind, state, pid, step, eta, error
    metrics.jsonl one line per loss reading      train.log     the log
    samples/      validation outputs             checkpoints/step_XXXXXXXX/  full training state
    run.lock      pid + host of the trainer working in the folder

status.json has one writer, `RunDir.write_status`; its states are STATES (LIVE_STATES, then FINAL_STATES).
A trainer writes running, stopping (a stop signal arrived) and stopped | failed | done; a queue (the GUI's, a
sweep) writes queued (`mark_queued`) and a final state for a job that ended without one (`settle`).

A step engine (lora_core.training.TorchEngine, lora_llm.mindspore.train.MindSporeEngine) provides:
    backend, num_processes            "torch" / "mindspore", data-parallel processes
    steps(epoch, batch_in_epoch, step) yields (loss handle, batch_in_epoch) after each optimizer step,
                                      until the epoch ends; may raise NonFiniteLoss itself
    read_loss(total) -> float         the process mean of a sum of loss handles (the one device sync)
    any(flag) -> bool                 True when flag is True on any process
    lr() -> float                     the learning rate of the next step
    save(folder), load(folder, state) the checkpoint payload (every process calls them)
    barrier()                         wait for every process
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import sys
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .configfile import save_config
from .files import atomic_write_json, atomic_write_text, move_aside
from .fingerprint import FINGERPRINT_FILE, DataFile, change_line, fingerprint, read_fingerprint
from .resume import resume_changes
from .errors import NonFiniteLoss, RunFolderError, RunLockedError, StopRequested

log = logging.getLogger("lora")
LIVE_STATES = ("queued", "running", "stopping")    # a job waits, runs or is asked to stop
FINAL_STATES = ("stopped", "failed", "done")       # a job has ended
STATES = LIVE_STATES + FINAL_STATES
LOCK_FILE = "run.lock"
# what a folder may hold and still count as fresh: the GUI queue's config/status/console and a failed start
_FRESH_FILES = {"config.toml", "status.json", "console.log", "train.log", LOCK_FILE, FINGERPRINT_FILE}
_FRESH_DIRS = {"samples", "checkpoints"}
# what a job writes in a run folder before its resume has loaded: given back byte for byte when it is refused
_HELD_FILES = ("config.toml", "status.json", "train.log", "metrics.jsonl", LOCK_FILE)


# ------------------------------------------------------------------ run folder
class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.toml"
        self.fingerprint = self.path / FINGERPRINT_FILE   # the training data it started on (lora_core.fingerprint)
        self.status_file = self.path / "status.json"
        self.metrics = self.path / "metrics.jsonl"
        self.metric_sinks: list = []   # callables given each metrics line after it is written
        self.log_file = self.path / "train.log"
        self.samples = self.path / "samples"
        self.checkpoints_dir = self.path / "checkpoints"
        self.lock_file = self.path / LOCK_FILE
        self.held: Optional[dict] = None   # see hold()

    def create(self) -> "RunDir":
        for d in (self.path, self.samples, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def read_status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def write_status(self, state: str, **fields) -> dict:
        """The one writer of status.json. On a full disk the file is rewritten in place (its blocks
        exist already), so that the final state still lands."""
        assert state in STATES, state
        status = {**self.read_status(), **fields, "state": state, "updated": time.time()}
        try:
            atomic_write_json(self.status_file, status)
        except OSError as e:
            if not self.status_file.is_file():
                raise
            log.warning("status.json: atomic write failed (%s); rewriting it in place", e)
            text = json.dumps(status, indent=2, sort_keys=True, default=str).encode()
            fd = os.open(self.status_file, os.O_WRONLY)
            try:
                os.write(fd, text)
                os.ftruncate(fd, len(text))
            finally:
                os.close(fd)
        return status

    def hold(self) -> None:
        """Before a resume writes anything: remember what it may change (the _HELD_FILES, the folders that
        create() adds), so that a refused resume leaves the run byte-identical (give_back)."""
        self.held = {"files": {n: (self.path / n).read_bytes() if (self.path / n).is_file() else None
                               for n in _HELD_FILES},
                     "dirs": [d for d in (self.samples, self.checkpoints_dir) if not d.exists()]}

    def commit(self) -> None:
        """The resume has loaded (or there is nothing to resume): from here the run's changes are kept."""
        self.held = None

    def give_back(self) -> None:
        """Put back what hold() remembered: each file's bytes (in place), no file that was not there."""
        for name, data in self.held["files"].items():
            path = self.path / name
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        for d in self.held["dirs"]:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.held = None

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.metric_sinks:   # e.g. Accelerate's trackers (train.log_with)
            sink(record)

    def drop_metrics_after(self, step: int) -> int:
        """A resume from a checkpoint at `step` trains the later steps again: their metrics lines (and a line
        cut short by a kill) go, so that each step is in metrics.jsonl once. Returns how many lines went."""
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        keep = [line for line in lines if _metrics_step(line) <= step]
        if len(keep) < len(lines):
            atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))
        return len(lines) - len(keep)

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

    def foreign_entries(self) -> list[str]:
        """What in the folder belongs to a run (anything but a fresh start's files); [] when fresh."""
        if not self.path.exists():
            return []
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path} is a file, not a folder: choose another --run-dir")
        out = []
        for p in sorted(self.path.iterdir()):
            if p.name in _FRESH_FILES or (p.name in _FRESH_DIRS and p.is_dir() and not any(p.iterdir())):
                continue
            out.append(p.name + ("/" if p.is_dir() else ""))
        if not out and self.read_status().get("state") == "done":
            out.append("status.json (done)")
        return out


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a complete record."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def why_not_resumable(run_dir) -> Optional[str]:
    """Why `--resume latest` has nothing to continue in run_dir (None: it has): a live run, no checkpoint, a
    run that has done all its steps. The GUI asks it before it offers Resume; torch-free, reads only."""
    run = RunDir(run_dir)
    status = run.read_status()
    state = status.get("state")
    if state in LIVE_STATES:
        return f"it is {state}"
    holder = RunLock(run).holder()
    if holder and RunLock.alive(holder):
        return f"a trainer is working in it (pid {holder.get('pid')})"
    if state == "done":
        return "it has finished all its steps"
    found = run.checkpoints()
    if not found:
        return "it has no checkpoint (it ended before writing one): start it again instead"
    try:
        step = json.loads((found[-1] / "trainer_state.json").read_text()).get("step")
    except (OSError, ValueError):
        return None   # TrainLoop.resume passes over a damaged checkpoint to an older one
    if isinstance(step, int) and isinstance(status.get("max_steps"), int) and step >= status["max_steps"]:
        return f"its last checkpoint is at its final step ({step})"
    return None


def mark_queued(run_dir, **fields) -> dict:
    """A queue (the GUI's, a sweep) reserves a fresh run folder: state `queued` with its own fields."""
    return RunDir(run_dir).create().write_status("queued", error=None, **fields)


def settle(run_dir, error: str) -> dict:
    """A queue's job ended: a run folder that is not in a final state gets `failed` with the reason."""
    run = RunDir(run_dir)
    status = run.read_status()
    if status.get("state") in FINAL_STATES:
        return status
    return run.write_status("failed", error=error, finished=time.time())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (not the stream of the moment the
    handler was made): a later redirection of stderr (a GUI, a test's capture) never meets a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(run: Optional[RunDir], main_process: bool = True) -> None:
    handlers: list[logging.Handler] = [_StderrHandler()]
    if run is not None and main_process:
        handlers.append(logging.FileHandler(run.log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers)


def resume_candidates(run: RunDir, resume: Optional[str]) -> list[Path]:
    """Checkpoints to try, newest first. resume: None (fresh), "latest" (a checkpoint must exist),
    "auto" (latest if any, else fresh) or a checkpoint folder."""
    if not resume:
        return []
    if resume in ("latest", "auto"):
        found = run.checkpoints()[::-1]
        if not found and resume == "latest":
            what = "does not exist" if not run.path.exists() else "has no checkpoint"
            raise RunFolderError(f"--resume latest: {run.path} {what}, so there is no run to continue; "
                                 "check the folder, or start a new run without --resume")
        return found
    p = Path(resume)
    if not (p / "trainer_state.json").is_file():
        raise RunFolderError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
    return [p]


# ------------------------------------------------------------------ signals
class StopFlag:
    """Context manager: SIGTERM/SIGINT set `.stop`. A second signal interrupts at once, unless it comes
    within SAME_STOP_S of the first: that is the same stop reaching the trainer twice (a launcher such as
    `accelerate launch` forwards the SIGTERM or Ctrl-C that its process group also received)."""
    SAME_STOP_S = 2.0

    def __init__(self):
        self.stop = False
        self._since: Optional[float] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.stop:
            if time.monotonic() - self._since < self.SAME_STOP_S:
                log.info("signal %s received again (the same stop, forwarded): still saving a checkpoint", signum)
                return
            raise KeyboardInterrupt   # a second stop: give up at once
        log.warning("signal %s received: stopping after this step and saving a checkpoint", signum)
        self.stop, self._since = True, time.monotonic()

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)


class StopAtOnce(StopFlag):
    """Outside the loop (loading, evaluation) a signal raises StopRequested where the program is."""
    def _handle(self, signum, frame):
        if self.stop:
            return   # the first one is being handled: let the run write its final state
        self.stop = True
        raise StopRequested(f"stopped by {signal.Signals(signum).name}")


# ------------------------------------------------------------------ lock
class RunLock:
    """RUN/run.lock: {"pid", "host", "since"} of the trainer working in the folder. A lock whose pid is
    gone on this host is stale and taken over; a live one (or one of another host) refuses."""

    def __init__(self, run: RunDir):
        self.run, self.held = run, False

    def holder(self) -> Optional[dict]:
        try:
            h = json.loads(self.run.lock_file.read_text())
            return h if isinstance(h, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale

    @staticmethod
    def alive(h: dict) -> bool:
        pid, host = h.get("pid"), h.get("host")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if host != socket.gethostname():
            return True   # cannot tell from here
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def check(self) -> None:
        h = self.holder()
        if h and self.alive(h):
            raise RunLockedError(f"{self.run.path} is in use by another trainer (pid {h['pid']} on {h.get('host')}): "
                                 f"stop it first (if it is gone, delete {self.run.lock_file})")

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            fd = os.open(self.run.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self.check()
            log.warning("taking over the stale lock %s (%s)", self.run.lock_file, self.holder())
            atomic_write_json(self.run.lock_file, me)
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        self.held = True

    def release(self) -> None:
        if self.held and (self.holder() or {}).get("pid") == os.getpid():
            self.run.lock_file.unlink(missing_ok=True)
        self.held = False


# ------------------------------------------------------------------ the job wrapper
def check_folder(run: RunDir, resume: Optional[str], overwrite: bool, kind: str = "") -> Optional[Path]:
    """Read-only checks of the run folder before a job writes anything; with overwrite, the old run
    is moved aside (returns where). Raises RunFolderError."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: choose one")
    if run.path.exists() and not run.path.is_dir():
        raise RunFolderError(f"{run.path} is a file, not a folder: choose another --run-dir")
    RunLock(run).check()
    other = run.read_status().get("kind")
    if kind and other and other != kind and not overwrite:
        raise RunFolderError(f"{run.path} holds a {other} run (status.json), not a {kind} one: continue it with "
                             f"the tool that made it ({other}), or choose another --run-dir")
    if resume:
        resume_candidates(run, resume)
        return None
    foreign = run.foreign_entries()
    if not foreign:
        return None
    if not overwrite:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise RunFolderError(f"{run.path} holds another run ({shown}): continue it with --resume latest, "
                             "or start a new one there with --overwrite (the old run is moved aside)")
    return move_aside(run.path)


def _final_reason(e: BaseException) -> tuple[str, str]:
    """(state, error) for an exception that ends a job."""
    if isinstance(e, StopRequested):
        return "stopped", f"{e} outside the training loop (during setup or evaluation)"
    if isinstance(e, KeyboardInterrupt):
        return "stopped", "interrupted (a second stop signal): the last checkpoint may be older than the last step"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "failed", f"disk full: {e}; free some space, then continue with --resume latest"
    return "failed", f"{type(e).__name__}: {e}"


def _queued_here(run: RunDir, e: BaseException) -> bool:
    """A job that fails its checks in a fresh folder that the GUI queue has marked (queued/running)."""
    if isinstance(e, RunLockedError):
        return False
    try:
        return run.read_status().get("state") in LIVE_STATES and not run.foreign_entries()
    except OSError:
        return False


def _made_under(run: RunDir, found: list[Path], resume: str, name: str) -> Path:
    """The file `name` (config.toml, the data fingerprint) that the checkpoint to resume was made under: its
    copy in the checkpoint (the run's own config.toml may have been edited), else the run folder's."""
    own = found[0] / name
    if own.is_file():
        return own
    return run.path / name if resume in ("latest", "auto") else found[0].parent.parent / name


def _resume_changes(run: RunDir, resume: Optional[str], config, rules: Optional[dict]) -> list[str]:
    """The allowed config changes of a resume (lora_core.resume.resume_changes against the config saved with
    the checkpoint's run); [] without one to compare."""
    found = resume_candidates(run, resume) if resume and config is not None and rules is not None else []
    if not found:
        return []
    saved = _made_under(run, found, resume, "config.toml")
    if not saved.is_file() and resume not in ("latest", "auto"):
        return []   # a checkpoint folder kept on its own: nothing to compare with
    return resume_changes(saved, config, rules)


def _data_fingerprint(run: RunDir, resume: Optional[str], files: Optional[Callable[[], list[DataFile]]]
                      ) -> tuple[Optional[dict], str]:
    """(the fingerprint a fresh run records, a note for the log). A resume takes the data's fingerprint again
    and compares it with the one its checkpoint was made under: data that changed raises RunFolderError naming
    what changed (lora_core.fingerprint)."""
    if files is None:
        return None, ""
    found = resume_candidates(run, resume) if resume else []
    if not found:
        return fingerprint(files()), ""
    saved = read_fingerprint(_made_under(run, found, resume, FINGERPRINT_FILE))
    if saved is None:
        return None, "resume: the run records no data fingerprint (an earlier version made it): the training data " \
                     "cannot be compared with what it started on"
    changed = change_line(saved, fingerprint(files(), known=saved))
    if changed:
        raise RunFolderError(f"--resume would not continue this run exactly: its training data changed since it "
                             f"started: {changed}; put the data back as it was, or start a new run in another folder")
    return None, ""


def run_job(kind: str, run_dir, body: Callable[[RunDir, Any], dict], *, config=None, resume: Optional[str] = None,
            overwrite: bool = False, main: bool = True, barrier: Callable[[], None] = lambda: None,
            validate: Callable[[], Any] = lambda: None, resume_rules: Optional[dict] = None,
            data_files: Optional[Callable[[Any], list[DataFile]]] = None) -> dict:
    """The job wrapper of every trainer: validate (nothing written yet), check the folder (refuse another
    run's files, a live lock, a resume without a run; --overwrite moves the old run aside), then create
    it, lock it, save the resolved config, set up logging, mark it running (with `kind`), and run
    body(run, validated). Any exception ends the run in a final state with the reason; a stop signal
    outside the training loop ends it "stopped" (and returns the status). A resume of an existing run is
    held (RunDir.hold) until TrainLoop.resume has loaded its checkpoint: a refusal or failure before that
    (a checkpoint that does not fit the new config, a stop while loading) leaves the run folder
    byte-identical and raises. With `resume_rules` (lora_core.resume), a resume whose config changes a field that
    must not change is refused before anything is written; the allowed changes are logged. With `data_files`
    (the validated value -> the training data's files), a fresh run records the data's fingerprint
    (lora_core.fingerprint) and a resume whose data changed since is refused, before anything is written."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    lock = RunLock(run)
    started, aside, changed, data_note = False, None, [], ""
    with StopAtOnce():
        try:
            prepared = validate()
            if main:
                aside = check_folder(run, resume, overwrite, kind)
                changed = _resume_changes(run, resume, config, resume_rules)
                files = None if data_files is None else lambda: data_files(prepared)
                data_fp, data_note = _data_fingerprint(run, resume, files)
                if resume and run.foreign_entries():
                    run.hold()   # until the checkpoint has loaded, a refusal gives the run back as it was
                run.create()
                lock.acquire()
                started = True   # the folder is this job's now: any failure from here is recorded
                if config is not None:
                    save_config(run.config, config)
                if data_fp is not None:
                    atomic_write_json(run.fingerprint, data_fp)
                run.write_status("running", kind=kind, pid=os.getpid(), host=socket.gethostname(), error=None,
                                 finished=None, eval=None, started=time.time())
            barrier()
            setup_logging(run, main)
            if main and aside is not None:
                log.warning("--overwrite: the old run in %s was moved to %s", run.path, aside)
            if main and changed:
                log.info("resume: changed settings (allowed, they keep the run exact): %s", "; ".join(changed))
            if main and data_note:
                log.warning(data_note)
            return body(run, prepared)
        except BaseException as e:
            if main and run.held is not None:   # a resume that never started: nothing of it stays
                setup_logging(None, main)
                run.give_back()
                raise
            if main and not started and _queued_here(run, e):
                started = True   # a folder the GUI queued: its status gets the reason the job never started
            if main and started:
                state, reason = _final_reason(e)
                if run.read_status().get("state") not in FINAL_STATES or state == "stopped":
                    final = run.write_status(state, error=reason, finished=time.time())
                    log.error("run %s: %s", state, reason)
                    if isinstance(e, StopRequested):
                        return final
            raise
        finally:
            lock.release()


# ------------------------------------------------------------------ the training loop
class TrainLoop:
    """The protocol that drives a step engine: resume bookkeeping, when to read the loss (once per
    log_every steps, and before every checkpoint and sample), the NaN guard, metrics and ETA, samples,
    checkpoints (temp folder renamed into place, the last keep_checkpoints kept), SIGTERM stop, and
    the run's status. Only the main process writes files.

    export_fn(folder, step): the deliverable adapter file(s), written into every checkpoint and into
    the run folder at the end. sample_fn(step): validation every sample_every steps and at the end.
    finish_fn(step) -> dict: main process, after the export (evaluation); its fields join "done".
    val_fn(step) -> float: validation loss (main process) every val_every steps and at the end: a
    val_loss metrics line; the best step (best_val_step, best_val_loss) is kept in status.json and in
    each checkpoint's trainer_state.json (so a resumed run knows it)."""

    def __init__(self, run: RunDir, settings, engine, *, main: bool = True,
                 export_fn: Optional[Callable[[Path, int], None]] = None,
                 sample_fn: Optional[Callable[[int], None]] = None, status_fields: Optional[dict] = None,
                 finish_fn: Optional[Callable[[int], dict]] = None,
                 val_fn: Optional[Callable[[int], float]] = None):
        self.run, self.s, self.engine, self.main = run, settings, engine, main
        self.val_fn, self.best_val = val_fn, None   # best_val: [step, loss]
        self.export_fn, self.sample_fn, self.finish_fn = export_fn, sample_fn, finish_fn
        self.status_fields = status_fields or {}
        self.step = self.epoch = self.batch_in_epoch = 0
        self.last_ckpt: Optional[str] = None
        self.total, self.count, self.checked = None, 0, 0   # loss handles since the last metrics line
        self.flag: Optional[StopFlag] = None
        self.bar = None

    # -------------------------------------------------------------- status
    def _status(self, state: str, **fields) -> dict:
        if self.main:
            return self.run.write_status(state, **fields)
        return {"state": state, "step": self.step, **fields}

    def _live_state(self) -> str:
        return "stopping" if self.flag is not None and self.flag.stop else "running"

    # -------------------------------------------------------------- resume
    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """Load the newest loadable checkpoint; with "latest"/"auto", one that fails to load is passed
        over with a warning (and renamed corrupt_step_N once an older one has loaded)."""
        cands = resume_candidates(self.run, resume)
        failed: list[tuple[Path, BaseException]] = []
        for path in cands:
            try:
                state = json.loads((path / "trainer_state.json").read_text())
                self._check_state(path, state)
                self.engine.load(path, state)
            except Exception as e:   # a truncated file, bad JSON, a safetensors or pickle error, ...
                log.warning("checkpoint %s cannot be loaded (%s: %s); trying an older one", path, type(e).__name__, e)
                failed.append((path, e))
                continue
            for bad, _ in failed if self.main else []:
                bad.rename(bad.with_name(f"corrupt_{bad.name}"))
                log.warning("resumed from %s instead; the unreadable %s is now %s", path, bad, bad.with_name(
                    f"corrupt_{bad.name}").name)
            self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            self.best_val = state.get("best_val")
            self.last_ckpt = str(path)
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
            self.run.commit()
            dropped = self.run.drop_metrics_after(self.step) if self.main else 0
            if dropped:
                log.info("metrics.jsonl: %d line(s) past step %d dropped (those steps run again)", dropped, self.step)
            return path
        if failed:
            path, e = failed[0]
            why = " ".join(str(e).split())   # one line (a load error may span several)
            raise RunFolderError(f"cannot resume from {path}: {type(e).__name__}: {why[:400]}; the run folder is "
                                 "left as it was") from e
        self.run.commit()
        return None

    def _check_state(self, path: Path, state: dict) -> None:
        backend = state.get("backend", "torch")
        if backend != self.engine.backend:
            raise ValueError(f"{path}: not a {self.engine.backend} checkpoint (backend {backend!r}); "
                             "resume it with the backend that wrote it")
        for k in ("step", "epoch", "batch_in_epoch"):
            if not isinstance(state.get(k), int):
                raise ValueError(f"{path}/trainer_state.json: no integer {k!r}")
        if state.get("num_processes", 1) != self.engine.num_processes:
            log.warning("checkpoint was written by %s processes, resuming with %s: the data order will differ",
                        state.get("num_processes"), self.engine.num_processes)

    # -------------------------------------------------------------- the run
    def run_loop(self, resume: Optional[str] = None) -> dict:
        """Train to settings.max_steps; returns the final status. Raises NonFiniteLoss (the run marked failed)."""
        s = self.s
        ckpt = self.resume(resume)
        self.started, self.steps_here = time.time(), 0
        self._status("running", pid=os.getpid(), host=socket.gethostname(), step=self.step, max_steps=s.max_steps,
                     started=self.started, error=None, num_processes=self.engine.num_processes,
                     resumed_from=str(ckpt) if ckpt else None, backend=self.engine.backend, **self._best_fields(),
                     **self.status_fields)
        from tqdm.auto import tqdm   # lazy: tqdm.auto takes about 0.1 s to import; the GUI imports this module
        self.bar = tqdm(total=s.max_steps, initial=self.step, disable=not self.main, desc="train", dynamic_ncols=True)
        self.t_read, self.checked = time.time(), self.step
        try:
            with StopFlag() as self.flag:
                stopped = self._epochs()
        finally:
            self.bar.close()
        if stopped:
            return self._status("stopped", step=self.step, last_checkpoint=self.last_ckpt)
        self._validate()
        if self.sample_fn is not None and self.main:
            self.sample_fn(self.step)
        self.engine.barrier()
        extra = {}
        if self.main and self.export_fn is not None:
            self.export_fn(self.run.path, self.step)
        if self.main and self.finish_fn is not None:
            extra = self.finish_fn(self.step) or {}
        final = self._status("done", step=self.step, finished=time.time(), last_checkpoint=self.last_ckpt, **extra)
        self.engine.barrier()
        return final

    def _epochs(self) -> bool:
        """Run the epochs; True when stopped by a signal."""
        s = self.s
        while self.step < s.max_steps:
            fresh_epoch, any_step = self.batch_in_epoch == 0, False
            try:
                for loss, self.batch_in_epoch in self.engine.steps(self.epoch, self.batch_in_epoch, self.step):
                    any_step = True
                    self.step += 1
                    self.steps_here += 1
                    self.total = loss if self.total is None else self.total + loss
                    self.count += 1
                    self.bar.update(1)
                    if self._after_step():
                        return True
                    if self.step >= s.max_steps:
                        return False
            except NonFiniteLoss as e:
                self._non_finite(f"{e} at step {self.step + 1}")
            if fresh_epoch and not any_step:
                raise ValueError("the dataset yields no optimizer step (fewer examples than the batch size?)")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return False

    def _after_step(self) -> bool:
        """Reading, sampling, checkpointing and stopping after an optimizer step; True to stop."""
        s, step, multi = self.s, self.step, self.engine.num_processes > 1
        log_due = step % max(s.log_every, 1) == 0 or step == s.max_steps
        ckpt_due = bool(s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.max_steps
        sample_due = bool(self.sample_fn and s.sample_every and step % s.sample_every == 0 and step < s.max_steps)
        if self.val_fn and getattr(s, "val_every", 0) and step % s.val_every == 0 and step < s.max_steps:
            self._validate()
        stop = self.flag.stop and not multi   # one process: a plain flag; several: agreed on at a reading
        if log_due or ckpt_due or sample_due or stop:
            self._read(log_due or stop)
            if multi:
                stop = self.engine.any(self.flag.stop)
        if sample_due:
            if self.main:
                self.sample_fn(step)
            self.engine.barrier()
        if ckpt_due or stop:
            self.checkpoint()
        return stop

    def _read(self, log_line: bool) -> None:
        """The one device sync: the loss since the last reading. Non-finite -> the run fails (nothing
        has been checkpointed or exported since the last good reading)."""
        if self.count == 0:
            return
        mean = self.engine.read_loss(self.total) / self.count
        if not math.isfinite(mean):
            first = self.checked + 1
            where = f"at step {self.step}" if first == self.step else f"between steps {first} and {self.step}"
            self._non_finite(f"non-finite loss ({mean}) {where}")
        self.checked = self.step
        if not log_line:
            return
        now = time.time()
        rec = {"step": self.step, "epoch": self.epoch, "loss": mean, "lr": self.engine.lr(),
               "step_time": (now - self.t_read) / self.count, "time": now}
        self.total, self.count, self.t_read = None, 0, now
        self.bar.set_postfix(loss=f"{mean:.4f}")
        if self.main:
            self.run.append_metrics(rec)
            eta = (now - self.started) / self.steps_here * (self.s.max_steps - self.step)
            self._status(self._live_state(), step=self.step, eta_s=eta, loss=mean)
            log.info("step %d/%d loss %.4f lr %.3g (%.2fs/step)", self.step, self.s.max_steps, mean, rec["lr"],
                     rec["step_time"])

    def _best_fields(self) -> dict:
        if self.val_fn is None:
            return {}
        step, loss = self.best_val or (None, None)
        return {"best_val_step": step, "best_val_loss": loss}

    def _validate(self) -> None:
        """val_fn on the main process: a val_loss metrics line; a new best goes into status.json."""
        if self.val_fn is None:
            return
        if self.main:
            loss = float(self.val_fn(self.step))
            self.run.append_metrics({"step": self.step, "epoch": self.epoch, "val_loss": loss, "time": time.time()})
            log.info("step %d: validation loss %.5f", self.step, loss)
            if math.isfinite(loss) and (self.best_val is None or loss < self.best_val[1]):
                self.best_val = [self.step, loss]
            self._status(self._live_state(), val_loss=loss, **self._best_fields())
        self.engine.barrier()

    def _non_finite(self, what: str) -> None:
        msg = f"{what}; training stopped. Last good checkpoint: {self.last_ckpt or 'none'}"
        self._status("failed", error=msg, step=self.step, last_checkpoint=self.last_ckpt)
        raise NonFiniteLoss(msg) from None

    def checkpoint(self) -> Path:
        """checkpoints/step_N: the engine's payload + the export + trainer_state.json, written to a temp
        folder renamed into place; the last keep_checkpoints are kept."""
        run, e, step = self.run, self.engine, self.step
        final = run.checkpoints_dir / f"step_{step:08d}"
        tmp = run.checkpoints_dir / f".tmp_step_{step:08d}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        e.barrier()
        e.save(tmp)
        if self.main:
            if self.export_fn is not None:
                self.export_fn(tmp, step)
            for made_under in (run.config, run.fingerprint):   # what a resume of this checkpoint is compared with
                if made_under.is_file():
                    shutil.copyfile(made_under, tmp / made_under.name)
            atomic_write_json(tmp / "trainer_state.json", {
                "step": step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.s.seed,
                "backend": e.backend, "num_processes": e.num_processes, "best_val": self.best_val})
        e.barrier()
        if self.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            keep = self.s.keep_checkpoints
            for old in run.checkpoints()[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        e.barrier()
        self.last_ckpt = str(final)
        self._status(self._live_state(), last_checkpoint=self.last_ckpt)
        return final
