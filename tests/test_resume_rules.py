"""Resume is exact or refused (lora_core.resume): every config field of every trainer has a resume rule; a
resume that changes a field that must match (or that changes the result) is refused in one line naming each
field with its old and new value, the run folder untouched; allowed changes are logged. After a kill and a
resume metrics.jsonl holds each step once. A stop signal stops a sweep: the running run ends stopped with its
checkpoint, the runs not started stay queued, and the sweep exits 1."""
import argparse
import dataclasses
import hashlib
import os
import signal
from pathlib import Path

import pytest
from accelerate import Accelerator

from lora_core.configfile import save_config
from lora_core.errors import RunFolderError
from lora_core.resume import FREE, LORA_RESUME, SHARED, resume_changes, unclassified
from lora_core.run import RunDir, run_job, why_not_resumable
from lora_core.sweep import cli_sweep
from lora_core.training import TrainSettings, train
from lora_gui.controller import Controller
from lora_gui.errors import UserError
from lora_gui.workspace import Workspace
from lora_llm import cli as llm_cli
from lora_llm.config import LLMTrainConfig, load_llm_config
from lora_llm.resume_rules import LLM_RESUME
from lora_sd.config import SDTrainConfig
from lora_sd.resume_rules import SD_RESUME
from helpers import toy_loss, toy_setup

FIX = Path(__file__).parent / "fixtures" / "llm"
TABLES = [(SDTrainConfig, SD_RESUME, "SD_RESUME in lora_sd/resume_rules.py"),
          (LLMTrainConfig, LLM_RESUME, "LLM_RESUME in lora_llm/resume_rules.py")]


# ------------------------------------------------------------------ the table
@pytest.mark.parametrize("cls,rules,where", TABLES, ids=["sd", "llm"])
def test_every_config_field_has_a_resume_rule(cls, rules, where):
    missing = unclassified(cls, rules, where)
    assert not missing, "a config field without a resume rule (lora_core.resume: FREE, MATCH or RESULT):\n" + \
        "\n".join(missing)


def test_a_new_field_without_a_rule_is_named_with_where_to_add_it(monkeypatch):
    @dataclasses.dataclass
    class Grown(LLMTrainConfig):
        new_knob: int = 0
    missing = unclassified(Grown, {**LLM_RESUME, "gone": FREE}, "LLM_RESUME in lora_llm/resume_rules.py")
    assert missing == ["gone: a rule for a field that does not exist (remove it from LLM_RESUME in "
                       "lora_llm/resume_rules.py)",
                       "new_knob: no resume rule; add 'new_knob': FREE, MATCH or RESULT (lora_core.resume) to "
                       "LLM_RESUME in lora_llm/resume_rules.py"]
    eval_rules = {k: v for k, v in LLM_RESUME["eval"].items() if k != "seed"}
    assert unclassified(LLMTrainConfig, {**LLM_RESUME, "eval": eval_rules}, "LLM_RESUME in X") == [
        "eval.seed: no resume rule; add 'seed': FREE, MATCH or RESULT (lora_core.resume) to LLM_RESUME in X['eval']"]
    lora_rules = {k: v for k, v in LORA_RESUME.items() if k != "r"}
    monkeypatch.setitem(SHARED, id(lora_rules), "LORA_RESUME in lora_core/resume.py")   # as if it were the shared one
    assert unclassified(LLMTrainConfig, {**LLM_RESUME, "lora": lora_rules}, "X") == [
        "lora.r: no resume rule; add 'r': FREE, MATCH or RESULT (lora_core.resume) to LORA_RESUME in lora_core/resume.py"]


def _saved(tmp_path, cfg) -> Path:
    save_config(tmp_path / "config.toml", cfg)
    return tmp_path / "config.toml"


