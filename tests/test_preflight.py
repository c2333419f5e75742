"""Preflight (`lora-sd check`, `lora-llm check`): each listed conflict is flagged, a broken data set is
audited, the two real steps catch an injected NaN, and the memory estimate is within 25 % of the measured
peak on the tiny SD model (bench/preflight_memory.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_core.preflight import PreflightReport, print_report, run_steps
from lora_core.run import RunDir
from lora_llm.config import load_llm_config
from lora_llm.preflight import conflicts as llm_conflicts
from lora_sd.preflight import audit, conflicts, preflight
from lora_sd.testing import make_images, train_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **sections):
    data = tmp_path / "data"
    if not data.exists():
        make_images(data, 4)
    return train_config(tmp_path / "run", "tiny-random", data, tmp_path / "cache", **sections)


def _keys(rep, level):
    return {f.key for f in rep.findings if f.level == level}


def test_conflicts_are_flagged(tmp_path):
    rep = PreflightReport("sd-train", "x")
    conflicts(_cfg(tmp_path, text_encoder_lora={"r": 2}, data={"center_crop": False, "cache_latents": True},
                   train={"mixed_precision": "fp16", "lr_warmup_steps": 10, "max_steps": 5}), "cpu", rep)
    assert {"data.cache_text", "data.center_crop", "train.lr_warmup_steps"} <= _keys(rep, "warning")
    assert _keys(rep, "error") == {"train.mixed_precision"} and not rep.ok
    fp16 = next(f for f in rep.findings if f.key == "train.mixed_precision")
    assert "needs a GPU" in fp16.message and "bf16" in fp16.message
    clean = PreflightReport("sd-train", "x")
    conflicts(_cfg(tmp_path, train={"lr_warmup_steps": 0}), "cpu", clean)
    assert clean.ok and not clean.findings


def test_broken_data_set_is_audited(tmp_path):
    data = tmp_path / "broken"
    make_images(data, 3, size=(40, 32))
    (data / "img_0_1.txt").unlink()                       # a missing caption
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")   # an unreadable file
    Image.new("RGB", (16, 16)).save(data / "small.png")   # too small for 32 px
    (data / "small.txt").write_text("tiny")
    rep = PreflightReport("sd-train", "x")
    items = audit(train_config(tmp_path / "run", "tiny-random", data, tmp_path / "cache", data={"buckets": True}), rep)
    d = rep.data
    assert (d["images"], d["captioned"], d["missing_captions"], d["unreadable"], d["too_small"]) == (4, 3, 1, 1, 1)
    assert sum(d["buckets"].values()) == 3 == len(items) and set(d["buckets"]) <= {"32x32", "40x24", "48x16",
                                                                                  "32x24", "40x32", "24x32"}
    assert _keys(rep, "error") == {"data.path"} and "no caption" in rep.errors[0].message
    assert any("unreadable" in f.message for f in rep.findings) and any("smaller" in f.message for f in rep.findings)


def test_two_steps_pass_and_catch_an_injected_nan(tmp_path, tiny_pipeline):
    rep = preflight(cfg=_cfg(tmp_path), device="cpu", pipe=tiny_pipeline())
    assert rep.ok and rep.steps["ok"] and len(rep.steps["losses"]) == 2, print_report(rep)
    assert rep.parameters["trainable"] == 20480 and rep.parameters["scale"] == 0.25   # r=8 (the default), alpha=2
    assert rep.memory["total_bytes"] > rep.memory["parts"]["frozen weights"] > 0
    rep = preflight(cfg=_cfg(tmp_path, train={"learning_rate": 1e30}), device="cpu", pipe=tiny_pipeline())
    assert not rep.ok and not rep.steps["ok"] and "non-finite loss" in rep.steps["error"]   # the second step's
    assert "NOT ready" in print_report(rep)
    pipe = tiny_pipeline()   # a damaged base: named before any step
    with torch.no_grad():
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    rep = preflight(cfg=_cfg(tmp_path), device="cpu", pipe=pipe)
    assert not rep.ok and not rep.steps["ok"] and "unet.conv_in.weight holds non-finite" in rep.steps["error"]


@pytest.mark.slow
@pytest.mark.parametrize("type_", ["loha", "lokr"])
def test_preflight_of_loha_and_lokr(tmp_path, tiny_pipeline, type_):
    """The preflight runs the LyCORIS types' two steps and counts their own parameters."""
    import lora_core as lc
    from lora_sd.config import CROSS_ATTN
    lora = {"type": type_, "r": 4, "alpha": 2.0, "target_modules": "cross_attn"}
    rep = preflight(cfg=_cfg(tmp_path, lora=lora, output={"name": "x", "save_diffusers": False}), device="cpu",
                    pipe=tiny_pipeline())
    assert rep.ok and rep.steps["ok"] and rep.parameters["type"] == type_, print_report(rep)
    assert f"parameters ({type_}): " in print_report(rep)
    ref = tiny_pipeline().unet
    lc.add_lora(ref, lc.LoraConfig(**{**lora, "target_modules": CROSS_ATTN}))
    assert rep.parameters["trainable"] == sum(p.numel() for p in lc.lora_parameters(ref))


