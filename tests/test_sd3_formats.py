"""SD 3.x adapter files: diffusers' layout and kohya's / ComfyUI's native MMDiT layout, in and out.

Independent references:
- diffusers' own `StableDiffusion3Pipeline.load_lora_weights` loads our diffusers file; its, PEFT's and
  transformers' logs and warnings are checked for unmatched keys;
- the expected outputs are hand merges W + alpha/r · up @ down computed here from the files' tensors:
  for a native (kohya) file with the native module's ΔW cut into its diffusers parts by the rules of
  diffusers' single-file converter (convert_sd3_transformer_checkpoint_to_diffusers): qkv = q, k, v
  stacked in equal thirds; the context-pre-only last block's context adaLN and the final layer's adaLN
  with their (shift, scale) halves swapped by diffusers' own `swap_scale_shift`;
- kohya's names are spelled out here from sd-scripts' rules (lora_sd3.py: "lora_unet_" + the native
  module path with "." -> "_", text encoders lora_te1_ / lora_te2_ / lora_te3_), not by our writer.
"""
import copy
import json
import re

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import swap_scale_shift
from safetensors.torch import load_file, save_file

from helpers import load_lora_logged
from lora_core import LoraConfig, LoraLoadError, add_lora, lora_layers
from lora_core.adapter_files import inspect
from lora_sd import formats

TE = ("text_encoder", "text_encoder_2", "text_encoder_3")
JOINT_ATTN = r".*attn2?\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
EXTRA = r"|.*\.ff\.net\.0\.proj|.*norm1_context\.linear|norm_out\.linear"   # mlp fc1, both swapped adaLNs
CLIP_ATTN, T5_ATTN = r".*self_attn\.(q_proj|v_proj)", r".*SelfAttention\.(q|v)"
# sd-scripts' native names of the diffusers modules (joint block i), from the single-file converter
NATIVE = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block_attn_proj": ("attn.to_out.0",),
          "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block_attn2_proj": ("attn2.to_out.0",),
          "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "context_block_attn_proj": ("attn.to_add_out",), "x_block_mlp_fc1": ("ff.net.0.proj",),
          "context_block_adaLN_modulation_1": ("norm1_context.linear",)}
TE_PREFIX = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}


def components(pipe) -> dict:
    return {"transformer": pipe.transformer, **{n: getattr(pipe, n) for n in TE}}


@pytest.fixture(scope="module")
def base(tiny_pipeline):
    return tiny_pipeline(arch="sd3")


def fresh(base) -> dict:
    return {k: copy.deepcopy(m).eval() for k, m in components(base).items()}


def _randomize(comps: dict) -> None:
    torch.manual_seed(1)
    for m in comps.values():
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)


@pytest.fixture(scope="module")
def ours(base, tmp_path_factory):
    """Our kohya and diffusers files of a lora_core adapter on the joint attention of both streams (the
    dual attention too; add_k_proj at another rank), mlp fc1, both swapped adaLNs and the three text
    encoders, B random; the diffusers file without T5 (diffusers' SD 3 loader has no text_encoder_3)."""
    comps = fresh(base)
    add_lora(comps["transformer"], LoraConfig(r=4, alpha=8.0, target_modules=JOINT_ATTN + EXTRA,
                                              rank_pattern={r"add_k_proj": 2}))
    add_lora(comps["text_encoder"], LoraConfig(r=2, alpha=1.0, target_modules=CLIP_ATTN))
    add_lora(comps["text_encoder_2"], LoraConfig(r=3, alpha=6.0, target_modules=CLIP_ATTN))
    add_lora(comps["text_encoder_3"], LoraConfig(r=2, alpha=2.0, target_modules=T5_ATTN))
    _randomize(comps)
    d = tmp_path_factory.mktemp("sd3_adapters")
    adapter = formats.from_model(comps)
    no_t5 = formats.Adapter({k: v for k, v in adapter.items() if not k.startswith("text_encoder_3.")}, arch="sd3")
    formats.write_adapter(d / "kohya.safetensors", adapter, formats.KOHYA)
    formats.write_adapter(d / "diffusers.safetensors", no_t5, formats.DIFFUSERS)
    formats.write_adapter(d / "diffusers_t5.safetensors", adapter, formats.DIFFUSERS)
    return {"kohya": d / "kohya.safetensors", "diffusers": d / "diffusers.safetensors",
            "diffusers_t5": d / "diffusers_t5.safetensors", "adapter": adapter, "model": comps}


