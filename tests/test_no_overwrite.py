"""Nothing the user owns changes unless they asked, as a property over every command that writes files.

For each command (the CLIs in-process, the GUI services): run it once, snapshot the tree (paths + sha256),
run it again with the same arguments and with conflicting ones: refused (exit 2, one line naming the
output), the tree unchanged. With --overwrite it runs, and every file that was there is still there, at
its place or moved aside as NAME.old-<time> (lora_core.files.move_aside), never deleted. An output equal to
an input is refused even with --overwrite. A resume that is refused leaves the run folder byte-identical.
"""
import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from lora_core.errors import OutputExistsError
from lora_core.files import check_output, move_aside, room_for, same_path
from lora_llm import cli as llm_cli
from lora_sd import cli as sd_cli

MAIN = {"sd": (sd_cli.main, "lora-sd"), "llm": (llm_cli.main, "lora-llm")}
ASIDE = re.compile(r"\.old-\d{8}-\d{6}(-\d+)?")
ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures" / "llm"


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kept_or_aside(before: dict, after: dict) -> list[str]:
    """The files of `before` that are neither unchanged at their place nor, unchanged, under a moved-aside name."""
    aside = {ASIDE.sub("", p, count=1): h for p, h in after.items() if ASIDE.search(p)}
    return [p for p, h in before.items() if after.get(p) != h and aside.get(p) != h]


def run(which: str, argv, capsys) -> tuple[int, str]:
    main, prog = MAIN[which]
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, "\n".join(ln for ln in err.splitlines() if ln.startswith(prog + " "))


def refused(which, argv, capsys, root: Path, *needles) -> None:
    before = tree(root)
    rc, line = run(which, argv, capsys)
    assert rc == 2 and len(line.splitlines()) == 1, line
    for n in needles:
        assert str(n) in line, (n, line)
    assert tree(root) == before


# ------------------------------------------------------------------ the files a user owns
@pytest.fixture(scope="module")
def owned(tiny_sd_model, tmp_path_factory):
    """A model, a kohya adapter and a lora-llm run (read-only inputs of every case)."""
    import torch
    from lora_core import LoraConfig, add_lora, lora_layers
    from lora_core.io import save_lora
    from lora_llm.adapter_formats import ADAPTER_FILE
    from lora_llm.config import ModelSection
    from lora_llm.models import make_tiny_model
    from lora_sd import formats
    from lora_sd.config import CROSS_ATTN
    from lora_sd.models import load_pipeline
    root = tmp_path_factory.mktemp("owned")
    pipe = load_pipeline(tiny_sd_model)
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(r=2, alpha=2.0, target_modules=CROSS_ATTN))
    for _, layer in lora_layers(pipe.unet):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    formats.write_adapter(root / "style.safetensors", formats.from_model({"unet": pipe.unet}), formats.KOHYA)
    trained = load_pipeline("tiny")   # the shipped trained model (score refuses random weights)
    add_lora(trained.unet, LoraConfig(r=2, alpha=2.0, target_modules=CROSS_ATTN))
    formats.write_adapter(root / "tiny_style.safetensors", formats.from_model({"unet": trained.unet}), formats.KOHYA)
    lm, _ = make_tiny_model(root / "llm_model")
    add_lora(lm, LoraConfig(r=2, alpha=2.0, target_modules=["c_attn"]))
    (root / "llm_run").mkdir()
    info = {"task": "wikitext2", "num_labels": 0, "model": asdict(ModelSection(pretrained=str(root / "llm_model"))),
            "pretrained": str(root / "llm_model")}
    save_lora(root / "llm_run" / ADAPTER_FILE, lm, metadata={"llm_info": json.dumps(info)})
    return {"model": tiny_sd_model, "adapter": root / "style.safetensors", "llm_run": root / "llm_run",
            "tiny_adapter": root / "tiny_style.safetensors"}


