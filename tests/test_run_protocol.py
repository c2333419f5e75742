"""The run protocol (lora_core.run): one writer of status.json, final states on every exit path
(errors, SIGTERM during model loading, a full disk), run-folder safety (refusing another run's
files, --overwrite, the lock, --resume latest), and no per-step device sync in the torch loop."""
import ast
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from lora_core import lora_state_dict
from lora_core.errors import ConfigError
from lora_core.configfile import save_config
from lora_core.run import RunDir, StopFlag, run_job
from lora_core.errors import RunFolderError
from lora_core.training import TrainSettings, train
from lora_core.errors import NonFiniteLoss

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures" / "llm"
LLM = ['data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "data.max_length=24", "data.max_train_examples=16",
       "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "eval.enabled=false", "eval.prompts=[]",
       'lora.target_modules=["q_proj", "v_proj"]']


def _llm_job(tmp_path, run_dir=None) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(f'run_dir = "{run_dir or tmp_path / "run"}"\n')
    return job


def _llm_cli(job, *args):
    from lora_llm.cli import main
    sets = [x for s in LLM for x in ("--set", s)]
    return main(["train", "--config", str(job), *sets, *args])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ the one writer
def _calls(pkg: str):
    for f in sorted((ROOT / pkg).rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            yield f.relative_to(ROOT).as_posix(), node


def test_status_json_has_one_writer():
    writers, literals = set(), set()
    for pkg in ("lora_core", "lora_sd", "lora_llm", "lora_gui"):
        for where, node in _calls(pkg):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write_status":
                writers.add(where)
            if isinstance(node, ast.Constant) and node.value == "status.json":
                literals.add(where)
            if isinstance(node, ast.Attribute) and node.attr == "status_file":
                literals.add(where)
    # the protocol writes every trainer's states; the GUI queue writes queued / stopping (and the
    # reason for a process that died without a final state) through the same method
    assert writers <= {"lora_core/run.py", "lora_gui/queue.py"}, writers
    assert "lora_core/run.py" in writers
    assert literals == {"lora_core/run.py"}, literals


def test_the_protocol_imports_no_torch():
    code = ("import sys, lora_core.run; "
            "print(sorted(m for m in ('torch', 'mindspore', 'numpy', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ------------------------------------------------------------------ final states
def test_llm_torch_model_load_error_marks_the_run_failed(tmp_path):
    from lora_llm.config import load_llm_config
    from lora_llm.train import train_from_config
    missing = tmp_path / "no-such-model"
    cfg = load_llm_config(None, [f'run_dir="{tmp_path / "run"}"', *LLM, f'model.pretrained="{missing}"'])
    with pytest.raises(Exception):
        train_from_config(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "no-such-model" in st["error"] and st["kind"] == "llm-train"
    assert not (tmp_path / "run" / "run.lock").exists()


def test_llm_mindspore_model_load_error_marks_the_run_failed(tmp_path):
    pytest.importorskip("mindspore")
    from lora_llm.config import load_llm_config
    from lora_llm.train import train_from_config
    missing = tmp_path / "no-such-model"
    cfg = load_llm_config(None, [f'run_dir="{tmp_path / "run"}"', *LLM, 'backend="mindspore"',
                                 'mindspore.mode="pynative"', f'model.pretrained="{missing}"'])
    with pytest.raises(Exception):
        train_from_config(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "no-such-model" in st["error"] and st["kind"] == "llm-train"


def test_sd_model_load_error_marks_the_run_failed(tmp_path):
    from lora_sd.config import load_train_config
    from lora_sd.testing import make_dataset
    from lora_sd.train import run_training
    data = make_dataset(tmp_path / "data")
    missing = tmp_path / "no-such-model"
    cfg = load_train_config(None, [f'run_dir="{tmp_path / "run"}"', f'data.path="{data}"', "data.resolution=32",
                                   f'model.pretrained="{missing}"', "train.max_steps=1"])
    with pytest.raises(Exception):
        run_training(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "no-such-model" in st["error"] and st["kind"] == "sd-train"


def test_sigterm_during_model_loading_leaves_a_final_state(tmp_path, monkeypatch):
    import lora_llm.train as T
    from lora_llm.config import load_llm_config
    real = T.load_model

    def slow_load(*a, **k):   # what the GUI's Stop button does while the model loads
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(T, "load_model", slow_load)
    cfg = load_llm_config(None, [f'run_dir="{tmp_path / "run"}"', *LLM])
    handler = signal.getsignal(signal.SIGTERM)
    st = T.train_from_config(cfg)
    assert st["state"] == "stopped" and "SIGTERM" in st["error"]
    assert RunDir(tmp_path / "run").read_status()["state"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) == handler   # the job's handler is gone again


@pytest.mark.slow
def test_sigterm_during_model_loading_in_a_real_process(tmp_path):
    """The CLI as the GUI starts it: SIGTERM while the process is still importing / loading."""
    job = _llm_job(tmp_path)
    code = ("import os, signal, sys, lora_llm.train as T\n"
            "real = T.load_model\n"
            "def load(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*a, **k)\n"
            "T.load_model = load\n"
            "from lora_llm.cli import main\n"
            f"sys.exit(main(sys.argv[1:]))\n")
    sets = [x for s in LLM for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, "train", "--config", str(job), *sets], env=env,
                       capture_output=True, text=True, timeout=300)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "stopped" and "SIGTERM" in st["error"], r.stderr[-2000:]


def test_disk_full_leaves_a_final_state(tmp_path, monkeypatch):
    """ENOSPC while writing a checkpoint, and the atomic status write failing too: status.json is
    rewritten in place and ends failed with the reason."""
    import lora_core.run as R
    import lora_core.training as TR
    from lora_llm.config import load_llm_config
    from lora_llm.train import train_from_config

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TR.TorchEngine, "save", full)
    real_write = R.atomic_write_json

    def status_write(path, obj):
        if Path(path).name == "status.json" and obj.get("state") == "failed":
            full()
        return real_write(path, obj)

    monkeypatch.setattr(R, "atomic_write_json", status_write)
    cfg = load_llm_config(None, [f'run_dir="{tmp_path / "run"}"', *LLM])
    with pytest.raises(OSError):
        train_from_config(cfg)
    st = RunDir(tmp_path / "run").read_status()
    assert st["state"] == "failed" and "disk full" in st["error"]


# ------------------------------------------------------------------ run-folder safety
def test_fresh_train_into_a_finished_run_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys):
    job = _llm_job(tmp_path)
    run = tmp_path / "run"
    assert _llm_cli(job) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert _llm_cli(job) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume latest" in err and "--overwrite" in err and str(run) in err
    assert _snapshot(run) == before   # nothing written: not config.toml, not status.json
    assert _llm_cli(job, "--set", "train.max_steps=3", "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _snapshot(aside[0]) == before
    st = RunDir(run).read_status()
    assert st["state"] == "done" and st["step"] == 3 and st["resumed_from"] is None


def test_a_folder_queued_by_the_gui_is_fresh(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_status("queued", job="abc", error=None)   # what the GUI queue writes
    (run.path / "console.log").write_text("")
    assert _llm_cli(_llm_job(tmp_path)) == 0
    st = run.read_status()
    assert st["state"] == "done" and st["kind"] == "llm-train" and st["job"] == "abc"


def test_the_config_file_is_written_once_per_run(tmp_path):
    """The GUI writes RUN/config.toml before the trainer starts; the trainer leaves an identical file alone
    (same inode: atomic writes replace the file) and writes a config that differs (e.g. --set)."""
    run = RunDir(tmp_path / "run").create()
    save_config(run.config, TrainSettings(max_steps=3))
    inode = run.config.stat().st_ino
    run_job("test", run, lambda r, _: {}, config=TrainSettings(max_steps=3))
    assert run.config.stat().st_ino == inode
    run_job("test", run, lambda r, _: {}, config=TrainSettings(max_steps=4), overwrite=True)
    assert "max_steps = 4" in run.config.read_text()


def test_lock_refuses_a_live_trainer_and_takes_over_a_stale_one(tmp_path, capsys):
    import socket
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.lock_file.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        before = _snapshot(run.path)
        assert _llm_cli(_llm_job(tmp_path)) == 2
        assert "in use by another trainer" in capsys.readouterr().err and _snapshot(run.path) == before
    finally:
        live.kill()
        live.wait()
    # the same pid, now dead: a stale lock, taken over
    assert _llm_cli(_llm_job(tmp_path)) == 0
    assert run.read_status()["state"] == "done" and not run.lock_file.exists()


def test_resume_latest_without_a_run_refuses(tmp_path, capsys):
    typo = tmp_path / "rnu"
    assert _llm_cli(_llm_job(tmp_path, typo), "--resume", "latest") == 2
    err = capsys.readouterr().err
    assert "no run to continue" in err and str(typo) in err and not typo.exists()
    typo.mkdir()
    assert _llm_cli(_llm_job(tmp_path, typo), "--resume", "latest") == 2
    assert "has no checkpoint" in capsys.readouterr().err and list(typo.iterdir()) == []


def test_run_dir_with_a_quote_and_a_backslash_is_kept(tmp_path):
    odd = tmp_path / 'my "run" \\ x'
    from lora_llm.cli import main
    job = _llm_job(tmp_path, tmp_path / "elsewhere")
    sets = [x for s in LLM for x in ("--set", s)]
    assert main(["train", "--config", str(job), "--run-dir", str(odd), *sets]) == 0
    assert RunDir(odd).read_status()["state"] == "done" and not (tmp_path / "elsewhere").exists()


def test_sd_run_dir_is_not_reparsed(tmp_path, monkeypatch):
    import lora_sd.train as ST
    from lora_sd.cli import main
    seen = {}
    monkeypatch.setattr(ST, "run_training", lambda cfg, **k: seen.setdefault("cfg", cfg) and {"state": "done"})
    job = tmp_path / "sd.toml"
    job.write_text('[data]\npath = "x"\n')
    odd = str(tmp_path / 'a "b" \\ c')
    assert main(["train", "--config", str(job), "--run-dir", odd]) == 0
    assert seen["cfg"].run_dir == odd


def test_output_name_must_be_a_plain_file_name():
    from lora_sd.config import load_train_config
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(ConfigError, match="output.name must be a plain file name"):
            load_train_config(None, ['data.path="x"', f'output.name="{bad}"'])
    assert load_train_config(None, ['data.path="x"', 'output.name="my_lora-v2"']).output.name == "my_lora-v2"


# ------------------------------------------------------------------ the torch loop
def _toy():
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lora_core import LoraConfig, add_lora
    from lora_core.training import EpochSampler
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=["0", "2"]))
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    ds = TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])
    return model, DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), seed=3))


