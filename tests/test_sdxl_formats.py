"""SDXL and SD 2.x adapter files: kohya's SGM names, the UNet layout, reading and writing both formats.

The tiny SDXL pipeline (lora_sd.models) is laid out like the released SDXL UNet, so kohya's SGM names
(input_blocks_4_1, middle_block_1, output_blocks_0_1) exist in it. Independent references:
- diffusers' own `StableDiffusionXLPipeline.load_lora_weights` loads our kohya and diffusers files, and
  its own logs and warnings are checked for unmatched keys, not only ours;
- the expected outputs are a hand merge W + alpha/r · up @ down computed here from the file's tensors;
- kohya's SDXL names are built here from kohya's rules (sd-scripts' SDXL UNet: input_blocks[0] = conv_in,
  then per level `layers_per_block` [ResNet, Transformer] entries and a Downsample between levels;
  middle_block = [ResNet, Transformer, ResNet]; output_blocks: per level layers_per_block + 1 entries;
  LoRA name = "lora_unet_" / "lora_te1_" / "lora_te2_" + module path with "." -> "_"; the text encoders
  under transformers' CLIP names "text_model.encoder.layers.N..."), not by our writer or unet_names.
"""
import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core import LoraConfig, LoraLoadError, add_lora, lora_layers
from lora_core.adapter_files import inspect
from lora_sd import formats
from lora_sd.config import CROSS_ATTN, TEXT_ENCODER_ATTN
from lora_sd.models import build_tiny_pipeline
from helpers import load_lora_logged

TE = ("text_encoder", "text_encoder_2")
N_MODULES = {"unet": 68, "text_encoder": 12, "text_encoder_2": 12}   # attn2 q/k/v/out of 17 transformer blocks


# ------------------------------------------------------------------ kohya's SDXL naming rules, by hand
def kohya_sdxl_name(comp: str, path: str) -> str:
    """kohya's LoRA name of a module of the SDXL UNet (attention blocks) or a text encoder."""
    if comp != "unet":
        path = path if path.startswith("text_model.") else "text_model." + path
        return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[comp] + path.replace(".", "_")
    lpb = 2   # SDXL: two layers per level; level 0 (DownBlock2D / UpBlock2D) has no attention
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        sgm = f"input_blocks.{1 + i * (lpb + 1) + j}.1.{rest}"   # +1 per level: its Downsample
    elif path.startswith("mid_block.attentions.0."):
        sgm = "middle_block.1." + path[len("mid_block.attentions.0."):]
    else:
        m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        sgm = f"output_blocks.{i * (lpb + 1) + j}.1.{rest}"
    return "lora_unet_" + sgm.replace(".", "_")


