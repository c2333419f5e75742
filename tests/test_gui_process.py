"""The GUI process: it imports no torch / diffusers / transformers, it exits promptly on SIGTERM
(idle, and with a training job running), and CLI failures reach the page as the CLI's one line."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lora_core.run import RunDir
from lora_gui import clirun, job_kinds
from lora_gui.errors import CliError
from lora_gui.queue import JobQueue
from lora_gui.workspace import Workspace

from helpers import HEAVY, ROOT, run_python_json, sd_config

@pytest.mark.slow
def test_the_gui_process_imports_no_torch(tmp_path):
    """Import app, lora_gui and every lora_gui module, build the page, load every job kind's config
    class and list the saved configs: none of the heavy libraries is loaded."""
    code = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        import app, lora_gui
        mods = [m.name for m in pkgutil.walk_packages(lora_gui.__path__, "lora_gui.")]
        for m in mods:
            importlib.import_module(m)
        from lora_gui import job_kinds
        from lora_gui.controller import Controller
        from lora_gui.ui import build_app
        from lora_gui.workspace import Workspace
        ctrl = Controller(Workspace({str(tmp_path / 'ws')!r}))
        build_app(ctrl)
        for k in job_kinds.KINDS.values():
            k.config_class()
            ctrl.configs.choices(k.name)
        print(json.dumps({{"modules": mods, "heavy": [h for h in {HEAVY!r} if h in sys.modules]}}))
    """)
    res = run_python_json(code)
    assert {"lora_gui.ui", "lora_gui.tabs.train", "lora_gui.services.runs", "lora_gui.job_kinds"} <= set(res["modules"])
    assert res["heavy"] == []


def test_job_kinds_registry():
    assert sorted(job_kinds.KINDS) == ["eval-suite", "llm-train", "sd-train"]
    assert job_kinds.get("sd-train").config_class().__name__ == "SDTrainConfig"
    assert job_kinds.get("llm-train").config_class().__name__ == "LLMTrainConfig"
    assert job_kinds.get("eval-suite").config_class().__name__ == "SuiteConfig"
    assert (job_kinds.get("eval-suite").cli, job_kinds.get("eval-suite").command) == ("lora_llm.cli", "eval-suite")
    with pytest.raises(ValueError, match="unknown job kind"):
        job_kinds.get("llm-eval")


