"""lora_sd datasets: captions (sidecar, metadata.jsonl, template), repeats, corrupt images, errors
before training, buckets, and the latent cache keys."""
import json

import pytest
import torch
from PIL import Image

from lora_sd.cli import main as cli
from lora_sd.config import DataSettings
from lora_sd.data import LatentCache, load_items, make_buckets, pick_bucket
from lora_sd.errors import DatasetError
from lora_sd.testing import make_images, train_config


def test_captions_repeats_template(tmp_path):
    make_images(tmp_path, 2)
    sub = tmp_path / "3_dogs"
    make_images(sub, 2, seed=1)
    for p in sub.glob("*.txt"):
        p.unlink()
    (sub / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": p.name, "text": "a dog"})
                                                  for p in sorted(sub.glob("*.png"))))
    (sub / sorted(sub.glob("*.png"))[0].with_suffix(".txt").name).write_text("sidecar wins")
    items = load_items(DataSettings(path=str(tmp_path), trigger_word="sks", caption_template="{caption}, photo"))
    caps = {i.path.name: (i.caption, i.repeats) for i in items}
    assert len(items) == 4
    assert caps["img_0_0.png"] == ("sks, a photo of a thing 0, photo", 1)
    assert sorted(v for k, v in caps.items() if k.startswith("img_1")) == [("sks, a dog, photo", 3),
                                                                          ("sks, sidecar wins, photo", 3)]


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, caplog):
    make_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = sorted(tmp_path.glob("*.png"))[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level("WARNING"):
        items = load_items(DataSettings(path=str(tmp_path)))
    assert len(items) == 2
    text = caplog.text
    assert "broken.png" in text and "truncated.png" in text and "2 corrupt image(s) skipped" in text


def test_dataset_errors_come_before_training(tmp_path):
    from lora_sd.train import run_training
    make_images(tmp_path / "d", 2)
    (tmp_path / "d" / "img_0_1.txt").unlink()
    # the model path does not exist: a dataset error must come first
    cfg = train_config(tmp_path / "run", str(tmp_path / "no_model"), tmp_path / "d", tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"(?s)1 image\(s\) .* have no caption.*img_0_1.png"):
        run_training(cfg)
    # validated before anything is written: a bad data set leaves no run folder behind
    assert not (tmp_path / "run").exists()
    # a template without {caption} needs no captions
    assert len(load_items(DataSettings(path=str(tmp_path / "d"), caption_template="a photo of sks"))) == 2

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no readable images"):
        load_items(DataSettings(path=str(tmp_path / "empty")))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("caption without image")
    with pytest.raises(DatasetError, match="no readable images"):
        load_items(DataSettings(path=str(tmp_path / "texts")))
    with pytest.raises(DatasetError, match="not a folder"):
        load_items(DataSettings(path=str(tmp_path / "missing")))


def test_check_dataset_cli(tmp_path, capsys):
    make_images(tmp_path, 3)
    (tmp_path / "img_0_2.txt").unlink()
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    assert cli(["check-dataset", str(tmp_path), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert (d["images"], d["captioned"], d["corrupt"], d["missing_captions"], d["ok"]) == (3, 2, 1, 1, False)
    assert any("bad.jpg" in p for p in d["problems"]) and any("img_0_2.png" in p for p in d["problems"])
    (tmp_path / "img_0_2.txt").write_text("fixed")
    assert cli(["check-dataset", str(tmp_path)]) == 0


def test_buckets():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    wide = pick_bucket((1200, 600), buckets)
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 2) < 0.3
    assert pick_bucket((300, 300), buckets) == (512, 512)


def test_latent_cache_keys(tmp_path, tiny_pipeline):
    from lora_sd.data import ImageItem
    from lora_sd.models import model_identity
    (p,) = make_images(tmp_path / "img", 1, size=(32, 32))
    vae = tiny_pipeline().vae
    cache = LatentCache(tmp_path / "cache", vae, model_identity(vae))
    item = ImageItem(p, "x", 1, (32, 32))
    assert cache.ensure([(item, (32, 32), False), (item, (32, 32), True)]) == 2
    assert cache.ensure([(item, (32, 32), False)]) == 0                # reused
    assert cache.ensure([(item, (48, 48), False)]) == 1                # resolution is in the key
    lat = cache.load(item, (32, 32), False)
    assert lat.shape == (8, 8, 8)                                      # mean + logvar, 4x downsampling
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    assert cache.ensure([(item, (32, 32), False)]) == 0                # same identity object: stale...
    cache2 = LatentCache(tmp_path / "cache", vae, model_identity(vae))
    assert cache2.ensure([(item, (32, 32), False)]) == 1               # ...a changed VAE gets a new key
    Image.new("RGB", (32, 32), (255, 0, 0)).save(p)
    cache3 = LatentCache(tmp_path / "cache", vae, model_identity(vae))
    assert cache3.ensure([(item, (32, 32), False)]) == 1               # changed image bytes: new key


def test_config_presets_defaults_and_errors(tmp_path, tiny_pipeline):
    import re
    from lora_core.errors import ConfigError, ModelLoadError
    from lora_sd.config import ALL_ATTN, CROSS_ATTN, load_train_config
    from lora_sd.models import load_pipeline
    f = tmp_path / "c.toml"
    f.write_text('[data]\npath = "x"\n[lora]\nr = 8\n')           # no target_modules: SD default, not the LLM one
    assert load_train_config(f).lora.target_modules == CROSS_ATTN
    cfg = load_train_config(f, ['lora.target_modules="attn"', "train.max_steps=9"])
    assert cfg.lora.target_modules == ALL_ATTN and cfg.train.max_steps == 9
    names = [n for n, _ in tiny_pipeline().unet.named_modules()]
    both = [n for n in names if re.fullmatch(ALL_ATTN, n)]
    assert {".attn1." in n for n in both} == {True, False}   # self and cross attention
    assert len(both) == 2 * len([n for n in names if re.fullmatch(CROSS_ATTN, n)])
    with pytest.raises(ConfigError, match=r"train.*unknown key.*max_step"):
        load_train_config(f, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="data.path is empty"):
        f.write_text("[lora]\nr = 4\n")
        load_train_config(f)
    with pytest.raises(ModelLoadError, match="not a local folder or file"):
        load_pipeline("no-such-org/no-such-model")


def test_train_cli_reports_dataset_errors(tmp_path, capsys):
    make_images(tmp_path / "d", 1)
    (tmp_path / "d" / "img_0_0.txt").unlink()
    f = tmp_path / "c.toml"
    f.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\npretrained = "tiny"\n[data]\npath = "{tmp_path / "d"}"\n')
    assert cli(["train", "--config", str(f), "--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "lora-sd train: error:" in err and "img_0_0.png" in err
