"""Flux adapter files: diffusers' layout and kohya's native layout, read by diffusers' own loaders.

diffusers' kohya-Flux converter (`_convert_kohya_flux_lora_to_diffusers`, inside
`FluxPipeline.load_lora_weights`) is an independent reader of our fused native layout; it hard-codes
FLUX.1's widths (3072; single blocks' linear1 = 3 x 3072 + 12288), so the transformer here is built at
FLUX.1 width (24 heads x 128) with one double-stream and one single-stream block (small embeddings). A
tiny CLIP-L stands in for the text encoder kohya names lora_te1_. The final layer is left out: diffusers'
converter drops its keys (named without the `transformer.` prefix); its swapped adaLN halves are the
same code as SD 3's, checked in test_sd3_formats. Expected outputs: the lora_core
model the files were written from, and a hand merge W + alpha/r · B A of the diffusers file's tensors.
kohya's names are spelled out here from sd-scripts' rules (lora_flux.py: "lora_unet_" + the BFL module
path with "." -> "_"), not by our writer.
"""
import json
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from helpers import load_lora_logged
from lora_core import LoraConfig, add_lora, lora_layers, remove_lora
from lora_core.adapter_files import inspect
from lora_sd import formats

TARGETS = (r".*transformer_blocks\.0\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff\.net\.0\.proj|"
           r"norm1_context\.linear)|single_transformer_blocks\.0\.(attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear)")
# sd-scripts' names of the modules adapted above (BFL's module paths)
KOHYA_NAMES = {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
               "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_txt_attn_proj",
               "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_mod_lin",
               "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
               "lora_unet_single_blocks_0_modulation_lin",
               *(f"lora_te1_text_model_encoder_layers_{i}_self_attn_{x}" for i in range(2)
                 for x in ("q_proj", "k_proj", "v_proj", "out_proj"))}
BAD = r"unexpected|unmatched|missing|not found|no lora keys|not .*renamed|ignor|unsupported|incompatible"


def flux1_wide() -> tuple[FluxTransformer2DModel, CLIPTextModel]:
    torch.manual_seed(0)
    t = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128,
                               num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True).eval()
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=1000, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=1)).eval()
    return t, te


