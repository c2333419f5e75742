"""GUI logic without a browser: path confinement, the persisted queue, process groups, run-folder polling.

The queue, stop and resume tests drive the REAL trainer (`python -m lora_sd.cli train`) on the tiny
random-weight SD model and the workspace's 8-image demo dataset at 32 px (about 40 steps/s on a CPU).
Only a job that dies without writing a final status, and a one-shot job whose status comes from its
exit code, use a stand-in script (FAKE_JOB): the real CLIs always write one.
"""
import dataclasses
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_core.run import RunDir
from lora_gui import job_kinds, jobs, runview
from lora_gui.errors import PathError, QueueError
from lora_gui.jobs import Job
from lora_gui.queue import JobQueue
from lora_gui.services.plots import loss_figure
from lora_gui.workspace import Workspace, check_name, confine

from helpers import sd_config

FAKE_JOB = textwrap.dedent('''
    """A stand-in job: `CMD --config C (--run-dir R | --out R)`; prints a line and exits with config `exit`."""
    import argparse, sys, tomllib
    from pathlib import Path
    p = argparse.ArgumentParser(); p.add_argument("cmd"); p.add_argument("--config"); p.add_argument("--run-dir")
    p.add_argument("--out")
    a = p.parse_args()
    cfg = tomllib.loads(Path(a.config).read_text())
    print("Traceback: boom" if cfg.get("exit") else "ok", flush=True)
    sys.exit(cfg.get("exit", 0))
''')


# ---------------------------------------------------------------- path confinement
def test_confine_accepts_paths_inside(tmp_path):
    root = tmp_path / "ws"
    (root / "runs" / "a").mkdir(parents=True)
    assert confine(root, "runs/a") == (root / "runs" / "a").resolve()
    assert confine(root, str(root / "runs" / "a")) == (root / "runs" / "a").resolve()
    assert confine(root, "new/file.toml") == (root / "new" / "file.toml").resolve()  # need not exist
    assert confine(root, ".") == root.resolve()


@pytest.mark.parametrize("bad", ["../x", "runs/../../etc", "a/../b", "/etc/passwd", "", "   ", "a\x00b"])
def test_confine_refuses_escapes(tmp_path, bad):
    root = tmp_path / "ws"
    root.mkdir()
    with pytest.raises(PathError):
        confine(root, bad)


def test_confine_refuses_symlink_out_and_sibling_prefix(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "f.txt").write_text("x")
    (root / "link").symlink_to(outside)
    with pytest.raises(PathError, match="symlink"):
        confine(root, "link/f.txt")
    with pytest.raises(PathError, match="outside"):
        confine(root, str(tmp_path / "ws2" / "x"))  # shares the prefix "ws"
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner")  # a link that stays inside is fine
    assert confine(root, "ok") == (root / "inner").resolve()
    with pytest.raises(PathError, match="does not exist"):
        confine(root, "missing", must_exist=True)


def test_check_name():
    assert check_name("run-1.b_2") == "run-1.b_2"
    for bad in ["", "a/b", "..", ".hidden", "a b", "x" * 65]:
        with pytest.raises(PathError):
            check_name(bad)


def test_workspace_new_run_dir_is_fresh(tmp_path):
    ws = Workspace(tmp_path).create()
    a = ws.new_run_dir("demo")
    a.mkdir()
    assert ws.new_run_dir("demo").name == "demo-2"
    with pytest.raises(PathError):
        ws.new_run_dir("../evil")