def test_cli_check_exit_codes(tmp_path, capsys):
    from lora_sd.cli import main
    data = tmp_path / "data"
    make_images(data, 2)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\npretrained = "tiny-random"\n[data]\npath = "{data}"\n'
                   f'resolution = 32\ncache_dir = "{tmp_path / "cache"}"\n')
    assert main(["check", "--config", str(cfg), "--device", "cpu", "--no-steps"]) == 0
    assert "ok: nothing blocks a run" in capsys.readouterr().out
    assert main(["check", "--config", str(cfg), "--device", "cpu", "--no-steps", "--json",
                 "--set", 'train.mixed_precision="fp16"']) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is False and d["findings"][0]["key"] == "train.mixed_precision"
    assert main(["check", "--config", str(cfg), "--set", "lora.r=0"]) == 1
    assert "lora.r must be a positive integer" in capsys.readouterr().out


def test_llm_check(capsys):
    from lora_llm.cli import main
    args = ["check", "--config", str(ROOT / "configs" / "llm_sst2_tiny.toml"), "--device", "cpu",
            "--set", f'data.data_dir="{ROOT / "tests" / "fixtures" / "llm" / "sst2"}"', "--set", "train.batch_size=2"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps"]["ok"] and len(d["steps"]["losses"]) == 2 and d["data"]["labels"] == {"0": 2, "1": 2}
    assert d["parameters"]["scale"] == 2.0   # alpha 16 / r 8
    assert main(args + ["--no-steps", "--set", "data.max_length=4096"]) == 1
    assert "data.max_length = 4096 exceeds the model's 256 positions" in capsys.readouterr().out


@pytest.mark.slow
def test_memory_estimate_within_25_percent_on_the_tiny_model():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "preflight_memory.py"), "--case", "tiny-sd", "--json"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert 0.75 <= res["ratio"] <= 1.25, res


def test_settings_the_data_set_would_make_idle_are_errors(tmp_path):
    """Every loss mask black (nothing would train), a trained word in no caption, keep_tokens keeping every tag:
    reported by the audit as errors naming the field (the trainer refuses them in the same words)."""
    data = tmp_path / "masked"
    for img in make_images(data, 2, size=(32, 32), caption="a, b"):
        Image.new("L", (32, 32), 0).save(img.with_name(img.stem + "_mask.png"))
    rep = PreflightReport("sd-train", "x")
    audit(train_config(tmp_path / "run", "tiny-random", data, tmp_path / "cache", embedding={"token": "sks"},
                       data={"masked_loss": True, "shuffle_tags": True, "keep_tokens": 2}), rep)
    assert _keys(rep, "error") == {"data.masked_loss", "embedding.token", "data.keep_tokens"}, rep.findings


def test_two_steps_with_a_loss_of_exactly_zero_block(tmp_path):
    def train():
        run = RunDir(tmp_path).create()
        for step in (1, 2):
            run.append_metrics({"step": step, "loss": 0.0})
        return {"state": "done"}
    rep = PreflightReport("sd-train", "x")
    run_steps(rep, "2 steps", tmp_path, train)
    assert not rep.ok and "exactly 0 at every step" in rep.errors[0].message


def test_llm_check_names_a_backend_that_cannot_be_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "mindspore", None)   # as if MindSpore were not installed
    rep = PreflightReport("llm-train", "x")
    llm_conflicts(load_llm_config(None, ['backend="mindspore"']), "cpu", rep)
    assert _keys(rep, "error") == {"backend"} and "pip install" in rep.errors[0].message