def outputs(t, te) -> dict:
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 4, generator=g), torch.randn(1, 3, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(2.0), indexing="ij"), -1).reshape(4, 3)
    ids = torch.randint(0, 1000, (1, 6), generator=g)
    with torch.no_grad():
        out = t(x, ctx, torch.randn(1, 32, generator=g), torch.tensor([0.5]), img_ids, torch.zeros(3, 3),
                torch.tensor([3.5])).sample
        return {"transformer": out, "text_encoder": te(ids).last_hidden_state}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The FLUX.1-wide transformer and CLIP-L (back to their base weights after each test), their base
    outputs, and our kohya and diffusers files of a lora_core adapter with the outputs it gives."""
    t, te = flux1_wide()
    base = outputs(t, te)
    add_lora(t, LoraConfig(r=4, alpha=8.0, target_modules=TARGETS, rank_pattern={"add_k_proj": 2}))
    # all of CLIP's attention, as kohya trains it: diffusers' kohya-Flux text-encoder path tells its key
    # layout by an out_proj LoRA ("to_out_lora") and fails without one
    add_lora(te, LoraConfig(r=2, alpha=1.0, target_modules=r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)"))
    torch.manual_seed(1)
    for m in (t, te):
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    ours = outputs(t, te)
    adapter = formats.from_model({"transformer": t, "text_encoder": te})
    d = tmp_path_factory.mktemp("flux_adapters")
    for fmt in (formats.KOHYA, formats.DIFFUSERS):
        formats.write_adapter(d / f"{fmt}.safetensors", adapter, fmt)
    for m in (t, te):
        remove_lora(m)
    return {"t": t, "te": te, "base": base, "ours": ours, "adapter": adapter,
            "kohya": d / "kohya.safetensors", "diffusers": d / "diffusers.safetensors"}


def assert_same(got: dict, want: dict, base: dict, atol: float = 1e-4) -> None:
    for k in want:
        assert (want[k] - base[k]).abs().max() > 1e-3, f"{k}: the adapter changes nothing (test is void)"
        assert torch.allclose(got[k], want[k], atol=atol, rtol=1e-4), f"{k}: max diff {(got[k] - want[k]).abs().max()}"


def diffusers_outputs(flux, path) -> tuple[dict, list[str], int]:
    """Outputs after FluxPipeline.load_lora_weights(path), its messages, the modules it adapted; unloaded after."""
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=flux["te"], tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux["t"])
    messages = load_lora_logged(pipe, path)
    try:
        n = sum(1 for m in (flux["t"], flux["te"]) for name, _ in m.named_modules() if name.endswith(".lora_A"))
        return outputs(flux["t"], flux["te"]), messages, n
    finally:
        pipe.unload_lora_weights()


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
def test_kohya_flux_file_is_named_and_fused_as_sd_scripts_does(flux):
    sd = load_file(str(flux["kohya"]))
    assert {k.split(".")[0] for k in sd} == KOHYA_NAMES
    # linear1 = q, k, v, MLP input: down stacked (4 x 4 rows), up block-diagonal over 3 x 3072 + 12288 rows
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (16, 3072)
    up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * 3072 + 12288, 16) and not up[:3072, 4:].any() and not up[9216:, :12].any()
    assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 32.0
    assert sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"].shape == (10, 3072)   # 4 + 2 + 4
    meta = inspect(flux["kohya"])
    assert meta["architecture"] == "flux" and meta["streams"] == {"image": 5, "text": 5, "joint": 6}


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_pipeline_reads_our_file_to_our_output(flux, fmt):
    got, messages, n = diffusers_outputs(flux, flux[fmt])
    bad = [m for m in messages if re.search(BAD, m, re.I)]
    assert not bad, bad
    assert n == len(flux["adapter"])
    assert_same(got, flux["ours"], flux["base"])


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
def test_diffusers_file_equals_a_hand_merge(flux):
    sd = load_file(str(flux["diffusers"]))
    with open(flux["diffusers"], "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        packed = json.loads(json.loads(f.read(n))["__metadata__"]["lora_adapter_metadata"])
    models = {"transformer": flux["t"], "text_encoder": flux["te"]}
    saved = {}
    with torch.no_grad():
        for k in sd:
            if k.endswith(".lora_A.weight"):
                comp, p = k[:-len(".lora_A.weight")].split(".", 1)
                p = p[len("text_model."):] if comp == "text_encoder" and not hasattr(flux["te"], "text_model") else p
                alpha = (packed.get(f"{comp}.alpha_pattern") or {}).get(p, packed[f"{comp}.lora_alpha"])
                w = models[comp].get_submodule(p).weight
                saved[w] = w.clone()
                w += float(alpha) / sd[k].shape[0] * sd[k.replace("lora_A", "lora_B")] @ sd[k]
        try:
            assert_same(outputs(flux["t"], flux["te"]), flux["ours"], flux["base"])
        finally:
            for w, old in saved.items():
                w.copy_(old)


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
def test_flux_files_read_back_exactly(flux):
    for fmt in ("kohya", "diffusers"):
        back, _, _ = formats.read_adapter(flux[fmt])
        assert back.arch == "flux", fmt
        back = formats.fit_names(back, {"transformer": flux["t"], "text_encoder": flux["te"]})   # CLIP's text_model.
        assert set(back) == set(flux["adapter"]), fmt
        for k, ml in flux["adapter"].items():
            assert torch.equal(back[k].down, ml.down) and torch.equal(back[k].up, ml.up), (fmt, k)
            assert back[k].alpha == pytest.approx(ml.alpha, rel=1e-6), (fmt, k)


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
def test_import_a_kohya_flux_file_we_did_not_write(flux, tmp_path):
    """Dense fused LoRAs (sd-scripts without split_qkv: every rank feeds every part) and alpha != rank:
    our reader and diffusers' converter give the same transformer."""
    g = torch.Generator().manual_seed(7)
    shapes = {"lora_unet_single_blocks_0_linear1": 21504, "lora_unet_double_blocks_0_txt_attn_qkv": 9216,
              "lora_unet_double_blocks_0_img_mod_lin": 6 * 3072}
    sd = {}
    for name, out in shapes.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(3, 3072, generator=g) * 0.05
        sd[f"{name}.lora_up.weight"] = torch.randn(out, 3, generator=g) * 0.05
        sd[f"{name}.alpha"] = torch.tensor(6.0)
    save_file(sd, str(tmp_path / "theirs.safetensors"))
    want, messages, _ = diffusers_outputs(flux, tmp_path / "theirs.safetensors")
    assert not [m for m in messages if re.search(BAD, m, re.I) and "CLIPTextModel" not in m]   # no te keys: right
    adapter, _, fmt = formats.read_adapter(tmp_path / "theirs.safetensors")
    assert fmt == "kohya" and adapter.arch == "flux" and len(adapter) == 4 + 3 + 1
    comps = {"transformer": flux["t"], "text_encoder": flux["te"]}
    formats.apply_to_components(adapter, comps, source="theirs")
    try:
        got = outputs(flux["t"], flux["te"])
    finally:
        for m in comps.values():
            remove_lora(m)
    assert_same({"transformer": got["transformer"]}, {"transformer": want["transformer"]},
                {"transformer": flux["base"]["transformer"]})


