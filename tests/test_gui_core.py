"""GUI logic without a browser: path confinement, the persisted queue, process groups, run-folder polling.

Process management is tested with a fake trainer (a tiny script that writes a run folder the
way lora_core.training does and checkpoints on SIGTERM), so these tests need no model.
"""
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lora_core.training import RunDir
from lora_gui import jobs, runview
from lora_gui.jobs import Job
from lora_gui.queue import JobQueue, QueueError
from lora_gui.workspace import PathError, Workspace, check_name, confine

FAKE_TRAINER = textwrap.dedent('''
    """Fake `train --config C --run-dir R [--resume latest]`: 0.05 s per step, stops on SIGTERM."""
    import argparse, json, os, signal, sys, time, tomllib
    from pathlib import Path
    from lora_core.training import RunDir
    p = argparse.ArgumentParser(); p.add_argument("cmd"); p.add_argument("--config"); p.add_argument("--run-dir")
    p.add_argument("--resume"); p.add_argument("--out")
    a = p.parse_args()
    run = RunDir(a.run_dir or a.out).create()
    cfg = tomllib.loads(Path(a.config).read_text())
    max_steps = cfg["train"]["max_steps"]
    if cfg.get("fail"):
        print("Traceback: boom", flush=True); sys.exit(3)
    step = 0
    if a.resume == "latest" and run.latest_checkpoint():
        step = json.loads((run.latest_checkpoint() / "trainer_state.json").read_text())["step"]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    run.write_status("running", pid=os.getpid(), step=step, max_steps=max_steps, resumed_from=a.resume)
    def ckpt():
        d = run.checkpoints_dir / f"step_{step:08d}"; d.mkdir(parents=True, exist_ok=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    while step < max_steps:
        time.sleep(0.05); step += 1
        run.append_metrics({"step": step, "loss": 1.0 / step})
        run.write_status("running", step=step, eta_s=0.05 * (max_steps - step), loss=1.0 / step)
        if step % 5 == 0:
            (run.samples / f"step_{step:06d}_0.png").write_bytes(b"png")
        if stop:
            ckpt(); run.write_status("stopped", step=step); sys.exit(0)
    ckpt(); run.write_status("done", step=step)
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
    b = q.add("sd-train", ws.runs / "b")
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
    with pytest.raises(QueueError, match="already has a pending"):
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
    ev = jobs.build_command(Job(id="z", kind="llm-eval", run_dir="/w/e"))
    assert ev[-5:] == ["eval-suite", "--config", "/w/e/config.toml", "--out", "/w/e"]
    assert "lora_llm.cli train" in jobs.preview(Job(id="y", kind="llm-train", run_dir="/w/r"))


# ---------------------------------------------------------------- processes (fake trainer)
@pytest.fixture
def fake(tmp_path, monkeypatch):
    mod = tmp_path / "fakemods"
    mod.mkdir()
    (mod / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", str(mod))
    monkeypatch.setitem(jobs.KINDS, "sd-train", ("fake_trainer", "train"))
    monkeypatch.setitem(jobs.KINDS, "llm-eval", ("fake_trainer", "eval-suite"))
    return _queue(tmp_path)


def _config(run: Path, max_steps: int, **extra) -> Path:
    import tomli_w
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(tomli_w.dumps({"train": {"max_steps": max_steps}, **extra}))
    return run


def _wait(pred, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_queue_runs_jobs_one_after_another(fake):
    ws, q = fake
    a = q.add("sd-train", _config(ws.runs / "a", 6), launcher="python")
    b = q.add("sd-train", _config(ws.runs / "b", 4), launcher="python")
    running = q.tick()
    assert running.id == a.id and q.get(b.id).state == "pending"
    assert q.tick().id == a.id  # still the same one while it runs
    assert _wait(lambda: (q.tick() or a).id == b.id)  # a ended, b started by the next tick
    assert q.get(a.id).state == "done"
    assert _wait(lambda: q.tick() is None)
    assert q.get(b.id).state == "done"
    snap = runview.snapshot(ws.runs / "b")
    assert snap.state == "done" and snap.step == 4 and snap.steps == [1, 2, 3, 4]
    assert snap.samples == []  # 4 steps: no sample yet
    snap_a = runview.snapshot(ws.runs / "a")
    assert runview.gallery_items(snap_a) == [(str(ws.runs / "a" / "samples" / "step_000005_0.png"), "step_000005_0")]
    assert q.clear_finished() == 2 and q.jobs() == []


def test_stop_sends_sigterm_to_the_group_and_resume_continues(fake):
    ws, q = fake
    run = _config(ws.runs / "r", 400)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    assert _wait(lambda: runview.snapshot(run).step >= 3)
    msg = q.stop(job.id)
    assert "stopping" in msg
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "stopped"
    snap = runview.snapshot(run)
    assert snap.state == "stopped" and 3 <= snap.step < 400
    assert not jobs.group_alive(q.get(job.id).pgid)
    # resume = a new job on the same run folder with --resume latest
    stopped_at = snap.step
    q.clear_finished()
    again = q.add("sd-train", run, resume=True, launcher="python")
    assert "--resume" in jobs.build_command(again)
    q.tick()
    assert _wait(lambda: runview.snapshot(run).step > stopped_at + 2)
    st = RunDir(run).read_status()
    assert st["resumed_from"] == "latest"
    q.stop(again.id)
    assert _wait(lambda: q.tick() is None)
    steps = runview.snapshot(run).steps
    assert steps[stopped_at] == stopped_at + 1  # the resumed run went on from the checkpoint's step


def test_stop_during_startup_is_stopped_not_failed(fake):
    ws, q = fake
    run = _config(ws.runs / "early", 400)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    q.stop(job.id)  # before the trainer has imported anything: the default SIGTERM action kills it
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "stopped"
    assert "while starting" in RunDir(run).read_status()["error"]


def test_crashed_trainer_is_marked_failed_with_its_log(fake):
    ws, q = fake
    run = _config(ws.runs / "bad", 5, fail=True)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "failed"
    snap = runview.snapshot(run)
    assert snap.state == "failed" and "exited (code 3)" in snap.error
    assert "Traceback: boom" in snap.log_tail
    assert 'data-state="failed"' in runview.progress_html(snap)


def test_non_train_job_gets_status_from_exit_code(fake):
    ws, q = fake
    out = _config(ws.outputs / "eval1", 2)
    job = q.add("llm-eval", out, launcher="python")
    assert RunDir(out).read_status()["state"] == "queued"
    q.tick()
    assert _wait(lambda: q.tick() is None)
    assert q.get(job.id).state == "done"
    assert RunDir(out).read_status()["state"] == "done"


def test_restarted_app_picks_up_a_running_job(fake):
    """A second JobQueue (the app restarted) sees the running job through its process group."""
    ws, q = fake
    run = _config(ws.runs / "long", 400)
    job = q.add("sd-train", run, launcher="python")
    q.tick()
    other = JobQueue(ws.queue_file, ws.root)
    assert other.tick().id == job.id
    assert _wait(lambda: runview.snapshot(run).step >= 1)
    other.stop(job.id)
    assert _wait(lambda: q.tick() is None)  # the first reaps the process it started
    assert _wait(lambda: other.tick() is None)
    assert other.get(job.id).state == "stopped"


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
    fig = runview.loss_figure(snap)
    xs = fig.axes[0].lines[0].get_xdata()
    assert list(xs) == list(range(1, 13))
    assert runview.loss_figure(runview.snapshot(tmp_path / "empty")) is None
    assert runview.format_eta(3725) == "1:02:05" and runview.format_eta(None) == "--"
