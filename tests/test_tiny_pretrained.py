"""The tiny pretrained SD pipeline shipped in the package (model.pretrained = "tiny") loads offline,
hash-checked, generates in seconds, draws what its prompts name, and a short LoRA run teaches it a colour word
it has never seen (the demo of configs/sd_synth_purple.toml, shortened)."""
import shutil
import time
from pathlib import Path

import pytest

from lora_core.errors import ModelLoadError
from lora_sd import concept_score, models, synth
from lora_sd.generate import pipeline_images

ROOT = Path(__file__).resolve().parent.parent
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def test_shipped_weights_are_listed_hashed_and_within_budget():
    folder = models.tiny_pretrained_dir()
    info = models.verify_pretrained(folder)
    assert set(info["files"]) == {str(f.relative_to(folder)) for f in folder.rglob("*.safetensors")}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(info["files"])
    assert info["weights_bytes"] == sum(f["bytes"] for f in info["files"].values()) <= 20 * 2**20
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"{info['settings']['steps_unet']} steps" in card and "held-out" in card
    assert (folder / "tokenizer" / "tokenizer.json").is_file()   # the CLIP tokenizer travels with the weights


@pytest.mark.parametrize("damage", ["flip", "extra", "missing"])
def test_a_damaged_copy_is_refused_in_one_line(tmp_path, monkeypatch, damage):
    copy = tmp_path / "tiny_synth"
    shutil.copytree(models.tiny_pretrained_dir(), copy)
    f = copy / UNET_FILE
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "extra":
        shutil.copy(f, copy / "unet" / "other.safetensors")
    else:
        f.unlink()
    monkeypatch.setattr(models, "tiny_pretrained_dir", lambda: copy)
    why = {"flip": f"{UNET_FILE} does not match the sha256", "extra": "other.safetensors is not listed",
           "missing": f"{UNET_FILE} is missing"}[damage]
    with pytest.raises(ModelLoadError, match=why) as e:
        models.load_pipeline("tiny")
    assert "\n" not in str(e.value) and "reinstall" in str(e.value)


@pytest.fixture(scope="module")
def pipe():
    return models.load_pipeline("tiny")


def test_loads_offline_and_generates_in_seconds(monkeypatch):
    from lora_sd.generate import generate
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    p = models.load_pipeline("tiny")
    (img, _), = generate(p, ["a red circle on a grey background"], steps=20, guidance_scale=5.0, seed=0,
                         width=64, height=64, scheduler="ddim")
    took = time.perf_counter() - t
    assert img.size == (64, 64) and took < 10, f"load + 20 sampling steps took {took:.1f} s"
    assert not models.is_random_weights(p)


@pytest.mark.slow
def test_draws_the_prompted_colour_and_background(pipe):
    """A small fixed sample of the base concepts: the checker reads most prompted colours and backgrounds."""
    prompts = ["a red circle on a grey background", "a blue square on a white background",
               "a yellow triangle on a black background", "a green circle on a grey background"]
    r = concept_score.score_generator(pipeline_images(pipe, steps=20), prompts, seeds=[0, 1])
    assert r["colour"] >= 0.75 and r["background"] >= 0.75, r


@pytest.mark.slow
def test_the_demo_lora_teaches_the_held_out_colour(tmp_path):
    """configs/sd_synth_purple.toml (600 steps, about 3.5 min; no validation images): on a small fixed sample
    (purple x 3 shapes x grey, white and black, 2 seeds) base + LoRA (with its trained "purple" embedding,
    which loads beside it) shows purple in at least half, and the base model never does."""
    from lora_core.configfile import load_config
    from lora_sd.config import SDTrainConfig
    from lora_sd.generate import load_adapters
    from lora_sd.train import run_training
    data = synth.write_folder(tmp_path / "data", 20, 100, "purple")
    reg = synth.write_folder(tmp_path / "reg", 40, 101, "base")
    cfg = load_config(SDTrainConfig, ROOT / "configs" / "sd_synth_purple.toml", overrides=[
        f'run_dir="{tmp_path / "run"}"', f'data.path="{data}"', f'data.reg_path="{reg}"', "train.sample_every=0",
        "train.checkpoint_every=0"])
    assert run_training(cfg)["state"] == "done"
    pipe = models.load_pipeline("tiny")
    prompts = synth.prompts_for("purple", tuple(synth.BACKGROUNDS))
    make = pipeline_images(pipe, steps=20)
    base = concept_score.score_generator(make, prompts, seeds=[0, 1])
    load_adapters(pipe, [(str(tmp_path / "run" / "synth_purple.safetensors"), 1.0)])
    assert (tmp_path / "run" / "synth_purple_emb.safetensors").is_file()
    taught = concept_score.score_generator(make, prompts, seeds=[0, 1])
    assert base["colour"] == 0.0 and taught["colour"] >= 0.5, (base["colour"], taught["colour"])