def test_resume_changes_allows_what_keeps_the_run_exact_and_names_every_other_change(tmp_path):
    old = load_llm_config(None, ["train.max_steps=10"])
    saved = _saved(tmp_path, old)
    new = load_llm_config(None, ["train.max_steps=20", "train.log_every=5", "eval.batch_size=2", 'run_dir="elsewhere"'])
    assert sorted(resume_changes(saved, new, LLM_RESUME)) == ["eval.batch_size 16 -> 2", "run_dir 'runs/llm' -> "
                                                            "'elsewhere'", "train.log_every 1 -> 5",
                                                            "train.max_steps 10 -> 20"]
    bad = load_llm_config(None, ['data.task="cola"', "lora.r=4", "train.seed=1", "train.max_steps=10"])
    with pytest.raises(RunFolderError) as e:
        resume_changes(saved, bad, LLM_RESUME)
    line = str(e.value)
    assert "\n" not in line and str(saved) in line
    for part in ("data.task 'sst2' -> 'cola' (must match", "lora.r 8 -> 4 (must match", "train.seed 42 -> 1 (changes "
                 "the result"):
        assert part in line, (part, line)
    # a schedule that spans the run's steps: more steps change every learning rate from the checkpoint on
    cosine = load_llm_config(None, ['train.lr_scheduler="cosine"', "train.max_steps=10"])
    saved = _saved(tmp_path, cosine)
    with pytest.raises(RunFolderError, match=r"train.max_steps 10 -> 20 \(changes the result"):
        resume_changes(saved, load_llm_config(None, ['train.lr_scheduler="cosine"', "train.max_steps=20"]), LLM_RESUME)


def test_an_added_or_removed_optional_table_must_match(tmp_path):
    sd = ['data.path="x"']
    saved = _saved(tmp_path, SDTrainConfig(**{"data": load_sd(sd).data}))
    with pytest.raises(RunFolderError, match=r"text_encoder_lora \(none\) -> \{.*must match"):
        resume_changes(saved, load_sd([*sd, "text_encoder_lora.r=2"]), SD_RESUME)


def load_sd(overrides):
    from lora_sd.config import load_train_config
    return load_train_config(None, overrides)


