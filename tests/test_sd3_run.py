"""`lora-sd train` on the tiny SD 3.5 pipeline end to end: exact resume, the text encoders released after
caching, the validation loss, the adapter files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_core.preflight import print_report
from lora_sd.preflight import preflight
from lora_sd.testing import make_images, stop_then_resume, train_config
from lora_sd.train import run_training


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_run_data") / "images"
    make_images(root, 4, size=(40, 32))
    return root


FLOWS = {"tiny-sd3": {"timestep_density": "mode", "loss_weighting": "cosmap"},
         "tiny-flux": {"timestep_density": "sigmoid", "flux_shift": True, "guidance_scale": 3.5}}


def _sd3_run(path, images, cache, model="tiny-sd3", **over):
    return train_config(path, model, images, cache, loss={"min_snr_gamma": 0.0},
                        lora={"r": 4, "alpha": 4.0, "target_modules": "joint_attn"}, flow=FLOWS[model],
                        train={"max_steps": 5, "checkpoint_every": 0, "val_every": 5},
                        data={"val_fraction": 0.25}, **over)


@pytest.mark.slow
@pytest.mark.parametrize("model,n_modules,encoders", [("tiny-sd3", 31, "text_encoder, text_encoder_2, text_encoder_3"),
                                                      ("tiny-flux", 16, "text_encoder, text_encoder_2")])
def test_stop_and_resume_equals_uninterrupted(images, tmp_path, monkeypatch, model, n_modules, encoders):
    """SD 3.5 and Flux dev: SIGTERM during step 3, then --resume latest: the final adapters are bit-identical to an
    uninterrupted run, the validation loss too; the text encoders were released (cached text) and the
    metadata records the flow objective."""
    full = run_training(_sd3_run(tmp_path / "full", images, tmp_path / "cache", model))
    assert full["state"] == "done"
    stopped, done = stop_then_resume(_sd3_run(tmp_path / "part", images, tmp_path / "cache", model), monkeypatch,
                                     at_call=3)
    assert stopped["state"] == "stopped" and done["state"] == "done"
    for name in ("test_lora.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diffusers = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.transformer_blocks.") for k in diffusers) and len(diffusers) == 2 * n_modules
    val = [[json.loads(line)["val_loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line] for r in ("full", "part")]
    assert val[0] == val[1] and len(val[0]) == 1
    log = (tmp_path / "full" / "train.log").read_text()
    assert f"{encoders} released before the first step" in log
    with safe_open(str(tmp_path / "full" / "test_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    flow = json.loads(meta["lora_sd.flow"])
    assert all(flow[k] == v for k, v in FLOWS[model].items())
    assert meta["ss_weighting_scheme"] == FLOWS[model]["timestep_density"]


@pytest.mark.slow
def test_sdxl_features_work_for_sd3(images, tmp_path):
    """The SDXL trainer's features on SD 3.5 in one short run: caption dropout (the text encoded every step, the
    encoders kept), masked loss, reg images, output preservation, EMA, DoRA, per-module ranks, LoRA+, a CLIP-L
    LoRA, gradient checkpointing; then Prodigy. The files hold what was asked."""
    reg = tmp_path / "reg"
    make_images(reg, 2, seed=3, caption="a photo")
    over = dict(data={"caption_dropout": 0.3, "masked_loss": True, "reg_path": str(reg)},
                loss={"min_snr_gamma": 0.0, "preserve_weight": 0.5, "preserve_trigger": "thing",
                      "preserve_class": ["dog"]},
                lora={"r": 4, "alpha": 4.0, "use_dora": True, "rank_pattern": {r".*attn2\..*": 2}},
                train={"max_steps": 3, "checkpoint_every": 0, "ema_decay": 0.9, "loraplus_lr_ratio": 4.0,
                       "gradient_checkpointing": True},
                text_encoder_lora={"r": 2})
    status = run_training(train_config(tmp_path / "run", "tiny-sd3", images, tmp_path / "cache", **over))
    assert status["state"] == "done", status.get("error")
    sd = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in sd) and any("lora_magnitude_vector" in k for k in sd)
    assert sd["transformer.transformer_blocks.0.attn2.to_q.lora_A.weight"].shape[0] == 2
    assert sd["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 4
    assert (tmp_path / "run" / "test_lora_ema.safetensors").is_file()
    # DoRA on q/k/v has no kohya form (fused there): the main file is in the diffusers layout
    assert load_file(str(tmp_path / "run" / "test_lora.safetensors")).keys() == sd.keys()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "text outputs cached" not in log and "the VAE released before the first step" in log
    prodigy = dict(loss={"min_snr_gamma": 0.0}, train={"max_steps": 2, "checkpoint_every": 0, "optimizer": "prodigy",
                                                      "learning_rate": 1.0})
    assert run_training(train_config(tmp_path / "prodigy", "tiny-sd3", images, tmp_path / "cache", **prodigy))["state"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_preflight_checks_mmdit_runs(images, tmp_path, tiny_pipeline, model):
    """lora-sd check on SD 3.5 and Flux: two real steps pass, the trainable parameters are the LoRA's on the
    transformer (the default joint_attn targets), the memory estimate counts the frozen weights."""
    pipe = tiny_pipeline(arch=model.removeprefix("tiny-"))
    cfg = _sd3_run(tmp_path / "run", images, tmp_path / "cache", model)
    rep = preflight(cfg=cfg, device="cpu", pipe=pipe)
    assert rep.ok and rep.steps["ok"] and len(rep.steps["losses"]) == 2, print_report(rep)
    lora = sum(p.numel() for n, p in pipe.transformer.named_parameters() if "lora_" in n)
    assert rep.parameters["trainable"] == lora > 0
    assert rep.memory["total_bytes"] > rep.memory["parts"]["frozen weights"] > 0