def test_run_kind_is_read_from_status_not_guessed(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    run = ws.runs / "r"
    run.mkdir()
    (run / "config.toml").write_text('[output]\nname = "x"\n')  # looks like an SD config: not used
    assert job_kinds.run_kind(run) is None
    RunDir(run).write_status("done", kind="llm-train")
    assert job_kinds.run_kind(run) == "llm-train"
    RunDir(run).write_status("done", kind="bogus")
    assert job_kinds.run_kind(run) is None


# ---------------------------------------------------------------- SIGTERM
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(ws: Path, port: int = 0):
    port = port or _free_port()
    log = open(ws.parent / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--workspace", str(ws), "--port", str(port)],
                            cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                     "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "app.py exited early"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, log
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("app.py did not answer within 120 s")


def _sigterm_and_time(proc) -> float:
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("app.py did not exit within 30 s of SIGTERM")
    return time.time() - t0


@pytest.mark.slow
def test_app_exits_promptly_on_sigterm(tmp_path):
    proc, log = _start_app(tmp_path / "ws")
    took = _sigterm_and_time(proc)
    log.seek(0)
    out = log.read()
    assert proc.returncode == 0 and took < 8, (took, out[-2000:])
    assert "stopping..." in out and "Traceback" not in out


@pytest.mark.slow
def test_app_exits_promptly_on_sigterm_with_a_job_running(tmp_path):
    """The running trainer gets SIGTERM too and ends `stopped` with a checkpoint; the app does not
    wait for more than a few seconds."""
    ws = Workspace(tmp_path / "ws").create()
    run = sd_config(ws, ws.runs / "long", 5000)
    JobQueue(ws.queue_file, ws.root).add("sd-train", run, launcher="python")
    proc, log = _start_app(ws.root)
    end = time.time() + 120
    while RunDir(run).read_status().get("step", 0) < 2 and time.time() < end:
        time.sleep(0.2)
    assert RunDir(run).read_status().get("state") == "running"
    took = _sigterm_and_time(proc)
    assert proc.returncode == 0 and took < 15, took
    end = time.time() + 60
    while RunDir(run).read_status().get("state") != "stopped" and time.time() < end:
        time.sleep(0.2)
    st = RunDir(run).read_status()
    assert st["state"] == "stopped" and 2 <= st["step"] < 5000 and RunDir(run).checkpoints() != []


def _cli_calls_of(ws: Path) -> list[str]:
    """pids of the CLI subprocesses writing into this workspace."""
    out = subprocess.run(["pgrep", "-f", f"lora_sd.cli generate .*{ws}"], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.slow
def test_app_exits_promptly_on_sigterm_during_a_generation(tmp_path):
    """A long `lora-sd generate` started from the page is stopped with the app, not left running."""
    from gradio_client import Client
    ws = tmp_path / "ws"
    port = _free_port()
    proc, log = _start_app(ws, port)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    rows = {"headers": ["adapter", "scale"], "data": []}
    job = client.submit("tiny-random", rows, [], "a long one", "", 0, 500, 7.5, 256, 256, "ddim", 16, api_name="/generate")
    end = time.time() + 120
    while not _cli_calls_of(ws) and time.time() < end and not job.done():
        time.sleep(0.2)
    assert _cli_calls_of(ws), "the generation did not start"
    took = _sigterm_and_time(proc)
    assert proc.returncode == 0 and took < 15, took
    time.sleep(0.5)
    assert _cli_calls_of(ws) == []


# ---------------------------------------------------------------- CLI errors as one line
def test_cli_failure_is_the_clis_one_line_message(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CliError) as e:
        clirun.run_cli("lora_sd.cli", ["convert", str(missing), str(tmp_path / "out.safetensors"), "--to", "kohya"],
                       tmp_path, timeout=300)
    msg = str(e.value)
    assert msg.startswith("lora-sd convert: error:") and "missing.safetensors" in msg
    assert "\n" not in msg and "Traceback" not in msg
    assert clirun.error_line("Traceback (most recent call last):\n  x\nValueError: bad\n\n", 1) == "ValueError: bad"
    assert clirun.error_line("", 3) == "exited with code 3 and no message"


def test_cli_calls_in_flight_are_stopped_on_exit(tmp_path):
    errors = []

    def call():
        try:
            clirun.run_cli("timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"], tmp_path, timeout=120)
        except CliError as e:
            errors.append(str(e))

    t = threading.Thread(target=call)
    t0 = time.time()
    t.start()
    while not any(p.poll() is None for p in list(clirun._running)) and time.time() - t0 < 10:
        time.sleep(0.05)
    assert clirun.terminate_all() == 1
    t.join(timeout=10)
    assert not t.is_alive() and time.time() - t0 < 15
    assert errors == ["exited with code -15 and no message"]


def test_form_choices_and_help_come_from_the_config_declarations():
    from lora_core.errors import ConfigError
    from lora_core.fields import field_specs
    from lora_gui.config_data import apply_form, default_config_dict, validate
    from lora_llm.config import LLMTrainConfig
    from lora_sd.config import SDTrainConfig
    for kind, cls, keys in (("sd-train", SDTrainConfig, ("train.lr_scheduler", "train.mixed_precision")),
                            ("llm-train", LLMTrainConfig, ("backend", "data.task")),
                            ("eval-suite", LLMTrainConfig, ("backend", "data.task"))):
        specs = {s.path: s for s in field_specs(cls)}
        fields = {f.key: f for f in job_kinds.get(kind).fields}
        for key in keys:
            assert fields[key].choices == specs[key].choices and len(fields[key].choices) >= 2, key
            assert specs[key].help and specs[key].help in fields[key].info, key
    lr = next(f for f in job_kinds.get("sd-train").fields if f.key == "train.lr_scheduler")
    assert "cosine_with_restarts" in lr.choices  # the trainers' whole list, not a GUI copy of part of it
    with pytest.raises(ConfigError, match="train.lr_scheduler must be one of"):   # the config's own check
        validate("sd-train", apply_form(default_config_dict("sd-train"), [lr], {"train.lr_scheduler": "exponential"}))


def test_guard_shows_file_errors_as_one_line(tmp_path):
    import gradio as gr
    from lora_gui.widgets import guard

    @guard
    def save():
        (tmp_path / "missing" / "x.toml").write_text("x")

    with pytest.warns(UserWarning, match="No such file or directory") as w:   # the toast, outside a page
        assert save() == gr.skip()   # the outputs keep what they showed
    assert str(w[0].message) == f"{tmp_path / 'missing' / 'x.toml'}: No such file or directory"
