"""Differential output preservation (loss.preserve_*): the config's rules, the preserved captions the dataset
serves, and the loss term checked against an independent copy of the base UNet."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_core import LoraConfig, add_lora
from lora_core.errors import ConfigError
from lora_sd.config import DataSettings, load_train_config
from lora_sd.data import BatchDataset, Preservation, load_items
from lora_sd.errors import DatasetError
from lora_sd.models import build_tiny_pipeline
from lora_sd.testing import make_images, train_config
from lora_sd.train import DiffusionLoss


@pytest.mark.parametrize("sets, message", [
    (['loss.preserve_class=["blue"]'], "have no effect while loss.preserve_weight is 0"),
    (["loss.preserve_weight=0.3", 'loss.preserve_trigger="purple"'], "loss.preserve_class is empty"),
    (["loss.preserve_weight=0.3", 'loss.preserve_class=["blue"]'], "which word do the captions teach"),
    (["loss.preserve_weight=-1"], "loss.preserve_weight"),
    (["loss.preserve_weight=0.3", "loss.preserve_empty=1.5"], "loss.preserve_empty"),
])
def test_config_rejects_incomplete_preservation(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, ['data.path="x"', *sets])


def test_config_trigger_defaults_to_the_trained_embedding():
    cfg = load_train_config(None, ['data.path="x"', "loss.preserve_weight=0.3", 'loss.preserve_class=["blue"]',
                                   'embedding.token="purple"', 'embedding.init_word="blue"'])
    assert cfg.preserve_trigger == "purple"
    only_empty = load_train_config(None, ['data.path="x"', "loss.preserve_weight=0.3", "loss.preserve_empty=1"])
    assert only_empty.preserve_trigger == ""


def test_preserved_caption_replaces_whole_words_only(tmp_path):
    p = Preservation("purple", ("blue", "red"), 0.0)
    assert p.captions(["a purple circle, purpleish", "a grey one"]) == [
        "a blue circle, purpleish", "a red circle, purpleish", "a grey one", "a grey one", ""]
    make_images(tmp_path, 2, caption="a green square")
    with pytest.raises(DatasetError, match="no caption of the training images has the word 'purple'"):
        p.check(load_items(DataSettings(path=str(tmp_path), resolution=16)))
    Preservation("purple", (), 1.0).check([])   # only the empty prompt: no trigger needed


def _dataset(tmp_path, empty: float, seed: int = 3):
    pipe = build_tiny_pipeline(0)
    make_images(tmp_path, 6, caption="a purple circle")
    cfg = DataSettings(path=str(tmp_path), resolution=16, bucket_step=16)
    return BatchDataset(load_items(cfg), cfg, 3, seed, pipe.tokenizer,
                        preserve=Preservation("purple", ("blue", "red"), empty)), pipe.tokenizer


def _decoded(batch, tokenizer) -> list[str]:
    """The preserved captions, without make_images' trailing image number."""
    return [c.rstrip("0123456789 ") for c in tokenizer.batch_decode(batch["pres_input_ids"], skip_special_tokens=True)]


def test_dataset_serves_preserved_captions_drawn_per_sample_and_repeatably(tmp_path):
    ds, tok = _dataset(tmp_path, empty=0.5)
    draws = [c for i in range(len(ds)) for c in _decoded(ds[i], tok)]
    assert set(draws) <= {"a blue circle", "a red circle", ""} and len(set(draws)) > 1
    assert _decoded(ds[0], tok) == _decoded(ds[0], tok)                # same (seed, epoch, batch): same draw
    again, _ = _dataset(tmp_path / "again", empty=0.5)                 # a resumed run builds it anew
    assert _decoded(again[0], tok) == _decoded(ds[0], tok)
    counts = {w: 0 for w in ("a blue circle", "a red circle", "")}
    for epoch in range(150):                                           # the rates over many seeded draws
        ds.sampler.set_epoch(epoch)
        for i in range(len(ds)):
            for c in _decoded(ds[i], tok):
                counts[c] += 1
    n = sum(counts.values())
    assert abs(counts[""] / n - 0.5) < 0.05 and abs(counts["a blue circle"] / n - 0.25) < 0.05
    only_empty, _ = _dataset(tmp_path / "empty", empty=1.0)
    assert _decoded(only_empty[0], tok) == ["", "", ""]


