"""SD 3.5 training with rectified flow (lora_sd.flow, lora_sd.archs, lora_sd.text_cache) on the tiny SD 3.5
pipeline: the objective against diffusers' training utilities and a hand computation, the cached text against
StableDiffusion3Pipeline.encode_prompt, the target presets, the loss on a fixed batch."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_core import add_lora, lora_layers, lora_parameters
from lora_core.errors import ConfigError
from lora_sd.archs import SPECS
from lora_sd.config import DataSettings, FlowSettings
from lora_sd.data import load_items, tokenize
from lora_sd.flow import FlowMatch, loss_weight, timestep_density
from lora_sd.testing import make_images, train_config
from lora_sd.text_cache import TextCache
from lora_sd.train import _add_adapters, _dataset, lora_for_arch, run_training
from helpers import NO_ACCELERATOR, fit_fixed_batch, flow_loss_module, frozen_pipeline

CAPTIONS = ["a photo of a thing 0", "a red square on a blue field", ""]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_data") / "images"
    make_images(root, 4, size=(40, 32))
    return root


def _frozen(tiny_pipeline):
    return frozen_pipeline(tiny_pipeline, "sd3")


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_timestep_draws_equal_diffusers(density):
    """The u draws of each density equal diffusers.training_utils.compute_density_for_timestep_sampling for
    the same generator seeds, with non-default parameters."""
    for seed in (0, 1, 7):
        ours = timestep_density(density, 64, logit_mean=0.3, logit_std=1.4, mode_scale=0.8,
                                generator=torch.Generator().manual_seed(seed))
        ref = compute_density_for_timestep_sampling(density, 64, logit_mean=0.3, logit_std=1.4, mode_scale=0.8,
                                                    generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, ref), (density, seed)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_equal_diffusers(weighting):
    sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[torch.tensor([0, 10, 500, 990, 999])]
    ours = loss_weight(weighting, sigmas)
    ref = compute_loss_weighting_for_sd3(weighting, sigmas)
    assert torch.equal(torch.ones_like(sigmas) if ours is None else ours, ref)


def test_flow_sample_is_diffusers_sd3_recipe():
    """FlowMatch.sample with the global RNG: u as diffusers draws it, the timesteps and sigmas of the shifted
    scheduler at ⌊u·1000⌋ (train_dreambooth_lora_sd3.py's lookup), x_t = (1 − σ)x_0 + σε, target ε − x_0,
    the cosmap weight; flow.shift replaces the scheduler's shift."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(5, 16, 4, 4), torch.randn(5, 16, 4, 4)
    flow = FlowMatch(sched.config, "logit_normal", "cosmap", logit_mean=0.2, logit_std=0.9)
    torch.manual_seed(11)
    got = flow.sample(x0, noise)
    torch.manual_seed(11)
    u = compute_density_for_timestep_sampling("logit_normal", 5, logit_mean=0.2, logit_std=0.9)
    timesteps = sched.timesteps[(u * 1000).long()]
    idx = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[idx]
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(got.timestep, timesteps)
    assert torch.equal(got.noisy, (1.0 - s) * x0 + s * noise) and torch.equal(got.target, noise - x0)
    assert torch.equal(got.weight, compute_loss_weighting_for_sd3("cosmap", sigmas))
    # the hand formula of the shifted schedule: sigma(t) = 3t / (1 + 2t), t = k / 1000
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    assert torch.allclose(flow.sigma_table.double(), 3 * t / (1 + 2 * t), atol=1e-6)
    shifted = FlowMatch(sched.config, "uniform", shift=1.0)   # shift 1: the plain linear schedule
    assert torch.allclose(shifted.sigma_table.double(), t, atol=1e-6)


@pytest.mark.slow
def test_cached_text_equals_the_pipelines_encode_prompt(tiny_pipeline, tmp_path):
    """The text cache (on disk) holds exactly StableDiffusion3Pipeline.encode_prompt's prompt embeddings (both
    CLIPs' penultimate states padded to T5's width, then T5's sequence) and pooled embedding (CLIP-L's and
    CLIP-G's projections side by side); a second cache on the same folder reads the files without encoding."""
    pipe = _frozen(tiny_pipeline)
    cache = TextCache(tmp_path / "text", SPECS["sd3"], pipe)
    emb, pooled = cache.get(CAPTIONS)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == len(CAPTIONS)
    for k, caption in enumerate(CAPTIONS):
        ref, _, ref_pooled, _ = pipe.encode_prompt(caption, caption, caption, do_classifier_free_guidance=False)
        assert emb[k:k + 1].shape == ref.shape == (1, 77 + 256, 96)
        assert torch.equal(emb[k:k + 1], ref) and torch.equal(pooled[k:k + 1], ref_pooled), caption
        with torch.no_grad():
            ids = pipe.tokenizer_3(caption, padding="max_length", max_length=256, truncation=True,
                                   return_tensors="pt").input_ids
            assert torch.equal(emb[k, 77:], pipe.text_encoder_3(ids)[0][0])                   # the T5 sequence
            for part, (te, tok) in zip(pooled[k].split([32, 48]), ((pipe.text_encoder, pipe.tokenizer),
                                                                  (pipe.text_encoder_2, pipe.tokenizer_2))):
                ids = tok(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                assert torch.equal(part, te(ids).text_embeds[0])                              # each CLIP's pooling
    again = TextCache(tmp_path / "text", SPECS["sd3"], pipe)
    again.encoders = {}   # nothing to encode with: every caption must come from the files
    emb2, pooled2 = again.get(CAPTIONS)
    assert torch.equal(emb2, emb) and torch.equal(pooled2, pooled)
    # another tokenizer or other weights: other files
    pipe.tokenizer.model_max_length = 76
    assert TextCache(tmp_path / "text", SPECS["sd3"], pipe).identity != cache.identity
    pipe.tokenizer.model_max_length = 77
    with torch.no_grad():
        pipe.text_encoder_3.shared.weight[0, 0] += 1
    assert TextCache(tmp_path / "text", SPECS["sd3"], pipe).identity != cache.identity


def _loss_module(pipe, images, tmp_path, *, text_cached: bool, **flow):
    return flow_loss_module(pipe, images, tmp_path / "cache", text_cached=text_cached, **flow)


@pytest.mark.slow
def test_noised_latents_and_target_equal_a_hand_computation(tiny_pipeline, images, tmp_path):
    """One training forward on cached latents and text: the transformer sees x_t = (1 − σ)·x_0 + σ·ε with x_0 the
    VAE sample shifted and scaled by the VAE's factors, the timestep σ·1000 of the shifted σ table, the cached
    prompt and pooled embeddings; the loss is the cosmap-weighted mean of (prediction − (ε − x_0))²."""
    pipe = _frozen(tiny_pipeline)
    ds, module = _loss_module(pipe, images, tmp_path, text_cached=True, density="mode", weighting="cosmap")
    batch = ds[0]
    seen = {}

    def grab(m, args, kwargs, out):
        seen.update(kwargs, out=out.sample)
    hook = pipe.transformer.register_forward_hook(grab, with_kwargs=True)
    try:
        torch.manual_seed(5)
        loss = module(batch)
    finally:
        hook.remove()
    torch.manual_seed(5)
    mean, logvar = batch["latent_params"].chunk(2, dim=1)
    x0 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) - 0.0609) * 1.5305
    eps = torch.randn_like(x0)
    u = torch.rand(x0.shape[0])
    u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    k = (u * 1000).long()
    t = (1000 - k).double() / 1000
    sigma = (3 * t / (1 + 2 * t)).float().view(-1, 1, 1, 1)
    assert torch.allclose(seen["hidden_states"], (1 - sigma) * x0 + sigma * eps, atol=1e-5)
    assert torch.allclose(seen["timestep"], sigma.flatten() * 1000, atol=1e-3)
    assert torch.equal(seen["encoder_hidden_states"], batch["text_emb"])
    assert torch.equal(seen["pooled_projections"], batch["pooled"])
    w = 2 / (math.pi * (1 - 2 * sigma.flatten() + 2 * sigma.flatten() ** 2))
    per_item = ((seen["out"] - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (w * per_item).mean(), rtol=1e-5)


@pytest.mark.slow
def test_sd3_loss_decreases_on_fixed_batch(tiny_pipeline, images, tmp_path):
    """Joint-attention LoRA on the tiny MMDiT, the text encoded every step (pooled + sequence conditioning):
    the loss at the same σ and noise falls."""
    pipe = _frozen(tiny_pipeline)
    torch.manual_seed(0)
    cfg = train_config(Path("unused"), "tiny-sd3", images, tmp_path, lora={"r": 4, "alpha": 4.0,
                                                                           "target_modules": "joint_attn"})
    _add_adapters(cfg, pipe)
    ds, module = _loss_module(pipe, images, tmp_path, text_cached=False)
    batch = ds[0]
    assert set(batch) >= {"pixels", "input_ids", "input_ids_2", "input_ids_3"} and "time_ids" not in batch
    assert batch["input_ids_3"].shape[1] == 256
    before, after = fit_fixed_batch(module, batch, lora_parameters(pipe.transformer), steps=20, lr=3e-2)
    # the toy MMDiT at 8x8 latents (16 tokens) has little room: about 0.89 x after 20 steps (fixed seeds)
    assert after < 0.92 * before, (before, after)


def _adapted(transformer, **lora) -> list[str]:
    cfg = train_config(Path("unused"), "tiny-sd3", Path("unused"), Path("unused"), lora=lora)
    transformer = copy.deepcopy(transformer)
    add_lora(transformer, lora_for_arch(cfg, SPECS["sd3"], transformer))
    return sorted(n for n, _ in lora_layers(transformer))


def test_target_presets_and_block_selection(tiny_pipeline):
    """joint_attn (the default): both streams of the joint attention and the dual attention attn2; the last
    block is context-pre-only (no to_add_out); joint_attn_image: the image stream; attn+ff adds the
    feed-forwards, all_linear the modulation linears; lora.layers picks joint blocks."""
    image = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    text = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    dual = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    tr = tiny_pipeline(arch="sd3").transformer

    def block(i, names):
        return [f"transformer_blocks.{i}.{n}" for n in names]
    joint = sorted(block(0, image + text + dual + ["attn.to_add_out"]) + block(1, image + text + dual + ["attn.to_add_out"])
                   + block(2, image + text))
    assert _adapted(tr) == joint == _adapted(tr, target_modules="joint_attn")
    assert _adapted(tr, target_modules="joint_attn_image") == sorted(
        block(0, image + dual) + block(1, image + dual) + block(2, image))
    ff = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    with_ff = _adapted(tr, target_modules="attn+ff")
    assert with_ff == sorted(joint + block(0, ff) + block(1, ff) + block(2, ff[:2]))
    all_linear = _adapted(tr, target_modules="all_linear")
    assert sorted(set(all_linear) - set(with_ff)) == sorted(
        block(0, ["norm1.linear", "norm1_context.linear"]) + block(1, ["norm1.linear", "norm1_context.linear"])
        + block(2, ["norm1.linear", "norm1_context.linear"]))
    assert _adapted(tr, layers=[0, 2]) == [n for n in joint if not n.startswith("transformer_blocks.1.")]
    assert _adapted(tr, layers="top:1") == [n for n in joint if n.startswith("transformer_blocks.2.")]
    with pytest.raises(ConfigError, match=r"lora.layers: \[3\] out of range .* joint blocks"):
        _adapted(tr, layers=[3])


@pytest.mark.slow
def test_fields_that_cannot_apply_are_refused(tiny_pipeline, images, tmp_path):
    """An MMDiT preset or [flow] on a UNet model, Min-SNR or a prediction type on SD 3.5: one line each."""
    pipe = tiny_pipeline()
    cfg = train_config(tmp_path / "a", "tiny-random", images, tmp_path, lora={"target_modules": "joint_attn"})
    with pytest.raises(ConfigError, match=r"^lora.target_modules = 'joint_attn' is an SD 3.5 / Flux \(MMDiT\) preset"):
        _add_adapters(cfg, pipe)
    cfg = train_config(tmp_path / "b", "tiny-random", images, tmp_path, flow={"loss_weighting": "cosmap"})
    with pytest.raises(ConfigError, match=r"^\[flow\]: .* sd1 UNet model .* SD 3.5 and Flux \(rectified flow\) only"):
        run_training(cfg, pipe=pipe)
    cfg = train_config(tmp_path / "c", "tiny-sd3", images, tmp_path)   # train_config's min_snr_gamma = 5
    with pytest.raises(ConfigError, match=r"^loss.min_snr_gamma = 5.0: sd3 is trained with rectified flow"):
        run_training(cfg, pipe=_frozen(tiny_pipeline))
    cfg = train_config(tmp_path / "d", "tiny-sd3", images, tmp_path, lora={"type": "lokr"}, loss={"min_snr_gamma": 0.0},
                       output={"save_diffusers": False})   # the native kohya names hold LoRA only
    with pytest.raises(ConfigError, match=r"^lora.type = 'lokr': the sd3 files .* hold LoRA only so far"):
        run_training(cfg, pipe=_frozen(tiny_pipeline))
    assert not list((tmp_path / "d").rglob("*.safetensors"))   # refused before a step: no file written
    assert FlowSettings().timestep_density == "logit_normal" and FlowSettings().shift == 0.0


@pytest.mark.slow
def test_caption_dropout_over_cached_text(tiny_pipeline, images, tmp_path):
    """Caption dropout no longer needs the encoders: with cached text a dropped caption takes the cached empty
    caption's row. The draws are those of the uncached path (same seed, epoch, batch), and every row equals
    the text encoded from the varied captions."""
    pipe = _frozen(tiny_pipeline)
    common = dict(path=str(images), resolution=32, cache_latents=False, caption_dropout=0.5,
                  cache_dir=str(tmp_path / "cache"))
    run = SimpleNamespace(train=SimpleNamespace(batch_size=4, seed=0))
    datasets = []
    for cached in (True, False):
        d = DataSettings(**common, cache_text=cached)
        ds, text_emb = _dataset(SimpleNamespace(data=d, **vars(run)), load_items(d), pipe, NO_ACCELERATOR, False)
        assert (text_emb is not None) == cached
        datasets.append(ds)
    cached, plain = datasets
    empty, empty_pooled = cached.text_emb[-1], cached.pooled[-1]
    empty_ids = tokenize(pipe.tokenizer, [""])[0]
    dropped = kept = 0
    for epoch in range(3):
        for ds in datasets:
            ds.sampler.set_epoch(epoch)
        a, b = cached[0], plain[0]
        with torch.no_grad():
            emb, pooled = SPECS["sd3"].encode(
                {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")},
                {k: v for k, v in b.items() if k.startswith("input_ids")})
        assert torch.allclose(a["text_emb"], emb, atol=1e-5) and torch.allclose(a["pooled"], pooled, atol=1e-5)
        for row, ids in zip(a["text_emb"], b["input_ids"]):
            is_empty = torch.equal(ids, empty_ids)
            dropped += is_empty
            kept += not is_empty
            assert torch.equal(row, empty) == is_empty
    assert dropped and kept and torch.equal(empty_pooled, cached.pooled[-1])