def _linears(comps: dict, comp: str, pattern: str) -> dict:
    return {n: m for n, m in comps[comp].named_modules() if re.fullmatch(pattern, n) and isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------ fixtures
def _components(pipe) -> dict:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


@pytest.fixture(scope="module")
def base(tiny_pipeline):
    return tiny_pipeline(arch="sdxl")


def _fresh(base) -> dict:
    return {k: copy.deepcopy(m).eval() for k, m in _components(base).items()}


@pytest.fixture(scope="module")
def ours(base, tmp_path_factory):
    """Our kohya and diffusers files of a lora_core adapter on attn2 and both text encoders, B random."""
    comps = _fresh(base)
    torch.manual_seed(1)
    add_lora(comps["unet"], LoraConfig(r=4, alpha=8.0, target_modules=CROSS_ATTN))
    add_lora(comps["text_encoder"], LoraConfig(r=2, alpha=1.0, target_modules=TEXT_ENCODER_ATTN))
    add_lora(comps["text_encoder_2"], LoraConfig(r=3, alpha=6.0, target_modules=TEXT_ENCODER_ATTN))
    for m in comps.values():
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    d = tmp_path_factory.mktemp("sdxl_adapters")
    adapter = formats.from_model(comps)
    formats.write_adapter(d / "kohya.safetensors", adapter, formats.KOHYA, {"ss_network_module": "networks.lora"})
    formats.write_adapter(d / "diffusers.safetensors", adapter, formats.DIFFUSERS)
    return {"kohya": d / "kohya.safetensors", "diffusers": d / "diffusers.safetensors", "adapter": adapter}


# ------------------------------------------------------------------ hand merge and outputs
def _kohya_modules(comps: dict, diffusers_unet_names: bool = True) -> dict:
    """{kohya SDXL name: (component, module path)} of the attn2 and text-encoder attention modules."""
    out = {}
    for comp, pattern in (("unet", CROSS_ATTN), ("text_encoder", TEXT_ENCODER_ATTN), ("text_encoder_2", TEXT_ENCODER_ATTN)):
        out.update({kohya_sdxl_name(comp, n): (comp, n) for n in _linears(comps, comp, pattern)})
        if comp == "unet" and diffusers_unet_names:   # diffusers' convert_state_dict_to_kohya keeps diffusers' UNet names
            out.update({"lora_unet_" + n.replace(".", "_"): (comp, n) for n in _linears(comps, comp, pattern)})
    return out


def _strip(comp_model, path: str) -> str:
    """transformers 5's CLIPTextModel has no `text_model.` level; files name it."""
    return path[len("text_model."):] if path.startswith("text_model.") and not hasattr(comp_model, "text_model") else path


def hand_merged(base, path, fmt: str) -> dict:
    """Fresh components with W += alpha/r · up @ down of every module of the file, from its tensors."""
    comps = _fresh(base)
    sd = load_file(str(path))
    deltas = {}   # (comp, path) -> (down, up, alpha)
    if fmt == "kohya":
        names = _kohya_modules(comps)
        for k in sd:
            if k.endswith(".lora_down.weight"):
                b = k[:-len(".lora_down.weight")]
                deltas[names[b]] = (sd[k], sd[f"{b}.lora_up.weight"], float(sd[f"{b}.alpha"]))
    else:
        with open(path, "rb") as f:   # the safetensors header: JSON after an 8-byte length
            n = int.from_bytes(f.read(8), "little")
            packed = json.loads(json.loads(f.read(n))["__metadata__"]["lora_adapter_metadata"])
        for k in sd:
            if k.endswith(".lora_A.weight"):
                comp, p = k[:-len(".lora_A.weight")].split(".", 1)
                assert not packed.get(f"{comp}.alpha_pattern") and not packed.get(f"{comp}.rank_pattern")
                deltas[(comp, p)] = (sd[k], sd[k.replace("lora_A", "lora_B")], float(packed[f"{comp}.lora_alpha"]))
    with torch.no_grad():
        for (comp, p), (down, up, alpha) in deltas.items():
            lin = comps[comp].get_submodule(_strip(comps[comp], p))
            lin.weight += (alpha / down.shape[0]) * up.float() @ down.float()
    return comps


def outputs(comps: dict) -> dict:
    g = torch.Generator().manual_seed(5)
    x, ehs = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 8, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    ids = torch.randint(0, 500, (1, 12), generator=g)
    with torch.no_grad():
        te2 = comps["text_encoder_2"](ids, output_hidden_states=True)
        return {"unet": comps["unet"](x, torch.tensor([10]), ehs, added_cond_kwargs=cond).sample,
                "text_encoder": comps["text_encoder"](ids)[0], "text_encoder_2": te2[0], "text_encoder_2.hidden": te2[1]}


def assert_same(got: dict, want: dict, base_out: dict, atol: float = 1e-5) -> None:
    for k in want:
        assert (want[k] - base_out[k]).abs().max() > 1e-3, f"{k}: the adapter changes nothing (test is void)"
        assert torch.allclose(got[k], want[k], atol=atol, rtol=1e-4), f"{k}: max diff {(got[k] - want[k]).abs().max()}"


def diffusers_load(base, path):
    """Load `path` with diffusers' own loader into a copy of the tiny SDXL pipeline; (pipe, every message
    diffusers, PEFT and transformers logged or warned)."""
    pipe = copy.deepcopy(base)
    return pipe, load_lora_logged(pipe, path)


# ------------------------------------------------------------------ tests
def test_kohya_sdxl_file_is_named_as_kohya_names_it(base, ours):
    sd, meta = formats.read_safetensors(ours["kohya"])
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert bases == set(_kohya_modules(_fresh(base), diffusers_unet_names=False))   # 12 + 2 mid + 18 up attn2 ... built by hand
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in bases
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0" in bases
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k" in bases
    assert {b.split("_")[1] for b in bases} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["lora_sd.unet_layout"])["layers_per_block"] == 2
    dsd, _ = formats.read_safetensors(ours["diffusers"])
    assert {k.split(".")[0] for k in dsd} == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_our_file_with_no_unmatched_key(base, ours, fmt):
    pipe, messages = diffusers_load(base, ours[fmt])
    bad = [m for m in messages if re.search(r"unexpected|unmatched|missing|not found|no lora keys|not .*renamed|ignor",
                                            m, re.I)]
    assert not bad, bad
    assert any("text_encoder_2" in m for m in messages)   # diffusers did load the second text encoder
    for comp in ("unet", *TE):
        n = sum(1 for n, _ in getattr(pipe, comp).named_modules() if n.endswith(".lora_A"))
        assert n == N_MODULES[comp], (comp, n)
    assert_same(outputs(_components(pipe)), outputs(hand_merged(base, ours[fmt], fmt)), outputs(_fresh(base)))