GEN = ["--steps", "1", "--width", "16", "--height", "16"]
# name: (cli, argv with {out} = the case's folder, the argv's conflicting variant, the output)
CASES = {
    "convert": ("sd", ["convert", "{out}/style.safetensors", "{out}/x.safetensors", "--to", "diffusers"],
                ["--to", "kohya"], "x.safetensors"),
    "generate": ("sd", ["generate", "--model", "{model}", *GEN, "--prompt", "a", "--out", "{out}/gen"],
                 ["--seed", "1"], "gen"),
    "grid": ("sd", ["grid", "--x", "seed=0,1", "--prompt", "a", "--model", "{model}", *GEN, "--out", "{out}/grid"],
             ["--scale", "0.5"], "grid"),
    # score: the shipped trained model (a random-weight one is refused)
    "score": ("sd", ["score", "--model", "tiny", "--lora", "{out}/tiny_style.safetensors", "--scales", "0,1",
                     "--prompt", "a red circle", "--seeds", "1", "--steps", "1", "--size", "16",
                     "--save-images", "{out}/images"], ["--seed", "3"], "tiny_style.score.json"),
    "merge": ("sd", ["merge", "--model", "{model}", "--lora", "{out}/style.safetensors", "--out", "{out}/merged"],
              ["--lora", "{out}/style2.safetensors:0.5"], "merged"),
    "save-single-file": ("sd", ["save-single-file", "{model}", "{out}/single.safetensors"], ["--half"],
                         "single.safetensors"),
    "eval-suite": ("llm", ["eval-suite", "--config", ROOT / "configs" / "llm_suite_tiny.toml", "--out", "{out}/suite",
                           "--set", 'tasks=["sst2"]', "--set", "base.train.max_steps=1", "--set",
                           f'overrides.sst2=["data.data_dir=\'{FIX / "sst2"}\'", "data.train_split=\'train\'"]'],
                   ["--set", "base.train.seed=1"], "suite"),
    "llm-merge": ("llm", ["merge", "{llm_run}", "--out", "{out}/llm_merged"], [], "llm_merged"),   # no other options
    "llm-eval": ("llm", ["eval", "--adapter", "{llm_run}", "--out", "{out}/eval.json", "--set", 'data.task="wikitext2"',
                         "--set", f'data.data_dir="{FIX / "wikitext2"}"', "--set", 'data.eval_split="valid"',
                         "--set", "eval.max_eval_tokens=64", "--set", "eval.ppl_max_length=32",
                         "--set", "eval.ppl_stride=16", "--set", "eval.prompts=[]"],
                 ["--set", "eval.max_eval_tokens=48"], "eval.json"),
    "sd-tiny-model": ("sd", ["tiny-model", "{out}/tiny_sd"], ["--seed", "1"], "tiny_sd"),
    "llm-tiny-model": ("llm", ["tiny-model", "{out}/tiny_lm"], ["--seed", "1"], "tiny_lm"),
}
# the commands that write files and are not in CASES, and why (`sweep` takes no output: it writes a new
# sweep_<id> folder of fresh run folders each time)
NOT_IN_CASES = {
    ("sd", "train"): "a run folder: lora_core.run's rules (tests/test_run_protocol.py, test_resume_rules.py)",
    ("llm", "train"): "a run folder: as above",
    ("sd", "pretrain-tiny"): "an existing --out is refused (FileExistsError); a run takes an hour and a half",
    ("sd", "caption"): "writes captions beside a folder's images, no output path: tests/test_caption.py checks that a "
                       "captioned folder is refused unchanged and that --overwrite moves every old caption aside",
}


def _writers(which: str) -> set:
    """(cli, subcommand) of every subcommand that takes an output (--out, OUT_DIR, --run-dir) or --overwrite."""
    parser = {"sd": sd_cli, "llm": llm_cli}[which].build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {(which, name) for name, p in subs.choices.items()
            if {"out", "out_dir", "run_dir", "overwrite"} & {a.dest for a in p._actions}}


def test_every_command_that_writes_files_is_a_case():
    cases = {(which, argv[0]) for which, argv, _, _ in CASES.values()}
    missing = (_writers("sd") | _writers("llm")) - cases - set(NOT_IN_CASES)
    assert not missing, f"output-writing commands without a case in CASES: {sorted(missing)}"
    assert set(NOT_IN_CASES) <= _writers("sd") | _writers("llm")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_second_run_replaces_nothing_and_overwrite_moves_aside(name, owned, tmp_path, capsys):
    which, argv, conflicting, output = CASES[name]
    for name in ("style.safetensors", "style2.safetensors"):   # inputs inside the tree
        (tmp_path / name).write_bytes(owned["adapter"].read_bytes())
    (tmp_path / "tiny_style.safetensors").write_bytes(owned["tiny_adapter"].read_bytes())
    args = [str(a).format(out=tmp_path, model=owned["model"], llm_run=owned["llm_run"]) for a in argv]
    other = [str(a).format(out=tmp_path) for a in conflicting]
    rc, line = run(which, args, capsys)
    assert rc == 0, line
    first = tree(tmp_path)
    assert any(p.startswith(output) for p in first), first
    refused(which, args, capsys, tmp_path, output, "--overwrite")
    refused(which, args + other, capsys, tmp_path, output)
    rc, line = run(which, args + other + ["--overwrite"], capsys)
    assert rc == 0, line
    after = tree(tmp_path)
    assert kept_or_aside(first, after) == []
    assert after["style.safetensors"] == first["style.safetensors"]   # the input never moves
    assert any(ASIDE.search(p) for p in after) and after != first   # the old one aside, a new one in its place


