"""SDXL and SD 2.x training and generation on the tiny pipelines (lora_sd.models.build_tiny_pipeline)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_core import LoraConfig, add_lora, lora_layers, lora_parameters
from lora_core.configfile import from_dict
from lora_core.errors import ConfigError
from lora_sd import formats
from lora_sd.config import CROSS_ATTN, DataSettings, SDTrainConfig, load_train_config
from lora_sd.data import BatchDataset, _crop_box, load_items, sdxl_text, tokenize
from lora_sd.generate import generate, load_adapters
from lora_sd.models import build_tiny_pipeline
from lora_sd.testing import make_images, stop_then_resume, train_config
from lora_sd.train import DiffusionLoss, _add_adapters, _dataset, run_training, validation_loss

ROOT = Path(__file__).resolve().parent.parent
NO_ACCELERATOR = SimpleNamespace(process_index=0, num_processes=1, wait_for_everyone=lambda: None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of two aspect ratios (two buckets at 32 px with step 16)."""
    root = tmp_path_factory.mktemp("sdxl_data") / "images"
    make_images(root, 4, size=(40, 32))
    make_images(root, 2, size=(100, 40), seed=1, caption="a wide photo")
    return root


def _frozen(arch: str, seed: int = 0):
    pipe = build_tiny_pipeline(seed, arch)
    for m in formats.COMPONENTS + ("vae",):
        if getattr(pipe, m, None) is not None:
            getattr(pipe, m).requires_grad_(False)
    return pipe


def _scheduler(pipe):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(pipe.scheduler.config)


def test_sdxl_text_conditioning_is_the_pipelines():
    """Both encoders' penultimate hidden states concatenated and text_encoder_2's pooled projection:
    exactly what StableDiffusionXLPipeline.encode_prompt gives."""
    pipe = _frozen("sdxl")
    prompts = ["a photo of a thing", "a dog"]
    ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, device=torch.device("cpu"), do_classifier_free_guidance=False)
    with torch.no_grad():
        emb, pooled = sdxl_text(pipe.text_encoder, pipe.text_encoder_2, tokenize(pipe.tokenizer, prompts),
                                tokenize(pipe.tokenizer_2, prompts))
    assert emb.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert torch.equal(emb, ref) and torch.equal(pooled, ref_pooled)