@pytest.mark.slow
def test_our_importer_matches_the_hand_merge(base, ours):
    want = outputs(hand_merged(base, ours["kohya"], "kohya"))
    for fmt in ("kohya", "diffusers"):
        comps = _fresh(base)
        adapter, _, got_fmt = formats.read_adapter(ours[fmt], comps)
        assert got_fmt == fmt
        assert formats.apply_to_components(adapter, comps, source=str(ours[fmt])) == 92
        assert_same(outputs(comps), want, outputs(_fresh(base)))
        rep = formats.load_report(adapter, _components(base), str(ours[fmt]))
        unet_blocks = [b for b in inspect(ours[fmt])["blocks"] if b.startswith("unet.")]
        assert rep.fits and [b for b in sorted(rep.blocks) if b.startswith("unet.")] == unet_blocks
        assert rep.made_for.startswith("sdxl")


@pytest.mark.slow
def test_kohya_sdxl_file_built_from_kohya_rules(base, ours, tmp_path):
    """A file another tool wrote (no lora_sd metadata, fp16, alpha != r, SGM names built by hand) loads
    through our importer, with and without the model, to the hand merge; diffusers agrees."""
    comps = _fresh(base)
    g = torch.Generator().manual_seed(3)
    picks = [("unet", "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"),
             ("unet", "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_q"),
             ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
             ("unet", "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0"),
             ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"),
             ("text_encoder", "encoder.layers.1.self_attn.q_proj"), ("text_encoder", "encoder.layers.1.self_attn.k_proj"),
             ("text_encoder", "encoder.layers.1.self_attn.v_proj"), ("text_encoder", "encoder.layers.1.self_attn.out_proj"),
             ("text_encoder_2", "text_model.encoder.layers.2.self_attn.q_proj"),
             ("text_encoder_2", "text_model.encoder.layers.2.self_attn.k_proj"),
             ("text_encoder_2", "text_model.encoder.layers.2.self_attn.v_proj"),
             ("text_encoder_2", "text_model.encoder.layers.2.self_attn.out_proj")]
    sd, r, alpha = {}, 4, 2.0
    for comp, path in picks:
        lin = comps[comp].get_submodule(path)
        name = kohya_sdxl_name(comp, path)
        sd[f"{name}.lora_down.weight"] = (torch.randn(r, lin.in_features, generator=g) * 0.3).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(lin.out_features, r, generator=g) * 0.3).half()
        sd[f"{name}.alpha"] = torch.tensor(alpha).half()
    path = tmp_path / "kohya_rules.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(r)})
    want = outputs(hand_merged(base, path, "kohya"))
    base_out = outputs(_fresh(base))

    alone, _, _ = formats.read_adapter(path)   # no model: SGM names through the released SDXL layout
    assert alone.arch == "sdxl" and {f"{c}.{p}" for c, p in picks} == {
        k.replace("text_encoder.text_model.", "text_encoder.") for k in alone}
    for adapter, comps in ((alone, _fresh(base)), (None, _fresh(base))):
        adapter = adapter if adapter is not None else formats.read_adapter(path, comps)[0]
        assert formats.apply_to_components(adapter, comps, source=str(path)) == len(picks)
        assert_same(outputs(comps), want, base_out, atol=1e-4)   # fp16 tensors
    # our writer gives the same names and tensors back
    formats.write_adapter(tmp_path / "ours.safetensors", alone, formats.KOHYA, dtype=torch.float16)
    again, meta = formats.read_safetensors(tmp_path / "ours.safetensors")
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    pipe, messages = diffusers_load(base, path)   # and diffusers reads the hand-built file the same way
    assert not [m for m in messages if re.search(r"unexpected|missing|not found", m, re.I)]
    assert_same(outputs(_components(pipe)), want, base_out, atol=1e-4)
    d = inspect(path)
    assert d["architecture"] == "sdxl"
    assert [b for b in d["blocks_original"] if b.startswith("unet.")] == [
        "unet.input_blocks.5.1", "unet.input_blocks.7.1", "unet.middle_block.1", "unet.output_blocks.2.1",
        "unet.output_blocks.3.1"]


