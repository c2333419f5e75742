"""The shared training loop: loss goes down, stop+resume equals an uninterrupted run, NaN guard."""
import json
import os
import signal

import pytest
import torch
from accelerate import Accelerator

from lora_core import lora_state_dict
from lora_core.training import RunDir, TrainSettings, train
from lora_core.errors import NonFiniteLoss

from helpers import toy_loss, toy_setup


def _run(tmp, max_steps, resume=None, stop_at_call=None, accum=1, log_with=""):
    model, dl = toy_setup(tmp)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] == stop_at_call:  # what the GUI's Stop button does: SIGTERM to the process
            os.kill(os.getpid(), signal.SIGTERM)
        return toy_loss(m, batch)

    s = TrainSettings(max_steps=max_steps, learning_rate=5e-2, lr_scheduler="linear", lr_warmup_steps=2,
                      gradient_accumulation_steps=accum, checkpoint_every=3, keep_checkpoints=2, log_with=log_with)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    run = RunDir(tmp).create()
    train(accelerator=acc, run=run, model=model, dataloader=dl, loss_fn=loss_fn, settings=s, resume=resume)
    return model, run


def test_loss_decreases_and_run_folder(tmp_path):
    model, run = _run(tmp_path / "a", 30)
    m = run.read_metrics()
    assert len(m) == 30 and m[-1]["step"] == 30
    assert sum(r["loss"] for r in m[-5:]) < 0.5 * sum(r["loss"] for r in m[:5])
    st = run.read_status()
    assert st["state"] == "done" and st["step"] == 30
    assert [p.name for p in run.checkpoints()] == ["step_00000027", "step_00000030"]  # keep_checkpoints=2


@pytest.mark.slow
def test_log_with_tensorboard_mirrors_the_metrics(tmp_path):
    """train.log_with = "tensorboard": Accelerate's TensorBoard tracker writes RUN/tensorboard, whose scalars
    (read back with TensorBoard's own reader) are exactly metrics.jsonl's losses at their steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run = _run(tmp_path / "tb", 6, log_with="tensorboard")
    files = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    want = [(r["step"], r["loss"]) for r in run.read_metrics()]
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert "train/lr" in events.Tags()["scalars"] and not run.metric_sinks   # the tracker is closed


def test_log_with_a_missing_tracker_names_the_install(tmp_path, monkeypatch):
    from accelerate import tracking
    from lora_core.errors import MissingPackageError
    monkeypatch.setattr(tracking, "is_wandb_available", lambda: False)
    with pytest.raises(MissingPackageError, match="train.log_with = 'wandb' needs wandb, which is not installed: "
                                                  "pip install wandb"):
        _run(tmp_path / "wb", 2, log_with="wandb")


@pytest.mark.parametrize("accum", [1, 3])
def test_resume_equals_uninterrupted(tmp_path, accum):
    full, _ = _run(tmp_path / "full", 17, accum=accum)
    # interrupted: SIGTERM during step 8 -> checkpoint at 8 and state "stopped"; then resume to 17
    _, run = _run(tmp_path / "part", 17, stop_at_call=8 * accum, accum=accum)
    stopped = run.read_status()
    assert stopped["state"] == "stopped" and 5 <= stopped["step"] < 17
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    resumed, run = _run(tmp_path / "part", 17, resume="latest", accum=accum)
    assert run.read_status()["resumed_from"].endswith(f"step_{stopped['step']:08d}")
    assert run.read_status()["state"] == "done"
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    model, dl = toy_setup(tmp_path)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = toy_loss(m, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    run = RunDir(tmp_path).create()
    s = TrainSettings(max_steps=10, checkpoint_every=3)
    with pytest.raises(NonFiniteLoss, match="step 5"):
        train(accelerator=Accelerator(cpu=True), run=run, model=model, dataloader=dl, loss_fn=loss_fn, settings=s)
    st = json.loads((tmp_path / "status.json").read_text())
    assert st["state"] == "failed" and "step_00000003" in st["error"]
    assert [p.name for p in run.checkpoints()] == ["step_00000003"]