@pytest.mark.slow   # a FLUX.1-wide transformer: 0.5 B parameters
def test_convert_flux_both_ways_exactly(flux, tmp_path):
    formats.convert(flux["kohya"], tmp_path / "d.safetensors", "diffusers")
    formats.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    a, b = load_file(str(flux["kohya"])), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = inspect(tmp_path / "d.safetensors")
    assert s["architecture"] == "flux" and s["modules_by_component"] == {"transformer": 16, "text_encoder": 8}


@pytest.mark.slow
def test_tiny_flux_kohya_file_loads_through_generate(tiny_pipeline, tmp_path):
    """tiny-flux (2 double, 3 single blocks): linear1 with unequal ranks, CLIP-L (lora_te1_) and T5 (Flux's
    text_encoder_2, kohya's lora_te3_); generate's load_adapters gives the trained model's outputs."""
    from lora_sd.generate import load_adapters
    pipe = tiny_pipeline(arch="flux")
    comps = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    base = tiny_outputs(comps)
    add_lora(pipe.transformer, LoraConfig(r=4, alpha=4.0, rank_pattern={"proj_mlp": 2}, target_modules=(
        r".*attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)|.*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)")))
    add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=2.0, target_modules=r".*self_attn\.(q_proj|v_proj)"))
    add_lora(pipe.text_encoder_2, LoraConfig(r=2, alpha=2.0, target_modules=r".*SelfAttention\.[qv]"))
    torch.manual_seed(2)
    for m in comps.values():
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.2)
    want = tiny_outputs(comps)
    formats.write_adapter(tmp_path / "k.safetensors", formats.from_model(comps), formats.KOHYA)
    names = {k.split(".")[0] for k in load_file(str(tmp_path / "k.safetensors"))}
    assert {"lora_unet_single_blocks_2_linear1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= names
    fresh = tiny_pipeline(arch="flux")
    load_adapters(fresh, [(str(tmp_path / "k.safetensors"), 1.0)])
    got = tiny_outputs({"transformer": fresh.transformer, "text_encoder": fresh.text_encoder,
                        "text_encoder_2": fresh.text_encoder_2})
    assert_same(got, want, base)


def tiny_outputs(comps: dict) -> dict:
    t, cfg = comps["transformer"], comps["transformer"].config
    for m in comps.values():
        m.eval()   # T5's dropout
    g = torch.Generator().manual_seed(5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(2.0), torch.arange(2.0), indexing="ij"), -1).reshape(4, 3)
    ids = torch.randint(0, 500, (1, 6), generator=g)
    with torch.no_grad():
        out = t(torch.randn(1, 4, cfg.in_channels, generator=g), torch.randn(1, 3, cfg.joint_attention_dim, generator=g),
                torch.randn(1, cfg.pooled_projection_dim, generator=g), torch.tensor([0.5]), img_ids, torch.zeros(3, 3),
                torch.tensor([3.5]) if cfg.guidance_embeds else None).sample
        return {"transformer": out, **{n: comps[n](ids).last_hidden_state for n in ("text_encoder", "text_encoder_2")}}
