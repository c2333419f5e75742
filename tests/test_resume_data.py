"""Resume compares the training data's content, not only its path (lora_core.fingerprint): a run records the
fingerprint of what it trains on (SD: images, captions, masks, regularization images; LLM: the training split's
files), and `--resume` on data that changed since is refused in one line naming what changed, the run folder
byte-identical; data only touched or copied (same bytes) resumes."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from lora_core import fingerprint as fp_mod
from lora_core.fingerprint import FINGERPRINT_FILE, DataFile, change_line, fingerprint
from lora_llm import cli as llm_cli
from lora_sd import cli as sd_cli
from lora_sd.testing import make_images

FIX = Path(__file__).parent / "fixtures" / "llm"
MAIN = {"lora-sd": sd_cli.main, "lora-llm": llm_cli.main}


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(prog: str, argv, capsys) -> tuple[int, str]:
    """(exit code, the command's own error line or "")."""
    capsys.readouterr()
    rc = MAIN[prog]([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(prog + " ")]
    assert len(lines) <= 1, err
    return rc, lines[0] if lines else ""


def _touch(folder: Path) -> None:
    """A new mtime on every file, the bytes unchanged (a copy, a checkout)."""
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# ------------------------------------------------------------------ the fingerprint
def test_fingerprint_names_what_changed_and_reads_only_files_whose_stat_changed(tmp_path, monkeypatch):
    for name, data in (("a.png", b"image a"), ("a.txt", b"a cat"), ("b.png", b"image b")):
        (tmp_path / name).write_bytes(data)

    def files():
        return [DataFile("caption" if p.suffix == ".txt" else "image", p.name, p) for p in sorted(tmp_path.iterdir())]
    saved = fingerprint(files())
    assert saved["files"]["a.txt"]["sha256"] == hashlib.sha256(b"a cat").hexdigest()
    read = []
    monkeypatch.setattr(fp_mod, "file_digest", lambda p: read.append(p.name) or fp_mod.hashlib.sha256(
        p.read_bytes()).hexdigest())
    assert change_line(saved, fingerprint(files(), known=saved)) == "" and read == []   # untouched: not read
    _touch(tmp_path)
    assert change_line(saved, fingerprint(files(), known=saved)) == ""   # touched, same bytes: unchanged
    assert sorted(read) == ["a.png", "a.txt", "b.png"]
    (tmp_path / "a.txt").write_bytes(b"a dog")   # the same length
    (tmp_path / "b.png").unlink()
    (tmp_path / "c.png").write_bytes(b"image c")
    assert change_line(saved, fingerprint(files(), known=saved)) == \
        "1 caption changed, 1 image added, 1 image removed (a.txt, c.png, b.png)"
    many = fingerprint([DataFile("image", f"{i}.png", None) for i in range(9)])
    assert change_line({"files": {}}, many) == "9 images added (0.png, 1.png, 2.png, 3.png, 4.png, 5.png, ... " \
                                               "(3 more))"


# ------------------------------------------------------------------ lora-sd train --resume
@pytest.mark.slow
def test_an_sd_resume_on_changed_data_is_refused_and_on_touched_data_continues(tiny_sd_model, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    make_images(data, 2)
    sets = [x for s in (f'model.pretrained="{tiny_sd_model}"', f'data.path="{data}"', "data.resolution=32",
                        "data.bucket_step=16", f'data.cache_dir="{tmp_path / "cache"}"', "train.max_steps=2",
                        "train.batch_size=1", 'train.lr_scheduler="constant"') for x in ("--set", s)]
    (tmp_path / "job.toml").write_text(f'run_dir = "{run}"\n')
    assert _run("lora-sd", ["train", "--config", tmp_path / "job.toml", *sets], capsys)[0] == 0
    saved = json.loads((run / FINGERPRINT_FILE).read_text())["files"]
    assert sorted(saved) == ["img_0_0.png", "img_0_0.txt", "img_0_1.png", "img_0_1.txt"]
    assert (run / "checkpoints" / "step_00000002" / FINGERPRINT_FILE).read_bytes() == (run / FINGERPRINT_FILE).read_bytes()
    resume = ["train", "--config", run / "config.toml", "--resume", "latest"]
    before = _tree(run)
    caption = data / "img_0_0.txt"
    original = caption.read_bytes()
    caption.write_text("a photo of another thing")
    rc, line = _run("lora-sd", resume, capsys)
    assert rc == 2 and "training data changed since it started: 1 caption changed (img_0_0.txt)" in line, line
    assert _tree(run) == before
    caption.write_bytes(original)
    make_images(data, 1, seed=5)   # img_5_0.png and its caption
    rc, line = _run("lora-sd", resume, capsys)
    assert rc == 2 and "1 caption added, 1 image added (img_5_0.txt, img_5_0.png)" in line, line
    assert _tree(run) == before
    for p in data.glob("img_5_0.*"):
        p.unlink()
    _touch(data)
    rc, line = _run("lora-sd", [*resume, "--set", "train.max_steps=3"], capsys)
    assert rc == 0, line
    assert json.loads((run / "status.json").read_text())["step"] == 3


# ------------------------------------------------------------------ lora-llm train --resume
@pytest.mark.slow
def test_an_llm_resume_on_a_changed_training_file_is_refused_and_on_the_same_bytes_continues(tmp_path, capsys):
    data, run = tmp_path / "sst2", tmp_path / "run"
    shutil.copytree(FIX / "sst2", data)
    sets = [x for s in ('data.task="sst2"', f'data.data_dir="{data}"', "data.max_length=24", "data.max_train_examples=16",
                        "train.batch_size=4", "train.max_steps=2", "eval.enabled=false", "eval.prompts=[]",
                        'lora.target_modules=["q_proj", "v_proj"]') for x in ("--set", s)]
    (tmp_path / "job.toml").write_text(f'run_dir = "{run}"\n')
    assert _run("lora-llm", ["train", "--config", tmp_path / "job.toml", *sets], capsys)[0] == 0
    assert list(json.loads((run / FINGERPRINT_FILE).read_text())["files"]) == ["train.tsv"]
    resume = ["train", "--config", run / "config.toml", "--resume", "latest"]
    before = _tree(run)
    train = data / "train.tsv"
    original = train.read_bytes()
    train.write_bytes(original.replace(b"\t1\n", b"\t0\n", 1))   # one label flipped: the same size
    rc, line = _run("lora-llm", resume, capsys)
    assert rc == 2 and "training data changed since it started: 1 file changed (train.tsv)" in line, line
    assert _tree(run) == before
    train.write_bytes(original)   # the same bytes again (a new mtime)
    rc, line = _run("lora-llm", [*resume, "--set", "train.max_steps=3"], capsys)
    assert rc == 0, line
    assert json.loads((run / "status.json").read_text())["step"] == 3
