"""lora_sd training technique on the data side: caption dropout and tag shuffling (rates over many seeded
draws, keep_tokens), masked loss (zero gradient under the mask, the hand-computed masked mean), and
regularization images (batch mix from repeats, prior_loss_weight scaling)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch import nn

from lora_core.errors import ConfigError
from lora_sd.config import DataSettings, load_train_config
from lora_sd.data import BatchDataset, load_items, load_sample, scan, vary_caption
from lora_sd.testing import make_images
from lora_sd.train import DiffusionLoss

DRAWS = 2000


class RecordingTokenizer:
    model_max_length = 4

    def __init__(self):
        self.seen = []

    def __call__(self, captions, **kw):
        self.seen.append(list(captions))
        return SimpleNamespace(input_ids=torch.zeros(len(captions), 4, dtype=torch.long))


def test_caption_dropout_rate_over_many_draws():
    cfg = DataSettings(caption_dropout=0.3)
    g = torch.Generator().manual_seed(0)
    out = [vary_caption("a, b, c", cfg, g) for _ in range(DRAWS)]
    assert set(out) == {"", "a, b, c"}
    assert abs(out.count("") / DRAWS - 0.3) <= 0.03
    assert all(vary_caption("a, b", DataSettings(), g) == "a, b" for _ in range(50))   # off: unchanged


def test_shuffle_tags_rates_and_keep_tokens():
    cfg = DataSettings(shuffle_tags=True, keep_tokens=2)
    g = torch.Generator().manual_seed(1)
    out = [vary_caption("sks, dog,  red, sitting, grass", cfg, g).split(", ") for _ in range(DRAWS)]
    assert all(tags[:2] == ["sks", "dog"] for tags in out)   # the kept leading tags never move
    assert all(sorted(tags[2:]) == ["grass", "red", "sitting"] for tags in out)
    for tag in ("red", "sitting", "grass"):   # each of the 3 shuffled tags comes third a third of the time
        assert abs(sum(t[2] == tag for t in out) / DRAWS - 1 / 3) <= 0.03
    both = DataSettings(shuffle_tags=True, keep_tokens=1, caption_dropout=0.5)
    out = [vary_caption("sks, a, b", both, g) for _ in range(DRAWS)]
    assert abs(out.count("") / DRAWS - 0.5) <= 0.03 and all(o == "" or o.startswith("sks, ") for o in out)


def test_dataset_captions_vary_per_epoch_and_repeat_exactly(tmp_path):
    make_images(tmp_path, 4, caption="sks, a, b, c, d, e, f, g, h")
    cfg = DataSettings(path=str(tmp_path), resolution=16, shuffle_tags=True, keep_tokens=1, caption_dropout=0.2)
    tok = RecordingTokenizer()
    ds = BatchDataset(load_items(cfg), cfg, 2, 7, tok)
    tok.seen.clear()
    batch = ds[0]
    assert "input_ids" in batch and "text_emb" not in batch
    ds[0]
    ds.sampler.set_epoch(1)
    ds[0]
    fresh = BatchDataset(load_items(cfg), cfg, 2, 7, tok)   # as a resumed run builds it
    tok.seen.pop()
    fresh.sampler.set_epoch(1)
    fresh[0]
    first, again, other, resumed = tok.seen
    assert first == again            # same (seed, epoch, batch): same captions (exact resume)
    assert other == resumed
    assert first != other            # another epoch: other draws
    assert all(c == "" or c.startswith("sks, ") for c in first + other)


def _loss_module(out_shape, prior_loss_weight=1.0, **kw):
    class StubUNet(nn.Module):   # its output is a parameter: the gradient w.r.t. the UNet output is .grad
        def __init__(self):
            super().__init__()
            self.out = nn.Parameter(torch.randn(out_shape, generator=torch.Generator().manual_seed(3)))
            self.seen_t = []

        def forward(self, noisy, t, cond):
            self.seen_t.append(t)
            return SimpleNamespace(sample=self.out + 0 * noisy)
    return DiffusionLoss(StubUNet(), DDPMScheduler(num_train_timesteps=1000), scaling_factor=1.0,
                         prior_loss_weight=prior_loss_weight, **kw)


def _batch(b=2, c=4, h=8, w=8, **extra):
    mean = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(5))
    return {"latent_params": torch.cat([mean, torch.full_like(mean, -30.0)], 1),
            "text_emb": torch.zeros(b, 3, 8), **extra}


def test_timestep_range_bounds_the_drawn_timesteps():
    module = _loss_module((64, 4, 8, 8), timesteps=(800, 1000))
    for _ in range(20):
        module(_batch(b=64))
    t = torch.cat(module.unet.seen_t)
    assert int(t.min()) >= 800 and int(t.max()) <= 999 and len(t.unique()) > 150   # uniform over [800, 1000)
    full = _loss_module((64, 4, 8, 8))
    full(_batch(b=64))
    assert int(full.unet.seen_t[0].min()) < 800                                       # the default: all 1000
    with pytest.raises(ConfigError, match="loss.min_timestep 900 must be below loss.max_timestep 500"):
        load_train_config(None, ['data.path="x"', "loss.min_timestep=900", "loss.max_timestep=500"])


def test_masked_loss_zero_gradient_and_masked_mean():
    mask = torch.zeros(2, 1, 16, 16)          # pixels; the latents are 8x8, each latent pixel a 2x2 block
    mask[0, :, :8, :] = 1.0                   # item 0: top half trained
    mask[1, :, 4:10, 2:16] = 1.0              # item 1: a rectangle
    module = _loss_module((2, 4, 8, 8))
    torch.manual_seed(0)
    loss = module(_batch(mask=mask))
    loss.backward()
    torch.manual_seed(0)
    torch.randn(2, 4, 8, 8)                   # the latent sample
    noise = torch.randn(2, 4, 8, 8)
    w = mask[:, :, ::2, ::2].expand(2, 4, 8, 8)
    err = (module.unet.out.detach() - noise) ** 2
    expect = ((err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))).mean()
    assert torch.allclose(loss, expect, rtol=1e-6)
    grad = module.unet.out.grad
    assert torch.count_nonzero(grad[w == 0]) == 0          # the masked region gets exactly zero gradient
    assert torch.count_nonzero(grad[w == 1]) == int(w.sum())


def test_mask_from_sidecar_or_alpha(tmp_path):
    img = make_images(tmp_path, 2, size=(16, 16))
    Image.fromarray(np.tile(np.array([0, 255], np.uint8).repeat(8), (16, 1))).save(tmp_path / "img_0_0_mask.png")
    rgba = Image.open(img[1]).convert("RGBA")
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:8] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(img[1])
    rep = scan(tmp_path)
    assert len(rep.items) == 2 and rep.masks == 1 and rep.to_dict()["masks"] == 1   # the mask is no image
    items = {i.path.name: i for i in load_items(DataSettings(path=str(tmp_path)))}
    _, m0 = load_sample(items["img_0_0.png"], (16, 16), masked=True)
    assert m0.shape == (1, 16, 16) and torch.all(m0[:, :, :8] == 0) and torch.all(m0[:, :, 8:] == 1)
    _, m0f = load_sample(items["img_0_0.png"], (16, 16), flip=True, masked=True)
    assert torch.equal(m0f, m0.flip(-1))
    _, m1 = load_sample(items["img_0_1.png"], (16, 16), masked=True)
    assert torch.all(m1[:, :8] == 1) and torch.all(m1[:, 8:] == 0)
    assert load_sample(items["img_0_1.png"], (16, 16))[1] is None


def test_reg_batches_mix_at_the_repeats_ratio(tmp_path):
    make_images(tmp_path / "inst", 3, caption="sks dog")
    make_images(tmp_path / "reg", 4, seed=1, caption="a dog")
    cfg = DataSettings(path=str(tmp_path / "inst"), repeats=4, reg_path=str(tmp_path / "reg"), reg_repeats=2,
                       resolution=16, trigger_word="sks")
    items = load_items(cfg)
    assert [i.is_reg for i in items] == [False] * 3 + [True] * 4
    assert all(not i.caption.startswith("sks, ") for i in items if i.is_reg)   # no trigger on class images
    ds = BatchDataset(items, cfg, 4, 0, RecordingTokenizer())
    flags = torch.cat([ds[i]["is_reg"] for i in range(len(ds))])
    assert len(flags) == 3 * 4 + 4 * 2 and int(flags.sum()) == 4 * 2    # 12 instance : 8 class samples
    assert any(0 < int(ds[i]["is_reg"].sum()) < len(ds[i]["is_reg"]) for i in range(len(ds)))   # mixed batches


@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0, 3.0])
def test_prior_loss_weight_scales_reg_items_exactly(weight):
    reg = torch.tensor([False, True, True, False])
    module = _loss_module((4, 4, 8, 8), prior_loss_weight=weight)
    torch.manual_seed(0)
    got = module(_batch(4, is_reg=reg))
    torch.manual_seed(0)
    torch.randn(4, 4, 8, 8)                   # the latent sample
    noise = torch.randn(4, 4, 8, 8)
    per_item = ((module.unet.out.detach() - noise) ** 2).mean(dim=(1, 2, 3))
    instance, prior = per_item[~reg].sum() / 4, per_item[reg].sum() / 4
    assert torch.allclose(got, instance + weight * prior, rtol=1e-6, atol=1e-8)
    assert prior > 0 and instance > 0


@pytest.mark.parametrize("cache_latents", [True, False])
def test_tiny_run_with_masks_reg_images_and_varied_captions(tmp_path, cache_latents, tiny_sd_model):
    from lora_sd.testing import train_config
    from lora_sd.train import run_training
    tiny = tiny_sd_model
    imgs = make_images(tmp_path / "inst", 2, size=(32, 32), caption="sks, a, b, c")
    Image.new("L", (32, 32), 255).save(imgs[0].with_name(imgs[0].stem + "_mask.png"))
    make_images(tmp_path / "reg", 2, seed=1, size=(32, 32), caption="a thing")
    cfg = train_config(tmp_path / "run", tiny, tmp_path / "inst", tmp_path / "cache",
                       data={"masked_loss": True, "reg_path": str(tmp_path / "reg"), "shuffle_tags": True,
                             "keep_tokens": 1, "caption_dropout": 0.1, "cache_latents": cache_latents},
                       loss={"prior_loss_weight": 0.5}, train={"max_steps": 2, "checkpoint_every": 0})
    status = run_training(cfg)
    assert status["state"] == "done"
    text = (tmp_path / "run" / "train.log").read_text()
    assert "the text is encoded every step" in text and "4 images" in text   # 2 instance + 2 class images


def test_gui_advanced_fields_are_declared_config_fields():
    from lora_core.fields import field_specs
    from lora_gui.forms import ADVANCED_SD_DATA, SD_FIELDS
    from lora_sd.config import SDTrainConfig
    specs = {s.path: s for s in field_specs(SDTrainConfig)}
    for f in ADVANCED_SD_DATA:
        assert f in SD_FIELDS and f.group == "advanced" and specs[f.key].help


def test_check_dataset_counts_masks(tmp_path, capsys):
    from lora_sd.cli import main as cli
    img = make_images(tmp_path, 2, size=(16, 16))
    Image.new("L", (16, 16), 255).save(img[1].with_name(img[1].stem + "_mask.png"))
    assert cli(["check-dataset", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "1 image(s) with a _mask.png" in out
