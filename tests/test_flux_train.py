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
from safetensors.torch import load_file

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


# the adapted module names of one block of the tiny Flux transformer (2 double blocks, 3 single blocks)
ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def _double(*blocks, ff: bool = True) -> set:
    return {f"transformer_blocks.{i}.{n}" for i in blocks for n in (*(f"attn.{a}" for a in ATTN), *(FF if ff else ()))}


def _single(*blocks) -> set:
    return {f"single_transformer_blocks.{i}.{n}" for i in blocks for n in SINGLE}


def _adapted(transformer, flow=None, arch: str = "flux", **lora) -> set:
    """The modules that [lora] (and [flow]) of a tiny-<arch> config adapt on a copy of `transformer`."""
    t = copy.deepcopy(transformer)
    cfg = train_config(Path("u"), f"tiny-{arch}", Path("u"), Path("u"), lora=lora, flow=flow or {})
    add_lora(t, lora_for_arch(cfg, SPECS[arch], t))
    return {n for n, _ in lora_layers(t)}


@pytest.mark.slow
def test_flux_presets_and_refusals(tiny_pipeline, images, tmp_path):
    """joint_attn (the default): the double blocks' attention, both streams; attn+ff adds ff / ff_context and the
    single blocks' q/k/v, proj_mlp, proj_out; all_linear the modulation linears; lora.layers picks double
    blocks. A T5 LoRA, a guidance scale without a guidance embedding, sides that do not pack: one line each."""
    tr = tiny_pipeline(arch="flux").transformer
    joint = _double(0, 1, ff=False)
    assert _adapted(tr) == joint
    assert _adapted(tr, target_modules="attn+ff") == _double(0, 1) | _single(0, 1, 2)
    modulation = {f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("norm1.linear", "norm1_context.linear")}
    assert _adapted(tr, target_modules="all_linear") == _double(0, 1) | _single(0, 1, 2) | modulation | {
        f"single_transformer_blocks.{i}.norm.linear" for i in range(3)}
    assert _adapted(tr, layers=[1]) == _double(1, ff=False)
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


@pytest.mark.slow
def test_double_and_single_blocks_are_selected_apart(tiny_pipeline):
    """lora.layers picks the double blocks and flow.single_layers the single blocks (kohya's
    train_double_block_indices / train_single_block_indices), indices or 'top:K', each leaving the other kind
    alone; list targets too. An index beyond the blocks, a selection holding no targeted module, single_layers on
    SD 3.5: one line each, naming the key."""
    tr = tiny_pipeline(arch="flux").transformer
    assert _adapted(tr, target_modules="attn+ff", layers=[1]) == _double(1) | _single(0, 1, 2)
    assert _adapted(tr, {"single_layers": [2, 0]}, target_modules="attn+ff") == _double(0, 1) | _single(0, 2)
    assert _adapted(tr, {"single_layers": "top:1"}, target_modules="all_linear", layers="top:1") == (
        _double(1) | {"transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear"}
        | _single(2) | {"single_transformer_blocks.2.norm.linear"})
    assert _adapted(tr, {"single_layers": [1]}, target_modules=["to_q", "proj_out"]) == {
        "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "single_transformer_blocks.1.attn.to_q",
        "single_transformer_blocks.1.proj_out", "proj_out"}   # the final proj_out is outside the blocks
    refusals = [
        (dict(flow={"single_layers": [3]}, target_modules="attn+ff"),
         r"flow.single_layers: [3] out of range for a 3-layer model (0..2) (flow.single_layers counts flux's single blocks)"),
        (dict(flow={"single_layers": "top:4"}, target_modules="attn+ff"),
         r"flow.single_layers = 'top:4': the model has only 3 layers (flow.single_layers counts flux's single blocks)"),
        (dict(layers=[2]), "lora.layers: [2] out of range for a 2-layer model (0..1) (lora.layers counts flux's double blocks)"),
        (dict(flow={"single_layers": [0]}),
         "flow.single_layers = [0] picks flux's single blocks [0], but lora.target_modules names no module in them (the "
         "presets attn+ff and all_linear train them, joint_attn does not): target them or remove flow.single_layers"),
        (dict(layers=[0], target_modules=r"single_transformer_blocks\..*"),
         "lora.layers = [0] picks flux's double blocks [0], but lora.target_modules names no module in them: target "
         "them or remove lora.layers"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ConfigError) as e:
            _adapted(tr, **kwargs)
        assert str(e.value) == message and e.value.key == message.split()[0].rstrip(":")
    with pytest.raises(ConfigError) as e:
        _adapted(tiny_pipeline(arch="sd3").transformer, {"single_layers": [0]}, "sd3")
    assert str(e.value) == ("flow.single_layers = [0]: model.pretrained = tiny-sd3 is an sd3 model, which has no "
                            "single-stream blocks (Flux has): remove flow.single_layers")


@pytest.mark.slow
def test_a_run_on_picked_blocks_writes_only_those_blocks(images, tmp_path):
    """A 2-step tiny-flux run, attn+ff on double block 1 and single blocks 0 and 2: its kohya file holds
    sd-scripts' names of exactly those blocks (lora_flux.py: "lora_unet_" + the BFL path, "." -> "_"; q, k, v and
    the MLP input fused in linear1), its diffusers file exactly those modules."""
    cfg = train_config(tmp_path / "run", "tiny-flux", images, tmp_path / "cache", loss={"min_snr_gamma": 0.0},
                       lora={"r": 2, "alpha": 2.0, "target_modules": "attn+ff", "layers": [1]},
                       flow={"single_layers": [0, 2]}, train={"max_steps": 2, "checkpoint_every": 0, "lr_warmup_steps": 0})
    assert run_training(cfg)["state"] == "done"
    kohya = {k.split(".")[0] for k in load_file(str(tmp_path / "run" / "test_lora.safetensors"))}
    assert kohya == {f"lora_unet_double_blocks_1_{s}_{m}" for s in ("img", "txt")
                     for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")} | {
        f"lora_unet_single_blocks_{i}_{m}" for i in (0, 2) for m in ("linear1", "linear2")}
    diffusers = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert {k.rsplit(".lora_", 1)[0] for k in diffusers} == {f"transformer.{n}" for n in _double(1) | _single(0, 2)}


@pytest.mark.slow
def test_check_names_a_block_index_beyond_the_model_in_one_line(images, tmp_path, capsys):
    """`lora-sd check` loads the model and reports flow.single_layers beyond its single blocks as one error line,
    before any step."""
    from lora_sd.cli import main
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\npretrained = "tiny-flux"\n[data]\npath = "{images}"\n'
                   f'resolution = 32\ncache_dir = "{tmp_path / "cache"}"\n[lora]\ntarget_modules = "attn+ff"\n'
                   '[flow]\nsingle_layers = [1, 3]\n')
    assert main(["check", "--config", str(cfg), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("error")] == [
        "error: flow.single_layers: [3] out of range for a 3-layer model (0..2) (flow.single_layers counts flux's "
        "single blocks)"]
    assert "steps:" not in out