# ------------------------------------------------------------------ through the CLI
LLM = ['data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "data.max_length=24", "data.max_train_examples=16",
       "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "eval.enabled=false", "eval.prompts=[]",
       'lora.target_modules=["q_proj", "v_proj"]']


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _llm(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = llm_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


@pytest.mark.slow
def test_an_llm_run_resumed_on_another_task_is_refused_and_more_steps_are_allowed(tmp_path, capsys):
    job, run = tmp_path / "job.toml", tmp_path / "run"
    job.write_text(f'run_dir = "{run}"\n')
    sets = [x for s in LLM for x in ("--set", s)]
    assert _llm(["train", "--config", job, *sets], capsys)[0] == 0
    before = _tree(run)
    rc, err = _llm(["train", "--config", job, *sets, "--resume", "latest", "--set", 'data.task="cola"',
                    "--set", "train.learning_rate=0.01"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("lora-llm ")]
    assert rc == 2 and len(lines) == 1, err
    assert "data.task 'sst2' -> 'cola'" in lines[0] and "train.learning_rate 0.0001 -> 0.01" in lines[0]
    assert _tree(run) == before
    # the run's own config.toml edited (the GUI's Resume passes it): compared with the checkpoint's copy
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('task = "sst2"', 'task = "cola"'))
    before = _tree(run)
    rc, err = _llm(["train", "--config", run / "config.toml", "--resume", "latest"], capsys)
    assert rc == 2 and "data.task 'sst2' -> 'cola'" in err and _tree(run) == before
    (run / "config.toml").write_text((run / "config.toml").read_text().replace('task = "cola"', 'task = "sst2"'))
    rc, err = _llm(["train", "--config", job, *sets, "--resume", "latest", "--set", "train.max_steps=3",
                    "--set", "train.checkpoint_every=1"], capsys)
    assert rc == 0, err
    log = (run / "train.log").read_text()
    assert "resume: changed settings (allowed" in log and "train.max_steps 2 -> 3" in log
    assert [m["step"] for m in RunDir(run).read_metrics() if "loss" in m] == [1, 2, 3]


# ------------------------------------------------------------------ metrics after a kill
class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the loop runs after it (no final state, no checkpoint)."""


def _toy_run(folder, max_steps, kill_at_call=None, resume=None, sigterm_at_call=None):
    model, dl = toy_setup(folder)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] == kill_at_call:
            raise Killed()
        if calls["n"] == sigterm_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return toy_loss(m, batch)

    s = TrainSettings(max_steps=max_steps, learning_rate=5e-2, checkpoint_every=3, log_every=1)
    return train(accelerator=Accelerator(cpu=True), run=RunDir(folder).create(), model=model, dataloader=dl,
                 loss_fn=loss_fn, settings=s, resume=resume)


def test_metrics_hold_each_step_once_after_a_kill_and_a_resume(tmp_path):
    with pytest.raises(Killed):
        _toy_run(tmp_path, 8, kill_at_call=6)   # killed at step 6: checkpoint at 3, metrics of 1..5 written
    run = RunDir(tmp_path)
    assert [m["step"] for m in run.read_metrics()] == [1, 2, 3, 4, 5]
    with open(run.metrics, "a") as f:
        f.write('{"step": 6, "lo')   # a line cut short by the kill
    st = _toy_run(tmp_path, 8, resume="latest")
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000003")
    steps = [m["step"] for m in run.read_metrics()]
    assert steps == list(range(1, 9)), steps
    assert len(run.metrics.read_text().splitlines()) == 8


# ------------------------------------------------------------------ SIGTERM to a sweep
def _sweep_train(stop_in_run: str):
    """A sweep's train(cfg): the shared loop on the toy net inside run_job (a stop signal in run `stop_in_run`)."""
    def run(cfg) -> dict:
        stop = 4 if Path(cfg.run_dir).name.startswith(stop_in_run) else None
        return run_job("llm-train", cfg.run_dir, lambda r, _: _toy_run(r.path, 8, sigterm_at_call=stop),
                       config=cfg)
    return run


def _sweep(tmp_path, capsys, train_fn, on_signal_between=False):
    base = tmp_path / "base.toml"
    base.write_text(f'run_dir = "{tmp_path}"\n')
    a = argparse.Namespace(config=str(base), vary=["lora.r=2,4,8"], set=[], dry_run=False, json=True)
    if on_signal_between:   # the signal arrives after the first run has finished, before the second starts
        real = train_fn

        def train_fn(cfg):
            st = real(cfg)
            os.kill(os.getpid(), signal.SIGTERM)
            return st
    capsys.readouterr()
    rc = cli_sweep(a, LLMTrainConfig, load_llm_config, train_fn)
    err = capsys.readouterr().err
    runs = sorted(p for p in next(tmp_path.glob("sweep_*")).iterdir() if p.is_dir())
    return rc, err, [RunDir(p) for p in runs]


def test_sigterm_stops_the_sweep_and_the_running_run_keeps_its_checkpoint(tmp_path, capsys):
    rc, err, runs = _sweep(tmp_path, capsys, _sweep_train(stop_in_run="1_"))
    assert rc == 1 and "sweep stopped: 1 run(s) not started" in err
    assert [r.read_status()["state"] for r in runs] == ["done", "stopped", "queued"]
    assert runs[1].checkpoints()[-1].name == "step_00000004" and runs[1].read_status()["step"] == 4
    assert not runs[2].checkpoints()


def test_sigterm_between_two_runs_starts_no_further_run(tmp_path, capsys):
    rc, err, runs = _sweep(tmp_path, capsys, _sweep_train(stop_in_run="none"), on_signal_between=True)
    assert rc == 1 and "2 run(s) not started" in err
    assert [r.read_status()["state"] for r in runs] == ["done", "queued", "queued"]


# ------------------------------------------------------------------ Resume only when there is something to resume
def test_resume_is_offered_only_when_there_is_something_to_resume(tmp_path):
    assert "no checkpoint" in why_not_resumable(tmp_path / "never")
    st = run_job("llm-train", tmp_path / "a", lambda r, _: _toy_run(r.path, 8, sigterm_at_call=2))
    assert st["state"] == "stopped" and why_not_resumable(tmp_path / "a") is None
    _toy_run(tmp_path / "a", 8, resume="latest")
    assert why_not_resumable(tmp_path / "a") == "it has finished all its steps"
    RunDir(tmp_path / "b").create().write_status("stopped", error="stopped while starting")
    assert "no checkpoint" in why_not_resumable(tmp_path / "b")
    RunDir(tmp_path / "b").write_status("running")
    assert why_not_resumable(tmp_path / "b") == "it is running"


def test_the_gui_does_not_queue_a_resume_with_nothing_to_resume(tmp_path):
    ctrl = Controller(Workspace(tmp_path / "ws"))
    RunDir(ctrl.ws.runs / "early").create().write_status("stopped", kind="sd-train", error="stopped while starting")
    with pytest.raises(UserError, match="early: nothing to resume: it has no checkpoint"):
        ctrl.runs.resume("early", "python")
    assert ctrl.queue.jobs() == []
