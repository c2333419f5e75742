"""CLI calls from the GUI (inspect, convert, merge, check, check-dataset, eval, generate; a grid in the
background): every model operation runs in a `python -m lora_sd.cli ...` / `lora_llm.cli` subprocess,
never in the GUI process. A failure becomes the CLI's own one-line message (its last stderr line)."""
from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from . import jobs
from .errors import CliError


_running: set[subprocess.Popen] = set()  # CLI calls in flight (stopped when the app exits)
_lock = threading.Lock()


def error_line(stderr: str, returncode: int) -> str:
    """The one-line message of a failed CLI call: its last non-empty stderr line."""
    lines = [ln.strip() for ln in (stderr or "").replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else f"exited with code {returncode} and no message"


def run_cli(module: str, args: list[str], cwd: Path, timeout: float = 600) -> str:
    """Run `python -m module args...`; returns its stdout, raises CliError with the CLI's last
    stderr line on a non-zero exit (its message, not a traceback of the GUI's)."""
    return run_cli_rc(module, args, cwd, timeout, ok=(0,))[1]


def run_cli_rc(module: str, args: list[str], cwd: Path, timeout: float = 600, ok=(0, 1)) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a CLI whose exit codes `ok` are answers (check, inspect --base:
    1 = "blocked" / "does not fit", with the report on stdout); any other raises CliError."""
    cmd = [jobs.python_executable(), "-m", module, *args]
    with subprocess.Popen(cmd, cwd=str(cwd), env=jobs.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True) as p:
        with _lock:
            _running.add(p)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise CliError(f"{module.split('.')[0]} {args[0]} took longer than {timeout:.0f} s and was stopped") from None
        finally:
            with _lock:
                _running.discard(p)
    if p.returncode not in ok:
        raise CliError(error_line(stderr, p.returncode))
    return p.returncode, stdout, stderr


def start_cli(module: str, args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `python -m module args...` in the background (a grid), output to `log`; stopped with the
    other CLI calls when the app exits."""
    with open(log, "ab") as out:
        p = subprocess.Popen([jobs.python_executable(), "-m", module, *args], cwd=str(cwd), env=jobs.child_env(),
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    with _lock:
        for old in [q for q in _running if q.poll() is not None]:
            _running.discard(old)
        _running.add(p)
    return p


def terminate_all() -> int:
    """SIGTERM every CLI call in flight (the app is exiting); returns how many there were."""
    with _lock:
        _running.difference_update([p for p in _running if p.poll() is not None])   # finished background calls
        procs = list(_running)
    for p in procs:
        p.terminate()
    return len(procs)


def run_cli_json(module: str, args: list[str], cwd: Path, timeout: float = 600) -> dict:
    return parse_json(run_cli(module, args, cwd, timeout), f"{module} {args[0]}")


def parse_json(out: str, what: str) -> dict:
    """The JSON object a CLI printed (the last one, after any log lines)."""
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        # a CLI that logs before its JSON: take the last JSON object in the output
        start = out.rfind("\n{")
        try:
            return json.loads(out[start + 1:] if start >= 0 else out)
        except json.JSONDecodeError:
            raise CliError(f"{what}: no JSON in its output") from None