# ---------------------------------------------------------------- queue file
def _queue(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    return ws, JobQueue(ws.queue_file, ws.root)


def test_queue_persists_orders_and_removes(tmp_path):
    ws, q = _queue(tmp_path)
    a = q.add("sd-train", ws.runs / "a")
    q.add("sd-train", ws.runs / "b")
    c = q.add("llm-train", ws.runs / "c", launcher="python")
    assert RunDir(ws.runs / "a").read_status()["state"] == "queued"
    q.move(c.id, -2)
    assert [j.label for j in q.jobs()] == ["c", "a", "b"]
    q.move(c.id, +1)
    assert [j.label for j in q.jobs()] == ["a", "c", "b"]
    q.remove(a.id)
    # a second queue object on the same file (another app process, a restart) sees the same
    again = JobQueue(ws.queue_file, ws.root)
    assert [j.label for j in again.jobs()] == ["c", "b"]
    assert json.loads(ws.queue_file.read_text())["jobs"][0]["kind"] == "llm-train"
    assert RunDir(ws.runs / "a").read_status()["state"] == "stopped"
    with pytest.raises(QueueError, match="already has a queued"):
        q.add("sd-train", ws.runs / "b")
    with pytest.raises(ValueError, match="unknown job kind"):
        q.add("rm-rf", ws.runs / "d")
    with pytest.raises(QueueError):
        q.move("nope", 1)


def test_commands_preview(tmp_path):
    job = Job(id="x", kind="sd-train", run_dir=str(tmp_path / "r"), resume=True)
    cmd = jobs.build_command(job)
    assert cmd[1:2] == ["launch"] or "accelerate" in cmd[0]
    i = cmd.index("-m")
    assert cmd[i:] == ["-m", "lora_sd.cli", "train", "--config", str(tmp_path / "r" / "config.toml"),
                       "--run-dir", str(tmp_path / "r"), "--resume", "latest"]
    plain = jobs.build_command(Job(id="y", kind="llm-train", run_dir="/w/r", launcher="python"))
    assert plain == [sys.executable, "-m", "lora_llm.cli", "train", "--config", "/w/r/config.toml", "--run-dir", "/w/r"]
    ev = jobs.build_command(Job(id="z", kind="eval-suite", run_dir="/w/e"))
    assert ev[-5:] == ["eval-suite", "--config", "/w/e/config.toml", "--out", "/w/e"]
    assert "lora_llm.cli train" in jobs.preview(Job(id="y", kind="llm-train", run_dir="/w/r"))


# ---------------------------------------------------------------- processes (the real trainer)
@pytest.fixture
def real(tmp_path):
    return _queue(tmp_path)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """sd-train and eval-suite jobs run the stand-in FAKE_JOB instead of the CLIs."""
    mod = tmp_path / "fakemods"
    mod.mkdir()
    (mod / "fake_job.py").write_text(FAKE_JOB)
    monkeypatch.setenv("PYTHONPATH", str(mod))
    for name in ("sd-train", "eval-suite"):
        monkeypatch.setitem(job_kinds.KINDS, name, dataclasses.replace(job_kinds.KINDS[name], cli="fake_job"))
    return _queue(tmp_path)


def _config(run: Path, **extra) -> Path:
    import tomli_w
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(tomli_w.dumps({"train": {"max_steps": 5}, **extra}))
    return run


def _wait(pred, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_queue_runs_jobs_one_after_another(real):
    ws, q = real
    a = q.add("sd-train", sd_config(ws, ws.runs / "a", 6, prompts=["a red circle"], sample_every=5), launcher="python")
    b = q.add("sd-train", sd_config(ws, ws.runs / "b", 4), launcher="python")
    assert RunDir(ws.runs / "a").read_status()["kind"] == "sd-train"
    running = q.tick()
    assert running.id == a.id and q.get(b.id).state == "queued"
    assert q.tick().id == a.id  # still the same one while it runs
    assert _wait(lambda: (q.tick() or a).id == b.id)  # a ended, b started by the next tick
    assert q.get(a.id).state == "done"
    assert _wait(lambda: q.tick() is None)
    assert q.get(b.id).state == "done"
    snap = runview.snapshot(ws.runs / "b")
    assert snap.state == "done" and snap.step == 4 and snap.steps == [1, 2, 3, 4]
    assert snap.samples == []  # no validation prompts: no sample
    snap_a = runview.snapshot(ws.runs / "a")
    samples = ws.runs / "a" / "samples"  # every sample_every steps, and at the end
    assert sorted(p.name for p in snap_a.samples) == ["step_000005_0.png", "step_000006_0.png"]
    assert runview.gallery_items(snap_a) == [(str(samples / "step_000006_0.png"), "step 6 · a red circle")]
    assert runview.gallery_items(snap_a, step=5) == [(str(samples / "step_000005_0.png"), "step 5 · a red circle")]
    assert RunDir(ws.runs / "b").read_status()["kind"] == "sd-train"  # the trainer keeps the queue's kind
    assert q.clear_finished() == 2 and q.jobs() == []


@pytest.mark.slow
def test_stop_sends_sigterm_to_the_group_and_resume_continues(real):
    ws, q = real
    run = sd_config(ws, ws.runs / "r", 5000)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    assert _wait(lambda: runview.snapshot(run).step >= 3)
    msg = q.stop(job.id)
    assert "stopping" in msg
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "stopped"
    snap = runview.snapshot(run)
    assert snap.state == "stopped" and 3 <= snap.step < 5000
    assert not jobs.group_alive(q.get(job.id).pgid)
    # resume = a new job on the same run folder with --resume latest
    stopped_at = snap.step
    q.clear_finished()
    again = q.add("sd-train", run, resume=True, launcher="python")
    assert "--resume" in jobs.build_command(again)
    q.tick()
    assert _wait(lambda: runview.snapshot(run).step > stopped_at + 2)
    st = RunDir(run).read_status()
    assert st["resumed_from"] == str(RunDir(run).checkpoints_dir / f"step_{stopped_at:08d}")
    q.stop(again.id)
    assert _wait(lambda: q.tick() is None)
    steps = runview.snapshot(run).steps
    assert steps[stopped_at] == stopped_at + 1  # the resumed run went on from the checkpoint's step


def test_stop_during_startup_is_stopped_not_failed(real):
    ws, q = real
    run = sd_config(ws, ws.runs / "early", 5000)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    q.stop(job.id)  # before the trainer has imported anything: the default SIGTERM action kills it
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "stopped"
    assert "while starting" in RunDir(run).read_status()["error"]


def test_crashed_trainer_is_marked_failed_with_its_log(fake):
    """A job that dies without writing a final status (killed, crashed in C, ...) is marked failed
    with its last output line."""
    ws, q = fake
    run = _config(ws.runs / "bad", exit=3)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "failed"
    snap = runview.snapshot(run)
    assert snap.state == "failed" and "exited (code 3)" in snap.error
    assert "Traceback: boom" in snap.log_tail
    assert snap.error.startswith("Traceback: boom [the job exited (code 3); see bad/console.log]")
    assert 'data-state="failed"' in runview.progress_html(snap)


@pytest.mark.slow
def test_failing_real_trainer_shows_its_one_line_error(real):
    """A bad dataset: the run ends failed with the trainer's one-line message, not a traceback."""
    ws, q = real
    empty = ws.datasets / "empty"
    empty.mkdir()
    run = sd_config(ws, ws.runs / "nodata", 5, data=empty)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "failed"
    error = RunDir(run).read_status()["error"]
    assert str(empty) in error and "\n" not in error and "Traceback" not in error
    assert error.split(" [")[0] in runview.progress_html(runview.snapshot(run))


def test_non_train_job_gets_status_from_exit_code(fake):
    ws, q = fake
    out = _config(ws.outputs / "eval1")
    job = q.add("eval-suite", out, launcher="python")
    assert RunDir(out).read_status()["state"] == "queued"
    assert RunDir(out).read_status()["kind"] == "eval-suite"
    q.tick()
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "done"
    assert RunDir(out).read_status()["state"] == "done"


@pytest.mark.slow
def test_restarted_app_picks_up_a_running_job(real):
    """A second JobQueue (the app restarted) sees the running job through its process group."""
    ws, q = real
    run = sd_config(ws, ws.runs / "long", 5000)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    other = JobQueue(ws.queue_file, ws.root)
    assert other.tick().id == job.id
    assert _wait(lambda: runview.snapshot(run).step >= 1)
    other.stop(job.id)
    assert _wait(lambda: q.tick() is None)  # the first reaps the process it started
    assert _wait(lambda: other.tick() is None)
    assert other.get(job.id).state == "stopped"


def test_a_job_state_is_a_run_state():
    for state in ("paused", "pending"):
        with pytest.raises(ValueError, match="unknown state"):
            Job(id="y", kind="sd-train", run_dir="/r", state=state)


# ---------------------------------------------------------------- run view
def test_tail_collapses_carriage_returns(tmp_path):
    f = tmp_path / "log"
    f.write_text("a\nprogress 1\rprogress 2\rprogress 3\nlast\n")
    assert runview.tail(f) == "a\nprogress 3\nlast"
    f.write_text("x" * 100 + "\n" + "\n".join(f"line {i}" for i in range(100)))
    assert runview.tail(f, max_lines=3) == "line 97\nline 98\nline 99"
    assert runview.tail(tmp_path / "missing") == ""


def test_progress_and_plot(tmp_path):
    run = RunDir(tmp_path / "r").create()
    run.write_status("running", step=5, max_steps=20, eta_s=75, loss=0.5)
    for s in range(1, 13):
        run.append_metrics({"step": s, "loss": 1.0 / s})
    with open(run.metrics, "a") as f:
        f.write('{"step": 13, "lo')  # a line being written: skipped
    snap = runview.snapshot(run.path)
    assert snap.fraction == 0.25 and len(snap.steps) == 12
    html = runview.progress_html(snap)
    assert "step <span class=\"run-step\">5</span> / 20" in html and "ETA 1:15" in html and "width:25.0%" in html
    fig = loss_figure(snap)
    xs = fig.axes[0].lines[0].get_xdata()
    assert list(xs) == list(range(1, 13))
    assert loss_figure(runview.snapshot(tmp_path / "empty")) is None
    assert runview.format_eta(3725) == "1:02:05" and runview.format_eta(None) == "--"


def test_validation_loss_is_plotted_beside_the_training_loss(tmp_path):
    run = RunDir(tmp_path / "r").create()
    for s in range(1, 7):
        run.append_metrics({"step": s, "loss": 1.0 / s})
        if s % 2 == 0:   # the run protocol's validation lines (train.val_every = 2)
            run.append_metrics({"step": s, "val_loss": {2: 0.9, 4: 0.7, 6: 0.8}[s]})
    run.write_status("done", step=6, max_steps=6, best_val_step=4, best_val_loss=0.7)
    snap = runview.snapshot(run.path)
    assert snap.steps == [1, 2, 3, 4, 5, 6] and snap.val_steps == [2, 4, 6] and snap.val_losses == [0.9, 0.7, 0.8]
    lines = {ln.get_label(): ln for ln in loss_figure(snap).axes[0].lines}
    assert list(lines["validation loss"].get_xdata()) == [2, 4, 6]
    assert list(lines["validation loss"].get_ydata()) == [0.9, 0.7, 0.8]
    assert list(lines["best (step 4)"].get_xdata()) == [4] and list(lines["best (step 4)"].get_ydata()) == [0.7]


def test_a_stale_slider_step_shows_the_nearest_images_instead_of_failing(tmp_path):
    """A poll narrows the step slider to a resumed run's steps while the browser still sends the old step (seen in
    CI as gradio's 'Value 9 is greater than maximum value 1'): the event takes raw values and the step is read as
    the newest at or below it, else the first."""
    import inspect
    from lora_gui import widgets
    assert "preprocess=False" in inspect.getsource(widgets).split("self.step.change(", 1)[1].split("\n\n", 1)[0]
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    for n in (3, 5):
        (samples / f"step_{n:06d}_0.png").write_bytes(b"")
    snap = runview.RunSnapshot(path=tmp_path / "run", samples=sorted(samples.iterdir()))
    assert [c for _, c in runview.gallery_items(snap, 9)] == ["step 5 · prompt 0"]
    assert [c for _, c in runview.gallery_items(snap, 1)] == ["step 3 · prompt 0"]