def test_preservation_term_is_the_mse_against_the_base_unet(tiny_pipeline):
    """loss(preserve_weight=w) - loss(0) == w * MSE(UNet with LoRA, an untouched copy of the base UNet) on the
    same noisy latents and timesteps, for the preserved captions' conditioning."""
    pipe = tiny_pipeline(0)
    unet = pipe.unet.requires_grad_(False)
    base = copy.deepcopy(unet).eval()
    add_lora(unet, LoraConfig(r=4, alpha=4.0, target_modules=r".*attn2\.(to_k|to_v)|.*resnets\.\d+\.conv1"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 4, 8, 8, generator=g)
    batch = {"latent_params": torch.cat([mean, torch.full_like(mean, -30.0)], 1),
             "text_emb": torch.randn(2, 77, 32, generator=g), "pres_text_emb": torch.randn(2, 77, 32, generator=g)}

    def loss(weight):
        module = DiffusionLoss(unet, sched, scaling_factor=1.0, preserve_weight=weight).train()
        torch.manual_seed(11)
        return module(batch)
    w = 0.7
    torch.manual_seed(11)
    lat = DiffusionLoss(unet, sched, scaling_factor=1.0).latents(batch)
    noise = torch.randn_like(lat)
    t = torch.randint(0, 1000, (2,))
    noisy = sched.add_noise(lat, noise, t)
    with torch.no_grad():
        expected = F.mse_loss(unet(noisy, t, batch["pres_text_emb"]).sample, base(noisy, t, batch["pres_text_emb"]).sample)
    assert float(expected) > 1e-4                                     # the adapter does change the prediction
    torch.testing.assert_close(loss(w) - loss(0.0), w * expected, rtol=1e-4, atol=1e-7)
    evaluating = DiffusionLoss(unet, sched, scaling_factor=1.0, preserve_weight=w).eval()
    torch.manual_seed(11)
    torch.testing.assert_close(evaluating(batch), loss(0.0))          # validation loss: no preservation term


@pytest.mark.parametrize("embedding", [False, True])
def test_tiny_run_with_output_preservation(tmp_path, embedding, tiny_sd_model):
    """Both text paths: cached text (preserved captions encoded once) and a trained embedding (encoded each step)."""
    from lora_sd.train import run_training
    tiny = tiny_sd_model
    word = "<sks>" if embedding else "sks"   # a new word (one token in any tokenizer once added)
    make_images(tmp_path / "inst", 2, size=(32, 32), caption=f"a {word} thing")
    extra = {"embedding": {"token": word, "init_word": "a"}} if embedding else {}
    loss = {"preserve_weight": 0.5, "preserve_class": ["dog"], "preserve_empty": 0.5,
            **({} if embedding else {"preserve_trigger": "sks"})}
    cfg = train_config(tmp_path / "run", tiny, tmp_path / "inst", tmp_path / "cache", loss=loss,
                       train={"max_steps": 2, "checkpoint_every": 0}, **extra)
    assert run_training(cfg)["state"] == "done"
    cfg = train_config(tmp_path / "bad", tiny, tmp_path / "inst", tmp_path / "cache",
                       loss={**loss, "preserve_trigger": "purple"}, train={"max_steps": 2}, **extra)
    with pytest.raises(DatasetError, match="'purple'"):
        run_training(cfg)


def test_a_missing_reg_folder_is_named_by_its_own_field(tmp_path):
    make_images(tmp_path / "inst", 1)
    with pytest.raises(DatasetError, match="^data.reg_path .*nowhere: not a folder"):
        load_items(DataSettings(path=str(tmp_path / "inst"), reg_path=str(tmp_path / "nowhere")))