@pytest.mark.parametrize("which,argv,needle", [
    ("sd", ["convert", "{a}", "{a}", "--to", "kohya", "--overwrite"], "style.safetensors"),
    ("sd", ["convert", "{a}", "{link}", "--to", "diffusers", "--overwrite"], "link.safetensors"),
    ("sd", ["convert", "{a}", "{hard}", "--to", "diffusers", "--overwrite"], "hard.safetensors"),
    ("sd", ["merge", "--model", "{model}", "--lora", "{a}", "--out", "{dir}", "--overwrite"], "the input"),
    ("sd", ["save-single-file", "{model}", "{model}", "--overwrite"], "the input"),
    ("sd", ["grid", "--x", "seed=0", "--adapter", "{dir}/grid.png", "--out", "{dir}", "--overwrite"], "the input"),
    ("llm", ["merge", "{llm_run}", "--out", "{llm_run}", "--overwrite"], "the input"),
], ids=["convert-same-path", "convert-symlink", "convert-hardlink", "merge-into-the-adapter-folder",
        "single-file-onto-the-model", "grid-over-its-adapter", "llm-merge-into-the-run"])
def test_an_output_equal_to_an_input_is_refused_even_with_overwrite(which, argv, needle, tiny_sd_model, tmp_path,
                                                                    capsys):
    """Refused before any input is read: any bytes stand for the adapter, any folder for the run."""
    a = tmp_path / "style.safetensors"
    a.write_bytes(b"the user's adapter")
    llm_run = tmp_path / "llm_run"
    llm_run.mkdir()
    (llm_run / "adapter.safetensors").write_bytes(b"the user's text adapter")
    (tmp_path / "link.safetensors").symlink_to(a)
    os.link(a, tmp_path / "hard.safetensors")
    (tmp_path / "grid.png").write_bytes(a.read_bytes())
    args = [x.format(a=a, link=tmp_path / "link.safetensors", hard=tmp_path / "hard.safetensors", dir=tmp_path,
                     model=tiny_sd_model, llm_run=llm_run) for x in argv]
    before = tree(Path(tiny_sd_model))
    refused(which, args, capsys, tmp_path, needle, "input")
    assert tree(Path(tiny_sd_model)) == before


def test_convert_refuses_to_replace_an_unrelated_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "style.safetensors").write_bytes(b"the user's adapter")
    refused("sd", ["convert", tmp_path / "style.safetensors", notes, "--to", "diffusers"], capsys, tmp_path, "notes.txt",
            "exists already")