# ------------------------------------------------------------------ hand merges and outputs
def _metadata(path) -> dict:
    with open(path, "rb") as f:   # the safetensors header: JSON after an 8-byte length
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]


def _text_module(comps, comp, path):
    model = comps[comp]
    return model.get_submodule(path[len("text_model."):] if path.startswith("text_model.") and not hasattr(model, "text_model") else path)


def native_deltas(comps: dict, sd: dict) -> dict:
    """{(component, module path): ΔW} of a native SD 3 kohya state dict, by the rules in the docstring."""
    blocks = comps["transformer"].transformer_blocks
    out = {}
    for k in sd:
        if not k.endswith(".lora_down.weight"):
            continue
        b = k[:-len(".lora_down.weight")]
        down, up = sd[k].float(), sd[f"{b}.lora_up.weight"].float()
        delta = float(sd[f"{b}.alpha"]) / down.shape[0] * up @ down
        m = re.fullmatch(r"lora_unet_joint_blocks_(\d+)_(.+)", b)
        if m:
            i, parts = int(m.group(1)), NATIVE[m.group(2)]
            if m.group(2) == "context_block_adaLN_modulation_1" and blocks[i].context_pre_only:
                delta = swap_scale_shift(delta)
            for p, d in zip(parts, delta.chunk(len(parts))):
                out["transformer", f"transformer_blocks.{i}.{p}"] = d
        elif b == "lora_unet_final_layer_adaLN_modulation_1":
            out["transformer", "norm_out.linear"] = swap_scale_shift(delta)
        else:
            prefix = next(p for p in TE_PREFIX if b.startswith(p))
            comp = TE_PREFIX[prefix]
            path = b[len(prefix):].replace("_", ".").replace("self.attn", "self_attn").replace("q.proj", "q_proj") \
                .replace("v.proj", "v_proj").replace("text.model", "text_model")
            out[comp, path] = delta
    return out


def diffusers_deltas(path) -> dict:
    sd, packed = load_file(str(path)), json.loads(_metadata(path)["lora_adapter_metadata"])
    out = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            comp, p = k[:-len(".lora_A.weight")].split(".", 1)
            down, up = sd[k], sd[k.replace("lora_A", "lora_B")]
            out[comp, p] = float(packed[f"{comp}.lora_alpha"]) / down.shape[0] * up @ down
    return out


def merged(base, deltas: dict) -> dict:
    comps = fresh(base)
    with torch.no_grad():
        for (comp, p), d in deltas.items():
            _text_module(comps, comp, p).weight += d
    return comps


def outputs(comps: dict) -> dict:
    t = comps["transformer"]
    cfg = t.config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 6, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    ids = torch.randint(0, 500, (1, 8), generator=g)
    with torch.no_grad():
        out = {"transformer": t(x, ctx, pooled, torch.tensor([500.0])).sample}
        out.update({n: comps[n](ids).last_hidden_state for n in TE})
    return out


def assert_same(got: dict, want: dict, base_out: dict, keys=("transformer", *TE), atol: float = 1e-5) -> None:
    for k in keys:
        assert (want[k] - base_out[k]).abs().max() > 1e-3, f"{k}: the adapter changes nothing (test is void)"
        assert torch.allclose(got[k], want[k], atol=atol, rtol=1e-4), f"{k}: max diff {(got[k] - want[k]).abs().max()}"


