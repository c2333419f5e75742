"""The shipped MMDiT configs: SD 3.5 Medium and FLUX.1-dev for GPU users (hub id, 1024 px, bf16, caches, buckets,
the joint attention, their flow settings) and the offline tiny demos; a sweep over an SD 3.5 field."""
import json
from pathlib import Path

import pytest

from lora_sd.config import JOINT_ATTN, load_train_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_sd35_medium_config():
    cfg = load_train_config(CONFIGS / "sd35_medium_joint_attn.toml")
    assert (cfg.model.pretrained, cfg.data.resolution, cfg.train.mixed_precision) == (
        "stabilityai/stable-diffusion-3.5-medium", 1024, "bf16")
    assert cfg.data.cache_latents and cfg.data.cache_text and cfg.data.buckets and cfg.train.gradient_checkpointing
    assert cfg.lora.target_modules == JOINT_ATTN and cfg.flow.timestep_density == "logit_normal"
    assert (cfg.sample.scheduler, cfg.sample.width, cfg.sample.height) == ("auto", 1024, 1024)


def test_sd3_tiny_demo_is_offline():
    cfg = load_train_config(CONFIGS / "sd3_tiny_demo.toml")
    assert cfg.model.pretrained == "tiny-sd3" and cfg.data.path.startswith("shared:")
    assert cfg.lora.target_modules == JOINT_ATTN and cfg.data.cache_text and cfg.data.buckets


def test_flux_dev_config():
    cfg = load_train_config(CONFIGS / "flux_dev_joint_attn.toml")
    assert (cfg.model.pretrained, cfg.data.resolution, cfg.train.mixed_precision) == (
        "black-forest-labs/FLUX.1-dev", 1024, "bf16")
    assert cfg.data.cache_latents and cfg.data.cache_text and cfg.data.buckets and cfg.train.gradient_checkpointing
    assert cfg.lora.target_modules == JOINT_ATTN
    assert (cfg.flow.timestep_density, cfg.flow.flux_shift, cfg.flow.guidance_scale) == ("sigmoid", True, 1.0)
    assert (cfg.sample.scheduler, cfg.sample.guidance_scale, cfg.sample.negative_prompt) == ("auto", 3.5, "")


def test_flux_tiny_demo_is_offline():
    cfg = load_train_config(CONFIGS / "flux_tiny_demo.toml")
    assert cfg.model.pretrained == "tiny-flux" and cfg.data.path.startswith("shared:")
    assert cfg.lora.target_modules == JOINT_ATTN and cfg.flow.flux_shift and cfg.data.cache_text


@pytest.mark.slow
def test_sd3_sweep_end_to_end(tmp_path, capsys, sd_dataset):
    """`lora-sd sweep` over an SD 3.5 field ([flow] timestep_density) from the tiny demo config (on the tests'
    generated images: no ../shared needed): one trained run folder per value, each with its adapter, and the
    summary rows naming the value."""
    from lora_sd.cli import main
    sets = [f'run_dir="{tmp_path}"', f'data.path="{sd_dataset}"', "train.max_steps=2", "train.batch_size=1", "train.checkpoint_every=0",
            "train.sample_every=0", "train.lr_warmup_steps=0", "data.max_images=2", "data.resolution=32",
            "data.buckets=false", "sample.prompts=[]", f'data.cache_dir="{tmp_path / "cache"}"']
    rc = main(["sweep", "--config", str(CONFIGS / "sd3_tiny_demo.toml"), "--vary",
               "flow.timestep_density=uniform,mode", *(x for s in sets for x in ("--set", s)), "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert rc == 0 and [(r["flow.timestep_density"], r["state"]) for r in rows] == [("uniform", "done"),
                                                                                     ("mode", "done")]
    sweep_dir = next(tmp_path.glob("sweep_*"))
    assert all((sweep_dir / r["run"] / "sd3_tiny_demo_lora.safetensors").is_file() for r in rows)