def _train(tmp, resume=None, stop_at_call=None, nan_at_call=None, **settings):
    model, dl = _toy()
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        loss = ((m(x) - y) ** 2).mean()
        return loss * float("nan") if calls["n"] == nan_at_call else loss

    s = TrainSettings(**{"learning_rate": 5e-2, "keep_checkpoints": 5, **settings})
    run = RunDir(tmp).create()
    st = train(accelerator=Accelerator(cpu=True), run=run, model=model, dataloader=dl, loss_fn=loss_fn, settings=s,
               resume=resume)
    return model, run, st


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    _, run, _ = _train(tmp_path / "a", max_steps=3, checkpoint_every=1)
    newest = run.checkpoints()[-1]
    (newest / "trainable.safetensors").write_bytes(b"\x00garbage")
    full, _, _ = _train(tmp_path / "b", max_steps=5, checkpoint_every=1)
    with caplog.at_level("WARNING", logger="lora"):
        resumed, run, st = _train(tmp_path / "a", resume="latest", max_steps=5, checkpoint_every=1)
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000002")
    assert any("step_00000003" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert (run.checkpoints_dir / "corrupt_step_00000003").is_dir()   # kept, out of the rotation
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_corrupt_is_one_clear_error(tmp_path):
    _, run, _ = _train(tmp_path, max_steps=2)
    (run.checkpoints()[-1] / "trainer_state.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="cannot resume from .*step_00000002"):
        _train(tmp_path, resume="latest", max_steps=3)


def _count_syncs(monkeypatch) -> dict:
    """Count device syncs made by the loop itself (lora_core/run.py, lora_core/training.py)."""
    counts = {"n": 0}
    mine = (str(ROOT / "lora_core" / "run.py"), str(ROOT / "lora_core" / "training.py"))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            code = sys._getframe(1).f_code
            if code.co_filename in mine and code.co_name != "__iter__":   # not the CPU sampler's permutation
                counts["n"] += 1
            return real(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return counts


@pytest.mark.parametrize("log_every", [1, 4])
def test_no_per_step_device_sync(tmp_path, monkeypatch, log_every):
    counts = _count_syncs(monkeypatch)
    n = 16
    _, run, st = _train(tmp_path, max_steps=n, log_every=log_every)
    assert st["state"] == "done"
    assert n // log_every <= counts["n"] <= n // log_every + 1, counts   # one reading per log_every steps
    m = run.read_metrics()
    assert [r["step"] for r in m] == list(range(log_every, n + 1, log_every))


def test_resume_is_exact_with_sparse_readings(tmp_path):
    common = {"max_steps": 17, "log_every": 5, "lr_scheduler": "linear", "lr_warmup_steps": 2, "checkpoint_every": 3}
    full, _, _ = _train(tmp_path / "full", **common)
    _, run, st = _train(tmp_path / "part", stop_at_call=8, **common)
    assert st["state"] == "stopped" and st["step"] == 8   # one process: the stop flag is seen at once
    torch.manual_seed(1234)
    resumed, run, st = _train(tmp_path / "part", resume="latest", **common)
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000008")
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_reports_the_step_range_and_checkpoints_nothing_after(tmp_path):
    with pytest.raises(NonFiniteLoss, match="between steps 5 and 8"):
        _train(tmp_path, nan_at_call=6, max_steps=12, log_every=4, checkpoint_every=4)
    run = RunDir(tmp_path)
    st = run.read_status()
    assert st["state"] == "failed" and "step_00000004" in st["error"]
    assert [p.name for p in run.checkpoints()] == ["step_00000004"]


def test_sd_train_into_another_run_is_refused_before_anything_is_written(tmp_path, capsys):
    from lora_sd.cli import main
    from lora_sd.testing import make_dataset
    data = make_dataset(tmp_path / "data")
    run = RunDir(tmp_path / "run").create()
    run.write_status("done", kind="sd-train", step=3)
    run.append_metrics({"step": 3, "loss": 0.1})
    run.config.write_text("# the old run's config\n")
    before = _snapshot(run.path)
    job = tmp_path / "sd.toml"
    job.write_text(f'run_dir = "{run.path}"\n[data]\npath = "{data}"\nresolution = 32\n[train]\nmax_steps = 1\n')
    assert main(["train", "--config", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume latest" in err and "--overwrite" in err
    assert main(["train", "--config", str(job), "--resume", "latest", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert _snapshot(run.path) == before


# ------------------------------------------------------------------ files keep the user's umask
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_keep_the_umask(tmp_path, mask):
    from lora_core.files import atomic_write_json
    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        RunDir(tmp_path / "run").create().write_status("queued")
    finally:
        os.umask(old)
    for f in (tmp_path / "a.json", tmp_path / "run" / "status.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, oct(f.stat().st_mode)


def test_one_stop_forwarded_twice_is_one_stop_and_a_later_one_interrupts(monkeypatch):
    """`accelerate launch` (and a terminal's Ctrl-C) deliver one stop twice: the trainer must still save its
    checkpoint; only a second stop after StopFlag.SAME_STOP_S gives up at once."""
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)   # the launcher's forwarded copy
        assert flag.stop
        monkeypatch.setattr(StopFlag, "SAME_STOP_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