# ------------------------------------------------------------------ tests
def test_kohya_sd3_file_is_named_and_fused_as_kohya_does(base, ours):
    sd, meta = load_file(str(ours["kohya"])), _metadata(ours["kohya"])
    bases = {k.split(".")[0] for k in sd}
    blocks = base.transformer.transformer_blocks
    want = {f"lora_unet_joint_blocks_{i}_{leaf}" for i, blk in enumerate(blocks) for leaf in NATIVE
            if not (leaf.startswith("x_block_attn2") and blk.attn2 is None)
            and not (leaf in ("context_block_attn_proj",) and blk.context_pre_only)}
    want |= {"lora_unet_final_layer_adaLN_modulation_1"}
    want |= {f"{p}text_model_encoder_layers_{i}_self_attn_{x}_proj" for p in ("lora_te1_", "lora_te2_")
             for i in range(2) for x in "qv"}
    want |= {f"lora_te3_encoder_block_{i}_layer_0_SelfAttention_{x}" for i in range(2) for x in "qv"}
    assert bases == want
    h = blocks[0].attn.to_q.in_features
    # q, k, v: down stacked (4 + 4 rows), up block-diagonal, alpha = alpha/r · the fused rank
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (12, h)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * h, 12)
    assert float(sd["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 24.0
    assert sd["lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight"].shape == (10, h)   # 4 + 2 + 4
    assert meta["ss_base_model_version"] == "sd3" and meta["modelspec.architecture"] == "stable-diffusion-3/lora"


@pytest.mark.slow
def test_diffusers_loads_our_file_with_no_unmatched_key(base, ours):
    pipe = copy.deepcopy(base)
    messages = load_lora_logged(pipe, ours["diffusers"])
    bad = [m for m in messages if re.search(r"unexpected|unmatched|missing|not found|no lora keys|not .*renamed|ignor",
                                            m, re.I)]
    assert not bad, bad
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        n = sum(1 for n, _ in getattr(pipe, comp).named_modules() if n.endswith(".lora_A"))
        assert n == sum(1 for k in ours["adapter"] if k.startswith(comp + ".")), comp
    want = outputs(merged(base, diffusers_deltas(ours["diffusers"])))
    assert_same(outputs(components(pipe)), want, outputs(fresh(base)), ("transformer", "text_encoder", "text_encoder_2"))


@pytest.mark.slow
def test_both_files_equal_the_hand_merge_and_the_trained_model(base, ours):
    want = outputs(merged(base, native_deltas(fresh(base), load_file(str(ours["kohya"])))))
    assert_same(outputs(ours["model"]), want, outputs(fresh(base)))
    assert_same(outputs(merged(base, diffusers_deltas(ours["diffusers_t5"]))), want, outputs(fresh(base)))
    for fmt in ("kohya", "diffusers_t5"):
        comps = fresh(base)
        adapter, _, _ = formats.read_adapter(ours[fmt], comps)
        assert formats.apply_to_components(adapter, comps, source=str(ours[fmt])) == len(ours["adapter"])
        assert_same(outputs(comps), want, outputs(fresh(base)))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers_t5"])
def test_files_read_back_exactly(ours, fmt):
    back, meta, _ = formats.read_adapter(ours[fmt])
    assert back.arch == "sd3" and set(back) == set(ours["adapter"])
    for k, ml in ours["adapter"].items():
        assert torch.equal(back[k].down, ml.down) and torch.equal(back[k].up, ml.up), k
        assert back[k].alpha == pytest.approx(ml.alpha, rel=1e-6), k
    assert back["transformer.transformer_blocks.0.attn.add_k_proj"].rank == 2


def foreign_kohya(base, seed: int = 3) -> dict:
    """A kohya SD 3 file as sd-scripts writes one without split_qkv: one dense LoRA per native qkv (every
    rank feeds q, k and v), the last block's context adaLN, te1/te2/te3; alpha != rank; no metadata."""
    g = torch.Generator().manual_seed(seed)
    t = base.transformer
    h = t.transformer_blocks[0].attn.to_q.in_features
    shapes = {"lora_unet_joint_blocks_0_x_block_attn_qkv": (h, 3 * h), "lora_unet_joint_blocks_1_context_block_attn_qkv": (h, 3 * h),
              "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1": (h, 2 * h),
              "lora_unet_joint_blocks_1_x_block_attn2_proj": (h, h),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (base.text_encoder.config.hidden_size,) * 2,
              "lora_te2_text_model_encoder_layers_1_self_attn_v_proj": (base.text_encoder_2.config.hidden_size,) * 2,
              "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (base.text_encoder_3.config.d_model,
                                                                   base.text_encoder_3.config.num_heads * base.text_encoder_3.config.d_kv)}
    sd = {}
    for name, (i, o) in shapes.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(3, i, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 3, generator=g) * 0.5
        sd[f"{name}.alpha"] = torch.tensor(1.5)
    return sd


@pytest.mark.slow
def test_import_a_kohya_sd3_file_we_did_not_write(base, tmp_path):
    sd = foreign_kohya(base)
    save_file(sd, str(tmp_path / "theirs.safetensors"))
    assert inspect(tmp_path / "theirs.safetensors")["architecture"] == "sd3"
    comps = fresh(base)
    adapter, _, fmt = formats.read_adapter(tmp_path / "theirs.safetensors", comps)
    assert fmt == "kohya" and adapter.arch == "sd3"
    assert formats.apply_to_components(adapter, comps, source="theirs") == 11   # 3 + 3 + 1 + 1, 3 text encoders
    want = outputs(merged(base, native_deltas(fresh(base), sd)))
    assert_same(outputs(comps), want, outputs(fresh(base)))
    # and written again in both layouts, it is the same adapter
    for fmt in (formats.KOHYA, formats.DIFFUSERS):
        formats.write_adapter(tmp_path / f"again_{fmt}.safetensors", adapter, fmt)
        again, _, _ = formats.read_adapter(tmp_path / f"again_{fmt}.safetensors")
        for k, ml in adapter.items():
            got = again[k].alpha / again[k].rank * again[k].up @ again[k].down
            assert torch.allclose(got, ml.alpha / ml.rank * ml.up @ ml.down, atol=1e-6), k


def test_convert_both_ways_and_inspect(ours, tmp_path):
    formats.convert(ours["kohya"], tmp_path / "d.safetensors", "diffusers")
    formats.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    a, b = load_file(str(ours["kohya"])), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path in (ours["kohya"], tmp_path / "d.safetensors"):
        s = inspect(path)
        assert s["architecture"] == "sd3" and s["modules"] == len(ours["adapter"])
        assert s["modules_by_component"] == {"transformer": 38, "text_encoder": 4, "text_encoder_2": 4, "text_encoder_3": 4}
        assert s["streams"] == {"image": 23, "text": 14, "other": 1}
        assert [b for b in s["blocks"] if b.startswith("transformer.")] == ["transformer.norm_out"] + [
            f"transformer.transformer_blocks.{i}" for i in range(3)]


def test_load_report_and_refusals(base, ours, tmp_path, tiny_pipeline):
    adapter, _, _ = formats.read_adapter(ours["kohya"])
    rep = formats.load_report(adapter, components(base), str(ours["kohya"]))
    assert rep.fits and len(rep.matched) == len(adapter) and rep.made_for.startswith("sd3")
    sd1 = tiny_pipeline()
    with pytest.raises(LoraLoadError, match=r"of 50 adapted modules match this pipeline, 46 do not.*the pipeline has no"):
        formats.apply_to_components(adapter, {"unet": sd1.unet, "text_encoder": sd1.text_encoder}, source="f")
    bad = {"lora_unet_joint_blocks_0_x_block_attn_qkvz.lora_down.weight": torch.zeros(2, 4),
           "lora_unet_joint_blocks_0_x_block_attn_qkvz.lora_up.weight": torch.zeros(4, 2)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraLoadError, match="x_block_attn_qkvz is no module of sd3"):
        formats.read_adapter(tmp_path / "bad.safetensors")
    dora = formats.Adapter({k: formats.ModuleLora(m.down, m.up, m.alpha, torch.ones(m.up.shape[0]))
                            for k, m in adapter.items() if k.endswith("attn.to_q")}, arch="sd3")
    with pytest.raises(ValueError, match="DoRA on modules that one native module fuses"):
        formats.write_adapter(tmp_path / "dora.safetensors", dora, formats.KOHYA)


@pytest.mark.slow
def test_merge_folds_a_kohya_sd3_file_into_a_plain_pipeline(base, ours, tmp_path):
    from lora_sd.cli import main as cli
    from lora_sd.models import load_pipeline
    out = tmp_path / "merged"
    assert cli(["merge", "--model", "tiny-sd3", "--lora", f"{ours['kohya']}:0.5", "--out", str(out)]) == 0
    pipe = load_pipeline(str(out))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert not any(list(lora_layers(m)) for m in components(pipe).values())
    half = {k: 0.5 * d for k, d in native_deltas(fresh(base), load_file(str(ours["kohya"]))).items()}
    assert_same(outputs(components(pipe)), outputs(merged(base, half)), outputs(fresh(base)))
    info = json.loads((out / "merged_adapters.json").read_text())
    assert info[0]["metadata"]["ss_base_model_version"] == "sd3"