def _fit_by_hand(path, resized, top, left, size, flip):
    """The crop at (top, left) of the (flipped) resized image, in [-1, 1]: the pixels time_ids describe."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize(resized, Image.BICUBIC)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = im.crop((left, top, left + size[0], top + size[1]))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def test_time_ids_of_cropped_bucketed_images(tmp_path):
    """(original h, w, crop top, left, target h, w) per sample: the real image size, the bucket, and the
    crop of the resized (and flipped) image the model sees, cached or not, center or random crop."""
    make_images(tmp_path, 1, size=(100, 40), seed=3)    # bucket 48x16: resized 48x19, center crop top 1
    make_images(tmp_path, 1, size=(70, 50), seed=4)     # bucket 32x32: resized 45x32, center crop left 6
    pipe = _frozen("sdxl")
    d = DataSettings(path=str(tmp_path), resolution=32, bucket_step=16, buckets=True, random_flip=True,
                     cache_dir=str(tmp_path / "cache"), cache_text=False)
    items = load_items(d)
    expect = {(100, 40): {False: [40, 100, 1, 0, 16, 48], True: [40, 100, 1, 0, 16, 48]},
              (70, 50): {False: [50, 70, 0, 6, 32, 32], True: [50, 70, 0, 7, 32, 32]}}
    cfg = SimpleNamespace(data=d, train=SimpleNamespace(batch_size=1, seed=0))
    seen = set()
    cached, _ = _dataset(cfg, items, pipe, NO_ACCELERATOR, False)
    assert cached.latents is not None
    for epoch in range(6):   # enough epochs to see both flips
        cached.sampler.set_epoch(epoch)
        for i in range(len(cached)):
            row, n = cached[i]["time_ids"][0].tolist(), cached.batches[i][0]
            assert row in expect[items[n].size].values(), (items[n].size, row)
            seen.add((items[n].size, tuple(row)))
    assert len(seen) == 3   # both flips of the 70x50 image were drawn (the 100x40 one looks the same)
    # random crops (no cache): the time_ids name exactly the crop the pixels show
    rnd = BatchDataset(items, DataSettings(**{**d.__dict__, "center_crop": False, "cache_latents": False}), 1, 5,
                       pipe.tokenizer, tokenizer_2=pipe.tokenizer_2)
    for epoch in range(3):
        rnd.sampler.set_epoch(epoch)
        for i in range(len(rnd)):
            b, item = rnd[i], items[rnd.batches[i][0]]
            oh, ow, top, left, th, tw = (int(v) for v in b["time_ids"][0])
            size = (tw, th)
            resized, _ = _crop_box(item.size, size, True, None)
            assert (oh, ow) == (item.size[1], item.size[0]) and size == rnd.sizes[rnd.batches[i][0]]
            px = b["pixels"][0]
            hand = [_fit_by_hand(item.path, resized, top, left, size, f) for f in (False, True)]
            assert any(torch.allclose(px, h) for h in hand), (item.size, top, left)
            assert b["input_ids_2"].shape == b["input_ids"].shape


def _sdxl_loss_module(pipe, cfg_data, text_cached=False, latents_cached=False):
    items = load_items(cfg_data)
    cfg = SimpleNamespace(data=cfg_data, train=SimpleNamespace(batch_size=4, seed=0))
    ds, text_emb = _dataset(cfg, items, pipe, NO_ACCELERATOR, False)
    module = DiffusionLoss(pipe.unet, _scheduler(pipe), text_encoder=None if text_cached else pipe.text_encoder,
                           text_encoder_2=None if text_cached else pipe.text_encoder_2,
                           vae=None if latents_cached else pipe.vae, scaling_factor=float(pipe.vae.config.scaling_factor),
                           min_snr_gamma=5.0)
    return ds, module


@pytest.mark.slow
def test_sdxl_loss_decreases_on_fixed_batch(images, tmp_path):
    """Cross-attention LoRA on the SDXL UNet with both encoders' conditioning and the time ids: the loss
    with the same noise and timesteps falls."""
    pipe = _frozen("sdxl")
    torch.manual_seed(0)
    add_lora(pipe.unet, LoraConfig(r=4, alpha=4.0, target_modules=CROSS_ATTN))
    d = DataSettings(path=str(images), resolution=32, bucket_step=16, cache_latents=False, cache_text=False)
    ds, module = _sdxl_loss_module(pipe, d)
    batch = ds[0]
    assert set(batch) >= {"pixels", "input_ids", "input_ids_2", "time_ids"}
    opt = torch.optim.AdamW(list(lora_parameters(pipe.unet)), lr=1e-2)

    def loss():
        torch.manual_seed(123)   # same latent sample, noise and timesteps every time
        return module(batch)

    with torch.no_grad():
        before = loss().item()
    for _ in range(40):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    # the toy UNet's cross-attention at 8x8 latents has little room: about 0.89 x after 40 steps
    assert after < 0.93 * before, (before, after)


def test_sdxl_caching_gives_the_same_loss(images, tmp_path):
    """Cached latents + cached text (both encoders' states and the pooled embedding) give the loss of the
    per-step VAE and text encoders with the same noise (validation_loss: fixed noise and timesteps), the
    same latent sample for the same seed, and the same time_ids, which reach the UNet either way."""
    pipe = _frozen("sdxl")
    common = dict(path=str(images), resolution=32, bucket_step=16, buckets=True, cache_dir=str(tmp_path / "c"))
    plain, m_plain = _sdxl_loss_module(pipe, DataSettings(**common, cache_latents=False, cache_text=False))
    cached, m_cached = _sdxl_loss_module(pipe, DataSettings(**common, cache_latents=True, cache_text=True),
                                         text_cached=True, latents_cached=True)
    assert len(plain) == len(cached) == 2 and m_cached.text_encoder is None and m_cached.vae is None
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]),
                                               with_kwargs=True)
    try:
        la, lb = (validation_loss(m, ds, 3, 0, torch.device("cpu")) for m, ds in ((m_plain, plain), (m_cached, cached)))
        assert la == pytest.approx(lb, rel=1e-5) and len(seen) == 2 * 2 * 3
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert set(b) >= {"latent_params", "text_emb", "pooled", "time_ids"}
            assert torch.equal(a["time_ids"], b["time_ids"]) and torch.equal(seen[i * 3], a["time_ids"])
            with torch.no_grad():
                ca, ea = m_plain.condition(a)
                cb, eb = m_cached.condition(b)
                assert torch.allclose(ca, cb, atol=1e-6) and torch.allclose(
                    ea["added_cond_kwargs"]["text_embeds"], eb["added_cond_kwargs"]["text_embeds"], atol=1e-6)
                torch.manual_seed(i)
                lat_a = m_plain.latents(a)
                torch.manual_seed(i)
                assert torch.allclose(lat_a, m_cached.latents(b), atol=1e-5)
    finally:
        hook.remove()


def test_text_encoder_2_lora_gets_gradients(images):
    pipe = _frozen("sdxl")
    cfg = train_config(Path("unused"), "tiny-sdxl", images, Path("unused"), text_encoder_2_lora={"r": 2})
    comps = _add_adapters(cfg, pipe)
    assert sorted(comps) == ["text_encoder_2", "unet"] and not list(lora_layers(pipe.text_encoder))
    d = DataSettings(path=str(images), resolution=32, bucket_step=16, cache_latents=False, cache_text=False)
    ds, _ = _sdxl_loss_module(pipe, d)
    module = DiffusionLoss(pipe.unet, _scheduler(pipe), text_encoder=pipe.text_encoder, vae=pipe.vae,
                           text_encoder_2=pipe.text_encoder_2, train_text_encoder=True)
    module.train()
    assert pipe.text_encoder_2.training and not pipe.text_encoder.training and not pipe.vae.training
    with torch.no_grad():   # a nonzero B, so that the down projections get gradients too
        for p in lora_parameters(pipe.text_encoder_2):
            p.add_(0.01)
    torch.manual_seed(0)
    module(ds[0]).backward()
    te2 = list(lora_parameters(pipe.text_encoder_2))
    assert len(te2) == 3 * 4 * 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in te2)


def test_text_encoder_2_lora_refused_without_sdxl(images, tmp_path):
    cfg = train_config(tmp_path / "run", "tiny-random", images, tmp_path / "cache", text_encoder_2_lora={"r": 2})
    with pytest.raises(ConfigError, match=r"^text_encoder_2_lora: .* sd1 model .* SDXL and SD 3.5 only"):
        run_training(cfg)


def _sdxl_run(path, images, cache, **over):
    sample = {"prompts": ["a photo of a thing"], "steps": 2, "width": 32, "height": 32}
    return train_config(path, "tiny-sdxl", images, cache, data={"buckets": True},
                        train={"max_steps": 5, "sample_every": 3, "checkpoint_every": 0}, sample=sample, **over)


@pytest.mark.slow
def test_sdxl_stop_and_resume_equals_uninterrupted(images, tmp_path, monkeypatch, tiny_pipeline):
    """SIGTERM during step 3, then --resume latest: the final adapters (UNet and text_encoder_2 LoRA)
    are bit-identical to an uninterrupted run; the files carry SDXL's kohya / modelspec metadata and
    read back with both parts."""
    over = {"text_encoder_2_lora": {"r": 2, "alpha": 2.0}}
    full = run_training(_sdxl_run(tmp_path / "full", images, tmp_path / "cache", **over))
    assert full["state"] == "done"
    part_cfg = _sdxl_run(tmp_path / "part", images, tmp_path / "cache", **over)
    stopped, done = stop_then_resume(part_cfg, monkeypatch, at_call=3)
    assert stopped["state"] == "stopped" and done["state"] == "done"
    for name in ("test_lora.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = tiny_pipeline(0, "sdxl")
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    adapter, meta, _ = formats.read_adapter(tmp_path / "full" / "test_lora.safetensors", comps)
    parts = {k.split(".")[0] for k in adapter}
    assert parts == {"unet", "text_encoder_2"} and sum(k.startswith("text_encoder_2.") for k in adapter) == 12
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(Image.open(tmp_path / "part" / "samples" / "step_000003_0.png").text["lora_sd"])["train_step"] == 3


def _random_adapter_file(path, seed: int):
    """A kohya file with a UNet cross-attention and a text_encoder_2 LoRA of large random weights."""
    pipe = _frozen("sdxl")
    torch.manual_seed(seed)
    add_lora(pipe.unet, LoraConfig(r=2, alpha=2.0, target_modules=CROSS_ATTN))
    add_lora(pipe.text_encoder_2, LoraConfig(r=2, alpha=2.0, target_modules=r".*self_attn\.(q_proj|v_proj)"))
    with torch.no_grad():
        for m in (pipe.unet, pipe.text_encoder_2):
            for p in lora_parameters(m):
                p.normal_(0, 0.5)
    comps = {"unet": pipe.unet, "text_encoder_2": pipe.text_encoder_2}
    formats.write_adapter(path, formats.from_model(comps), formats.KOHYA)
    return path


def _image(pipe, tmp_path=None, **kw):
    (img, params), = generate(pipe, ["a photo of a thing"], steps=2, width=32, height=32, seed=3,
                              out_dir=tmp_path, **kw)
    return np.asarray(img, dtype=np.int16), params


@pytest.mark.slow
def test_xl_generation_with_adapters(tmp_path, tiny_pipeline):
    """StableDiffusionXLPipeline with two adapters: scale 0 gives the base image exactly, scale 1 another;
    the text_encoder_2 part is applied; fusing gives (about) the unfused image; PNG parameters written."""
    f1, f2 = _random_adapter_file(tmp_path / "a.safetensors", 1), _random_adapter_file(tmp_path / "b.safetensors", 2)
    base, _ = _image(tiny_pipeline(0, "sdxl"))
    pipe = tiny_pipeline(0, "sdxl")
    rep = load_adapters(pipe, [(str(f1), 0.0), (str(f2), 0.0)])
    assert [r["matched_modules"] for r in rep] == [17 * 4 + 3 * 2] * 2   # 17 attn2 x q/k/v/out, 3 layers x q/v
    assert {n for n, _ in lora_layers(pipe.text_encoder_2)} and not list(lora_layers(pipe.text_encoder))
    assert np.array_equal(_image(pipe)[0], base)
    pipe = tiny_pipeline(0, "sdxl")
    load_adapters(pipe, [(str(f1), 1.0), (str(f2), 0.5)])
    unfused, params = _image(pipe, tmp_path / "png", base={"model": "tiny-sdxl"})
    assert np.abs(unfused - base).max() > 0
    assert json.loads(Image.open(tmp_path / "png" / "0.png").text["lora_sd"]) == params and params["model"] == "tiny-sdxl"
    pipe = tiny_pipeline(0, "sdxl")
    load_adapters(pipe, [(str(f1), 1.0), (str(f2), 0.5)], fuse=True)
    assert np.abs(_image(pipe)[0] - unfused).max() <= 2


def test_xl_images_decode_outside_autocast(tiny_pipeline):
    """Validation images under the training autocast: SDXL's VAE decodes in its own dtype (fp32 here),
    autocast off (its fp16 gives NaN); afterwards the VAE's decode is the class's again."""
    pipe = tiny_pipeline(0, "sdxl")
    seen = []
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].dtype, torch.is_autocast_enabled("cpu"))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(pipe, ["a photo"], steps=1, width=32, height=32)
    hook.remove()
    assert seen == [(torch.float32, False)] and "decode" not in vars(pipe.vae)


def test_sd2_trains_with_the_v_prediction_target(images, tmp_path):
    """The tiny SD 2.x pipeline (v-prediction scheduler, one text encoder's last hidden state): the loss
    is the MSE to scheduler.get_velocity, not to the noise; a run's files say SD 2 and v."""
    pipe = _frozen("sd2")
    sched = _scheduler(pipe)
    assert sched.config.prediction_type == "v_prediction"
    d = DataSettings(path=str(images), resolution=32, bucket_step=16, cache_latents=False, cache_text=False)
    items = load_items(d)
    ds = BatchDataset(items, d, 2, 0, pipe.tokenizer)
    module = DiffusionLoss(pipe.unet, sched, text_encoder=pipe.text_encoder, vae=pipe.vae)
    batch = ds[0]
    with torch.no_grad():
        torch.manual_seed(4)
        loss = module(batch)
        torch.manual_seed(4)   # the same draws, in forward's order: latent sample, noise, timesteps
        lat = pipe.vae.encode(batch["pixels"]).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (lat.shape[0],))
        pred = pipe.unet(sched.add_noise(lat, noise, t), t, pipe.text_encoder(batch["input_ids"])[0]).sample
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, sched.get_velocity(lat, noise, t)), rtol=1e-5)
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(pred, noise), rtol=1e-2)
    cfg = train_config(tmp_path / "run", "tiny-sd2", images, tmp_path / "cache", train={"max_steps": 2})
    assert run_training(cfg)["state"] == "done"
    _, meta = formats.read_safetensors(tmp_path / "run" / "test_lora.safetensors")
    assert (meta["ss_v2"], meta["ss_v_parameterization"], meta["ss_base_model_version"]) == ("True", "True", "sd_v2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v_prediction"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("sd*.toml")), ids=lambda p: p.name)
def test_every_sd_config_loads(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, SDTrainConfig)
    if path.name.startswith("sdxl"):
        assert cfg.data.buckets and cfg.data.cache_latents and cfg.data.cache_text
    if path.name == "sdxl_cross_attn.toml":
        assert (cfg.model.pretrained, cfg.data.resolution, cfg.train.mixed_precision) == (
            "stabilityai/stable-diffusion-xl-base-1.0", 1024, "bf16")
    if path.name == "sd21_cross_attn.toml":
        assert (cfg.model.pretrained, cfg.data.resolution, cfg.model.prediction_type) == (
            "stabilityai/stable-diffusion-2-1", 768, "v_prediction")


def test_text_encoder_2_lora_table_validates():
    cfg = from_dict(SDTrainConfig, {"data": {"path": "x"}, "text_encoder_2_lora": {"r": 2}})
    assert cfg.text_encoder_2_lora.target_modules == r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"
    assert cfg.trains_text_encoder and not from_dict(SDTrainConfig, {"data": {"path": "x"}}).trains_text_encoder