def test_score_without_an_adapter_needs_out_not_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # beside the adapter otherwise: see the score case of the property test
    refused("sd", ["score", "--model", "tiny", "--prompt", "a"], capsys, tmp_path, "--out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the helper itself
def test_check_output_and_room_for(tmp_path):
    out = tmp_path / "o"
    assert check_output(out) == [] and check_output(tmp_path / "empty_dir") == []
    out.mkdir()
    assert check_output(out) == []               # an empty folder holds no earlier results
    (out / "grid.png").write_text("old")
    (out / "request.json").write_text("the GUI's")
    with pytest.raises(OutputExistsError, match="grid.png"):
        check_output(out, results=["grid.png", "cells"])
    found = check_output(out, results=["grid.png", "cells"], overwrite=True)
    assert found == [out / "grid.png"]
    with pytest.raises(RuntimeError):             # the writing fails: the old result comes back
        with room_for(found):
            raise RuntimeError("boom")
    assert (out / "grid.png").read_text() == "old" and len(list(out.iterdir())) == 2
    with room_for(found) as moved:
        (out / "grid.png").write_text("new")
    (old, aside), = moved
    assert old == out / "grid.png" and aside.read_text() == "old" and ASIDE.search(aside.name)
    assert (out / "request.json").read_text() == "the GUI's"
    second = move_aside(out / "grid.png")         # the same second: a numbered name, nothing replaced
    assert second != aside and second.read_text() == "new" and aside.read_text() == "old"


def test_same_path_sees_links(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    (tmp_path / "s").symlink_to(f)
    os.link(f, tmp_path / "h")
    assert same_path(f, tmp_path / "s") and same_path(f, tmp_path / "h") and same_path(f, tmp_path / "." / "f")
    assert not same_path(f, tmp_path / "nope") and not same_path(f, tmp_path)


# ------------------------------------------------------------------ the GUI services
def test_gui_saves_and_uploads_replace_nothing(tmp_path):
    from lora_gui.controller import Controller
    from lora_gui.errors import UserError
    from lora_gui.workspace import Workspace
    ctrl = Controller(Workspace(tmp_path / "ws"))
    vals = ctrl.configs.form_values("sd-train", ctrl.configs.default("sd-train"))
    assert ctrl.configs.save("sd-train", ctrl.configs.default("sd-train"), vals, "mine") == "saved configs/mine.toml"
    before = tree(ctrl.ws.root)
    with pytest.raises(UserError, match="mine.toml exists already"):
        ctrl.configs.save("sd-train", ctrl.configs.default("sd-train"), {**vals, "train.max_steps": 7}, "mine")
    assert tree(ctrl.ws.root) == before
    img = tmp_path / "a.png"
    img.write_bytes(b"first")
    assert ctrl.uploads.upload([str(img)], "cats") == "datasets/cats"
    before = tree(ctrl.ws.root)
    img.write_bytes(b"second")
    with pytest.raises(UserError, match="a.png"):
        ctrl.uploads.upload([str(img)], "cats")
    assert tree(ctrl.ws.root) == before


def test_a_refused_upload_leaves_nothing_behind(tmp_path, monkeypatch):
    """A file name the workspace refuses, or a copy that fails half-way: no dataset folder, no file of it."""
    from lora_gui.controller import Controller
    from lora_gui.services import uploads
    from lora_gui.workspace import Workspace
    ctrl = Controller(Workspace(tmp_path / "ws"))
    good, bad = tmp_path / "b.png", tmp_path / "my photo.png"
    good.write_bytes(b"an image")
    bad.write_bytes(b"another")
    before = tree(ctrl.ws.root)
    with pytest.raises(ValueError, match="my photo.png"):
        ctrl.uploads.upload([str(good), str(bad)], "dogs")
    assert tree(ctrl.ws.root) == before and not (ctrl.ws.datasets / "dogs").exists()
    real, calls = uploads.shutil.copyfile, []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(uploads.shutil, "copyfile", failing)
    (tmp_path / "c.png").write_bytes(b"a third")
    with pytest.raises(OSError, match="No space"):
        ctrl.uploads.upload([str(good), str(tmp_path / "c.png")], "dogs")
    assert tree(ctrl.ws.root) == before and not (ctrl.ws.datasets / "dogs").exists()


# ------------------------------------------------------------------ a refused resume leaves no trace
LLM = ['data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "data.max_length=24", "data.max_train_examples=16",
       "train.batch_size=4", "train.max_steps=2", "train.log_every=1", "eval.enabled=false", "eval.prompts=[]",
       'lora.target_modules=["q_proj", "v_proj"]']


def test_a_refused_resume_leaves_the_run_byte_identical(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(f'run_dir = "{tmp_path / "run"}"\n')
    sets = [x for s in LLM for x in ("--set", s)]
    rc, line = run("llm", ["train", "--config", job, *sets], capsys)
    assert rc == 0, line
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "done"
    refused("llm", ["train", "--config", job, *sets, "--resume", "latest", "--set", "lora.r=3"], capsys,
            tmp_path / "run", "would not continue this run exactly", "lora.r 8 -> 3")
    # a checkpoint that fails to load (after the model has loaded) is refused too, the folder given back
    weights = tmp_path / "run" / "checkpoints" / "step_00000002" / "trainable.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    refused("llm", ["train", "--config", job, *sets, "--resume", "latest"], capsys, tmp_path / "run",
            "cannot resume", "step_00000002")
    weights.write_bytes(good)
    # the run is still its own: resumed with its own config.toml (the GUI's Resume), it goes on
    rc, line = run("llm", ["train", "--config", tmp_path / "run" / "config.toml", "--resume", "latest",
                           "--set", "train.max_steps=3"], capsys)
    assert rc == 0, line
    assert json.loads((tmp_path / "run" / "status.json").read_text())["step"] == 3


@pytest.mark.slow
def test_gui_convert_and_merge_replace_nothing(owned, tmp_path):
    """The Adapters tab writes under outputs/: a taken name (the input's own included) is refused, the tree unchanged."""
    from lora_gui.controller import Controller
    from lora_gui.errors import UserError
    from lora_gui.workspace import Workspace
    ctrl = Controller(Workspace(tmp_path / "ws"))
    mine = ctrl.ws.outputs / "adapters" / "style.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(owned["adapter"].read_bytes())
    (ctrl.ws.outputs / "merged" / "m").mkdir(parents=True)
    (ctrl.ws.outputs / "merged" / "m" / "keep.txt").write_text("an earlier merge")
    before = tree(ctrl.ws.root)
    with pytest.raises(UserError, match="style.safetensors exists already"):
        ctrl.adapters.convert("outputs/adapters/style.safetensors", "diffusers", "style")   # onto its input
    with pytest.raises(UserError, match="merged/m exists already"):
        ctrl.adapters.merge("outputs/adapters/style.safetensors", "tiny", "m")
    assert tree(ctrl.ws.root) == before
