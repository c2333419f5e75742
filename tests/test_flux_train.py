"""Flux training on the SD 3.5 machinery (lora_sd.flow, lora_sd.archs) with the tiny Flux pipeline: the cached
text equals FluxPipeline.encode_prompt, packed latents and position ids equal the pipeline's, the
resolution-dependent shift equals diffusers' computation, a training forward equals a hand computation, the
presets, the loss on a fixed batch."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lora_core import add_lora, lora_layers, lora_parameters
from lora_core.errors import ConfigError
from lora_sd.archs import SPECS, image_ids, pack_latents, unpack_latents
from lora_sd.flow import FlowMatch, flux_mu, time_shift, timestep_density
from lora_sd.testing import make_images, train_config
from lora_sd.text_cache import TextCache
from lora_sd.train import _add_adapters, lora_for_arch, run_training
from helpers import fit_fixed_batch, flow_loss_module, frozen_pipeline



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_data") / "images"
    make_images(root, 4, size=(40, 32))
    return root


def _frozen(tiny_pipeline):
    return frozen_pipeline(tiny_pipeline, "flux")


def test_packing_and_position_ids_equal_the_pipelines():
    lat = torch.randn(2, 16, 6, 10)
    packed = pack_latents(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    assert torch.equal(unpack_latents(packed, 6, 10), lat)
    assert torch.equal(image_ids(6, 10, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


@pytest.mark.slow
def test_resolution_shift_equals_diffusers(tiny_pipeline):
    """flux_shift: mu as FluxPipeline computes it from the packed sequence length (calculate_shift with the
    scheduler's settings), σ as the scheduler's exponential time shift; FlowMatch.sample with the sigmoid density
    draws exactly those σ, timestep σ·1000."""
    sched = tiny_pipeline(arch="flux").scheduler
    config = sched.config
    u = torch.rand(64, generator=torch.Generator().manual_seed(0)).clamp(1e-3, 1 - 1e-3)
    for seq_len in (16, 256, 1024, 4096):
        mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                             config["max_shift"])
        assert flux_mu(seq_len, config) == pytest.approx(mu, abs=1e-12)
        assert torch.equal(time_shift(mu, u), sched.time_shift(mu, 1.0, u))
    flow = FlowMatch(config, "sigmoid", sigmoid_scale=1.3, flux_shift=True)
    x0, noise = torch.randn(3, 16, 64, 64), torch.randn(3, 16, 64, 64)   # 32 x 32 = 1024 packed tokens
    torch.manual_seed(4)
    got = flow.sample(x0, noise)
    torch.manual_seed(4)
    sigmas = time_shift(flux_mu(1024, config), torch.sigmoid(1.3 * torch.randn(3)))
    assert torch.equal(got.timestep, sigmas * 1000)
    assert torch.equal(got.noisy, (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise)
    assert torch.equal(timestep_density("sigmoid", 5, sigmoid_scale=1.3, generator=torch.Generator().manual_seed(2)),
                       torch.sigmoid(1.3 * torch.randn(5, generator=torch.Generator().manual_seed(2))))


@pytest.mark.slow
def test_cached_text_equals_the_pipelines_encode_prompt(tiny_pipeline, tmp_path):
    """T5's sequence (512 tokens) and CLIP-L's pooled output, exactly as FluxPipeline.encode_prompt."""
    pipe = _frozen(tiny_pipeline)
    captions = ["a photo of a thing 0", ""]
    emb, pooled = TextCache(tmp_path / "text", SPECS["flux"], pipe).get(captions)
    for k, caption in enumerate(captions):
        ref, ref_pooled, text_ids = pipe.encode_prompt(caption, caption)
        assert emb[k:k + 1].shape == ref.shape == (1, 512, 64) and text_ids.shape == (512, 3)
        assert torch.equal(emb[k:k + 1], ref) and torch.equal(pooled[k:k + 1], ref_pooled), caption


def _loss_module(pipe, images, tmp_path, *, text_cached: bool, guidance: float = 1.0, **flow):
    return flow_loss_module(pipe, images, tmp_path / "cache", text_cached=text_cached, guidance=guidance, **flow)


@pytest.mark.slow
def test_training_forward_equals_a_hand_computation(tiny_pipeline, images, tmp_path):
    """The transformer sees the packed (1 − σ)·x_0 + σ·ε (x_0 the VAE sample shifted and scaled by Flux's
    factors), timestep σ, dev's guidance constant, the position ids of the packed latents and zero text ids; the
    loss is the mean of (unpacked prediction − (ε − x_0))²."""
    pipe = _frozen(tiny_pipeline)
    ds, module = _loss_module(pipe, images, tmp_path, text_cached=True, guidance=3.5, density="uniform")
    batch = ds[0]
    seen = {}
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.update(kw, out=out.sample),
                                                  with_kwargs=True)
    try:
        torch.manual_seed(5)
        loss = module(batch)
    finally:
        hook.remove()
    torch.manual_seed(5)
    mean, logvar = batch["latent_params"].chunk(2, dim=1)
    x0 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) - 0.1159) * 0.3611
    eps = torch.randn_like(x0)
    sigma = flow_sigma = (1000 - (torch.rand(x0.shape[0]) * 1000).long()).float() / 1000   # Flux: unshifted table
    s = sigma.view(-1, 1, 1, 1)
    b, c, h, w = x0.shape
    assert torch.allclose(seen["hidden_states"], FluxPipeline._pack_latents((1 - s) * x0 + s * eps, b, c, h, w), atol=1e-6)
    assert torch.allclose(seen["timestep"], flow_sigma, atol=1e-6) and torch.equal(seen["guidance"], torch.full((b,), 3.5))
    assert torch.equal(seen["img_ids"], FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32))
    assert torch.equal(seen["txt_ids"], torch.zeros(512, 3)) and torch.equal(seen["encoder_hidden_states"], batch["text_emb"])
    pred = FluxPipeline._unpack_latents(seen["out"], h * 4, w * 4, 4)
    assert torch.allclose(loss, ((pred - (eps - x0)) ** 2).mean(), rtol=1e-5)


@pytest.mark.slow
def test_flux_loss_decreases_on_fixed_batch(tiny_pipeline, images, tmp_path):
    pipe = _frozen(tiny_pipeline)
    torch.manual_seed(0)
    cfg = train_config(Path("unused"), "tiny-flux", images, tmp_path, lora={"r": 4, "alpha": 4.0, "target_modules": "attn+ff"})
    _add_adapters(cfg, pipe)
    ds, module = _loss_module(pipe, images, tmp_path, text_cached=False, guidance=3.5)
    batch = ds[0]
    assert batch["input_ids_2"].shape[1] == 512 and "input_ids_3" not in batch
    before, after = fit_fixed_batch(module, batch, lora_parameters(pipe.transformer), steps=20, lr=3e-2)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_flux_presets_and_refusals(tiny_pipeline, images, tmp_path):
    """joint_attn (the default): the double blocks' attention, both streams; attn+ff adds ff / ff_context and the
    single blocks' q/k/v, proj_mlp, proj_out; all_linear the modulation linears; lora.layers picks double
    blocks. A T5 LoRA, a guidance scale without a guidance embedding, sides that do not pack: one line each."""
    tr = tiny_pipeline(arch="flux").transformer

    def adapted(**lora):
        t = copy.deepcopy(tr)
        add_lora(t, lora_for_arch(train_config(Path("u"), "tiny-flux", Path("u"), Path("u"), lora=lora), SPECS["flux"], t))
        return {n for n, _ in lora_layers(t)}
    attn = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    joint = {f"transformer_blocks.{i}.attn.{n}" for i in (0, 1) for n in attn}
    assert adapted() == joint
    ff = {f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                                   "ff_context.net.2")}
    single = {f"single_transformer_blocks.{i}.{n}" for i in range(3) for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                               "proj_mlp", "proj_out")}
    assert adapted(target_modules="attn+ff") == joint | ff | single
    modulation = {f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("norm1.linear", "norm1_context.linear")}
    assert adapted(target_modules="all_linear") == joint | ff | single | modulation | {
        f"single_transformer_blocks.{i}.norm.linear" for i in range(3)}
    assert adapted(layers=[1]) == {n for n in joint if n.startswith("transformer_blocks.1.")}
    with pytest.raises(ConfigError, match=r"^text_encoder_2_lora: flux's second text encoder is T5"):
        _add_adapters(train_config(tmp_path, "tiny-flux", images, tmp_path, text_encoder_2_lora={"r": 2}),
                      _frozen(tiny_pipeline))
    schnell = train_config(tmp_path / "s", "tiny-flux-schnell", images, tmp_path, loss={"min_snr_gamma": 0.0},
                           flow={"guidance_scale": 3.5})
    with pytest.raises(ConfigError, match=r"^flow.guidance_scale = 3.5: tiny-flux-schnell has no guidance embedding"):
        run_training(schnell)
    odd = train_config(tmp_path / "o", "tiny-flux", images, tmp_path, loss={"min_snr_gamma": 0.0},
                       data={"resolution": 40})
    pipe = _frozen(tiny_pipeline)
    pipe.vae_scale_factor = 8   # FLUX.1's VAE (the tiny one downscales 4x): sides must be multiples of 16
    with pytest.raises(ConfigError, match=r"^data.resolution = 40: flux takes 2x2 latent patches, so image sides must be multiples of 16"):
        run_training(odd, pipe=pipe)
