"""One Stop never loses the checkpoint: the GUI queue starts the real trainer under its default launcher
(`accelerate launch`, lora_gui.jobs) and stops it, again and again, at different steps, with the GUI's Stop
(SIGTERM to the process group, which accelerate also forwards to the trainer) and with a Ctrl-C in a terminal
(SIGINT to the group). Every try must end `stopped` with a checkpoint at the step it stopped at."""
import os
import re
import signal
import time

import pytest

from helpers import sd_config
from lora_core.run import RunDir, why_not_resumable
from lora_gui import jobs, runview
from lora_gui.queue import JobQueue
from lora_gui.workspace import Workspace

TRIES = [("stop", 1), ("ctrl-c", 2), ("stop", 3), ("ctrl-c", 1)]   # a stop lost half the checkpoints before


def _wait(pred, timeout=180.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_one_stop_under_accelerate_launch_always_ends_stopped_with_a_checkpoint(tmp_path):
    ws = Workspace(tmp_path / "ws").create()
    q = JobQueue(ws.queue_file, ws.root)
    for n, (how, at_step) in enumerate(TRIES):
        run = sd_config(ws, ws.runs / f"r{n}", 5000)
        job = q.add("sd-train", run, launcher="accelerate")
        assert jobs.build_command(job)[1:2] == ["launch"] or "accelerate" in jobs.build_command(job)[0]
        q.tick()
        assert _wait(lambda: runview.snapshot(run).step >= at_step), (n, RunDir(run).read_status())
        if how == "stop":
            q.stop(job.id)
        else:
            os.killpg(q.get(job.id).pgid, signal.SIGINT)
        assert _wait(lambda: q.tick() is None), n
        st = RunDir(run).read_status()
        ckpts = RunDir(run).checkpoints()
        assert q.get(job.id).state == "stopped" and st["state"] == "stopped", (n, how, st)
        assert ckpts and ckpts[-1].name == f"step_{st['step']:08d}" and st["step"] >= at_step, (n, how, st)
        assert "interrupted" not in (st.get("error") or ""), (n, how, st)
        assert why_not_resumable(run) is None
        q.clear_finished()
    # a refused resume under the same launcher: the run shows the trainer's own line, not accelerate's traceback
    cfg = (run / "config.toml").read_text()
    (run / "config.toml").write_text(re.sub(r"(?m)^r = 2$", "r = 4", cfg, count=1))
    again = q.add("sd-train", run, resume=True, launcher="accelerate")
    q.tick()
    assert _wait(lambda: q.tick() is None)
    st = RunDir(run).read_status()
    assert q.get(again.id).state == "failed" and st["error"].startswith("lora-sd train: error: --resume would not "
                                                                        "continue this run exactly: lora.r 2 -> 4"), st


def test_a_failed_job_shows_the_trainers_own_line_not_the_launchers_traceback(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("step 3/5000 loss 0.1\nlora-sd train: error: --resume would not continue this run exactly: "
                       "lora.r 2 -> 4\nTraceback (most recent call last):\n  File \"accelerate\", line 1\n"
                       "subprocess.CalledProcessError: Command '[...]' returned non-zero exit status 2.\n")
    assert runview.last_line(console).startswith("lora-sd train: error: --resume would not continue")
    console.write_text("Killed\n")
    assert runview.last_line(console) == "Killed"