def test_kohya_file_from_diffusers_converter(base, ours, tmp_path):
    """diffusers' convert_state_dict_to_kohya of our SDXL diffusers file: diffusers' UNet names with
    lora_te1_/lora_te2_ (alpha = r): our importer reads that layout too, with and without the model."""
    from diffusers.utils import convert_state_dict_to_kohya
    sd = convert_state_dict_to_kohya(load_file(str(ours["diffusers"])))
    assert any(k.startswith("lora_unet_down_blocks_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
    path = tmp_path / "diffusers_kohya.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    want, base_out = outputs(hand_merged(base, path, "kohya")), outputs(_fresh(base))
    assert inspect(path)["architecture"] == "sdxl"
    for with_model in (False, True):
        comps = _fresh(base)
        adapter, _, _ = formats.read_adapter(path, comps if with_model else None)
        assert formats.apply_to_components(adapter, comps, source=str(path)) == 92
        assert_same(outputs(comps), want, base_out)


def test_convert_round_trips_exactly(ours, tmp_path):
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    assert formats.convert(ours["kohya"], a, "diffusers")["modules"] == 92
    assert formats.convert(a, b, "kohya")["modules"] == 92
    assert formats.convert(ours["diffusers"], c, "kohya")["modules"] == 92
    k0, km = formats.read_safetensors(ours["kohya"])
    for other in (b, c):
        k1, m1 = formats.read_safetensors(other)
        assert k1.keys() == k0.keys() and all(torch.equal(k1[k], k0[k]) for k in k0)
        assert m1["ss_base_model_version"] == "sdxl_base_v1-0" and m1["lora_sd.unet_layout"] == km["lora_sd.unet_layout"]
    d0, _ = formats.read_safetensors(ours["diffusers"])
    d1, dm = formats.read_safetensors(a)
    assert d1.keys() == d0.keys() and all(torch.equal(d1[k], d0[k]) for k in d0)
    assert json.loads(dm["lora_adapter_metadata"])["text_encoder_2.lora_alpha"] == 6.0


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_inspect_reports_sdxl_and_blocks(ours, fmt):
    d = inspect(ours[fmt])
    assert d["architecture"] == "sdxl" and d["modules_by_component"] == N_MODULES
    unet_blocks = [b for b in d["blocks"] if b.startswith("unet.")]
    assert unet_blocks == ["unet.down_blocks.1", "unet.down_blocks.2", "unet.mid_block", "unet.up_blocks.0",
                           "unet.up_blocks.1"]
    assert [b for b in d["blocks_original"] if b.startswith("unet.")] == [
        "unet.input_blocks.4.1", "unet.input_blocks.5.1", "unet.input_blocks.7.1", "unet.input_blocks.8.1",
        "unet.middle_block.1", "unet.output_blocks.0.1", "unet.output_blocks.1.1", "unet.output_blocks.2.1",
        "unet.output_blocks.3.1", "unet.output_blocks.4.1", "unet.output_blocks.5.1"]
    assert "text_encoder_2.text_model.encoder.layers.2" in d["blocks"]


def _unet_file(arch: str, path, metadata: dict, unet=None):
    unet = unet or copy.deepcopy(build_tiny_pipeline(arch=arch).unet)
    torch.manual_seed(0)
    add_lora(unet, LoraConfig(r=2, target_modules=CROSS_ATTN))
    for _, layer in lora_layers(unet):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    formats.write_adapter(path, formats.from_model({"unet": unet}), formats.KOHYA, metadata)
    return formats.read_safetensors(path)


def test_sd2_and_sd1_files_keep_diffusers_names(tmp_path):
    sd, meta = _unet_file("sd2", tmp_path / "sd2.safetensors", {"ss_v2": "True", "ss_base_model_version": "sd_v2"})
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block_") for k in sd)
    assert "lora_sd.unet_layout" not in meta
    d = inspect(tmp_path / "sd2.safetensors")
    assert d["architecture"] == "sd2" and d["blocks_original"] == []
    sd1, meta1 = _unet_file("sd1", tmp_path / "sd1.safetensors", {})
    assert "lora_sd.unet_layout" not in meta1 and meta1["ss_base_model_version"] == "sd_v1"
    assert inspect(tmp_path / "sd1.safetensors")["architecture"] == "sd1"
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith(("lora_unet_up_blocks_", "lora_unet_mid_block_"))
               for k in sd1)


def test_a_recorded_unet_layout_drives_the_names(tmp_path, tiny_pipeline):
    """An SDXL-type UNet with one layer per level: SGM numbers follow its layout, recorded in the file,
    so conversion and import without the model give the same modules back."""
    from diffusers import UNet2DConditionModel
    cfg = dict(tiny_pipeline(arch="sdxl").unet.config)
    unet = UNet2DConditionModel.from_config({**cfg, "layers_per_block": 1})
    sd, meta = _unet_file("sdxl", tmp_path / "lpb1.safetensors", {}, unet)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_q.lora_down.weight" in sd   # 1 + 1 + downsample
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q.lora_down.weight" in sd
    assert json.loads(meta["lora_sd.unet_layout"])["layers_per_block"] == 1
    back, _, _ = formats.read_adapter(tmp_path / "lpb1.safetensors")
    assert set(back) == {f"unet.{n}" for n, _ in lora_layers(unet)}
    formats.convert(tmp_path / "lpb1.safetensors", tmp_path / "d.safetensors", "diffusers")
    formats.convert(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    assert formats.read_safetensors(tmp_path / "k.safetensors")[0].keys() == sd.keys()


def test_sdxl_file_against_an_sd1_pipeline_is_refused(ours, tiny_pipeline):
    sd1 = tiny_pipeline(arch="sd1")
    comps = {"unet": sd1.unet, "text_encoder": sd1.text_encoder}
    adapter, _, _ = formats.read_adapter(ours["kohya"], comps)
    rep = formats.load_report(adapter, comps, "kohya.safetensors")
    assert not rep.fits and any("has no text_encoder_2" in why for why in rep.unmatched.values())
    with pytest.raises(LoraLoadError, match="adapted modules match"):
        formats.apply_to_components(adapter, comps)


def test_text_model_names_fit_a_flattened_clip(tmp_path, tiny_pipeline):
    """kohya's and diffusers' files name CLIP modules text_model.encoder.layers.N (transformers 4); a
    CLIPTextModel that transformers 5 flattened has encoder.layers.N: both SD 1.x and SDXL files fit it."""
    sd1 = tiny_pipeline(arch="sd1")
    comps = {"unet": sd1.unet, "text_encoder": copy.deepcopy(sd1.text_encoder)}
    path = _strip(comps["text_encoder"], "text_model.encoder.layers.1.self_attn.v_proj")
    lin = comps["text_encoder"].get_submodule(path)
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, lin.in_features, generator=g), torch.randn(lin.out_features, 2, generator=g)
    name = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(tmp_path / "te.safetensors"))
    adapter, _, _ = formats.read_adapter(tmp_path / "te.safetensors", comps)
    assert formats.apply_to_components(adapter, comps) == 1
    x = torch.randn(1, lin.in_features)
    with torch.no_grad():
        got = comps["text_encoder"].get_submodule(path)(x)
        assert torch.allclose(got, lin(x) + x @ down.T @ up.T, atol=1e-5)
