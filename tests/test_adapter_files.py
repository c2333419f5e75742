"""The adapter-format layer: the torch-free safetensors header reader, the one detector, `inspect`
(the same description in both CLIs and the GUI), the converter registry, and the fused-slice
block-B rule shared by the torch core, the MindSpore twin and the PEFT export.

Files written by other tools (PEFT's save_pretrained, diffusers' save_lora_weights and
convert_state_dict_to_kohya, a kohya file assembled here from kohya's naming rules) are checked
beside our own writers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core import LoraConfig, add_lora, lora_layers, save_lora
from lora_core import adapter_files as af
from lora_core.fused import block_B
from lora_sd import formats
from lora_sd.config import CROSS_ATTN, TEXT_ENCODER_ATTN

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ files made by us and by others
@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


@pytest.fixture(scope="module")
def files(pipe, tiny_pipeline, tmp_path_factory):
    """{name: (path, expected format)} for every kind of adapter file."""
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    # ours: kohya and diffusers from lora_core-wrapped components, alpha != r
    p = tiny_pipeline()
    torch.manual_seed(1)
    add_lora(p.unet, LoraConfig(r=4, alpha=8.0, target_modules=CROSS_ATTN))
    add_lora(p.text_encoder, LoraConfig(r=2, alpha=1.0, target_modules=TEXT_ENCODER_ATTN))
    for comp in (p.unet, p.text_encoder):
        for _, layer in lora_layers(comp):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    ad = formats.from_model({"unet": p.unet, "text_encoder": p.text_encoder})
    formats.write_adapter(d / "ours_kohya.safetensors", ad, formats.KOHYA, {"ss_sd_model_name": "tiny", "ss_steps": "7"})
    formats.write_adapter(d / "ours_diffusers.safetensors", ad, formats.DIFFUSERS)
    out["ours_kohya"] = (d / "ours_kohya.safetensors", "kohya")
    out["ours_diffusers"] = (d / "ours_diffusers.safetensors", "diffusers")
    # diffusers + PEFT: a PEFT LoRA on the UNet, saved by diffusers and converted by diffusers to kohya
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = tiny_pipeline().unet
    unet.add_adapter(PeftLoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    peft_sd = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(d / "diffusers_saved", unet_lora_layers=peft_sd)
    out["diffusers_saved"] = (d / "diffusers_saved" / "pytorch_lora_weights.safetensors", "diffusers")
    kohya_sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    save_file({k: v.contiguous() for k, v in kohya_sd.items()}, str(d / "diffusers_kohya.safetensors"))
    out["diffusers_kohya"] = (d / "diffusers_kohya.safetensors", "kohya")
    # PEFT's own save_pretrained of a GPT-2 (fan_in_fan_out Conv1D) and of the UNet
    from peft import get_peft_model
    gpt = get_peft_model(_tiny_gpt2(), PeftLoraConfig(r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    gpt.save_pretrained(str(d / "peft_gpt2"))
    out["peft_gpt2_folder"] = (d / "peft_gpt2", "peft")
    out["peft_gpt2_file"] = (d / "peft_gpt2" / "adapter_model.safetensors", "peft")
    # ours: the lora_core file (lora-llm's adapter.safetensors) and our PEFT export of fused slices
    from lora_llm.adapter_io import export_peft
    m = _tiny_gpt2()
    add_lora(m, LoraConfig(r=2, alpha=4, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    save_lora(d / "adapter.safetensors", m, metadata={"llm_info": json.dumps({"task": "wikitext2", "steps": 3,
                                                                             "pretrained": "tiny-gpt2"})})
    out["lora_core"] = (d / "adapter.safetensors", "lora_core")
    export_peft(d / "our_peft", m)
    out["our_peft"] = (d / "our_peft", "peft")
    # kohya, assembled here from kohya's naming rules (not by our writer), fp16 with a bf16 alpha
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{mod}.lora_down.weight": torch.randn(3, 32, dtype=torch.float16),
               f"{mod}.lora_up.weight": torch.randn(32, 3, dtype=torch.float16),
               f"{mod}.alpha": torch.tensor(1.5, dtype=torch.bfloat16)}, str(d / "hand_kohya.safetensors"),
              metadata={"ss_network_module": "networks.lora"})
    out["hand_kohya"] = (d / "hand_kohya.safetensors", "kohya")
    return out


def _safetensors_view(path: Path):
    """(shapes, dtypes, metadata) from safetensors' own reader."""
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        return shapes, dtypes, dict(f.metadata() or {})


KINDS = ["ours_kohya", "ours_diffusers", "diffusers_saved", "diffusers_kohya", "peft_gpt2_file", "lora_core", "hand_kohya"]


@pytest.mark.parametrize("name", KINDS)
def test_header_reader_equals_safetensors(files, name):
    path = files[name][0]
    h = af.read_header(path)
    shapes, dtypes, meta = _safetensors_view(path)
    assert {k: t["shape"] for k, t in h.tensors.items()} == shapes
    assert {k: t["dtype"] for k, t in h.tensors.items()} == dtypes
    assert h.metadata == meta
    sd = {}
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if f.get_slice(k).get_shape() in ([], [1])}
    for k, t in sd.items():   # scalars (alpha) read from their bytes, every dtype
        assert h.scalar(k) == t.float().item()


@pytest.mark.parametrize("name", list(KINDS) + ["peft_gpt2_folder", "our_peft"])
def test_one_detector_for_every_format_and_tool(files, name):
    path, expected = files[name]
    assert af.detect(path).format == expected
    weights = path if path.is_file() else next(path.glob("*.safetensors"))
    assert af.detect(weights).format == expected   # a PEFT folder named by its weights file, too


def test_unknown_files_say_why(tmp_path):
    model = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(model))
    det = af.detect(model)
    assert det.format == "unknown" and "no LoRA tensors" in det.reason
    lyco = tmp_path / "ia3.safetensors"   # LyCORIS' IA3: one .weight per module
    save_file({"lora_unet_x.weight": torch.zeros(2)}, str(lyco))
    det = af.detect(lyco)
    assert det.format == "unknown" and "LyCORIS" in det.reason and "LoKr" in det.reason
    with pytest.raises(af.LoraLoadError, match=r"ia3\.safetensors: not a LoRA adapter.*LyCORIS"):
        af.inspect(lyco)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(af.LoraLoadError, match="holds no adapter"):
        af.detect(tmp_path / "empty_dir")


def _truncated(tmp_path: Path) -> Path:
    good = tmp_path / "good.safetensors"
    save_file({"a.lora_A.weight": torch.ones(4, 8)}, str(good))
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-10])
    return bad


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such file"), ("empty", r"not a safetensors file \(only 0 bytes\)"),
    ("short", r"only 5 bytes"), ("garbage", "not a safetensors file, or truncated"),
    ("not_json", "header is not JSON"), ("truncated", "truncated file: tensor 'a.lora_A.weight'"),
    ("folder", "is a folder"), ("bad_entry", "lacks a dtype or a valid shape"),
])
def test_broken_files_give_one_clear_line(tmp_path, kind, message):
    p = tmp_path / f"{kind}.safetensors"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "short":
        p.write_bytes(b"\x01\x02\x03\x04\x05")
    elif kind == "garbage":
        p.write_bytes(b"\xff" * 20)
    elif kind == "not_json":
        p.write_bytes((6).to_bytes(8, "little") + b"\x80abcde")
    elif kind == "truncated":
        p = _truncated(tmp_path)
    elif kind == "folder":
        p.mkdir()
    elif kind == "bad_entry":
        body = json.dumps({"x": {"dtype": "F32"}}).encode()
        p.write_bytes(len(body).to_bytes(8, "little") + body)
    with pytest.raises(af.LoraLoadError, match=message) as e:
        af.read_header(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p))
    if kind in ("garbage", "truncated", "not_json"):   # safetensors agrees these are broken
        with pytest.raises(Exception):
            with safe_open(str(p), framework="pt") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_our_sd1_files_name_the_text_encoder_as_kohya_comfyui_and_a1111_read_it(files):
    """SD 1.x text-encoder keys carry transformers' `text_model` level (lora_te_text_model_encoder_layers_N_...,
    text_encoder.text_model.encoder.layers.N...), as kohya's, ComfyUI's and AUTOMATIC1111's readers expect,
    even where this transformers' CLIPTextModel has no such level."""
    from safetensors import safe_open
    with safe_open(str(files["ours_kohya"][0]), "pt") as f:
        te = [k for k in f.keys() if k.startswith("lora_te")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    with safe_open(str(files["ours_diffusers"][0]), "pt") as f:
        te = [k for k in f.keys() if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)


# ------------------------------------------------------------------ inspect: one description
def test_inspect_describes_each_format(files):
    k = af.inspect(files["ours_kohya"][0])
    assert (k["format"], k["tool"], k["cli"], k["base_model"], k["steps"]) == ("kohya", "lora-sd", "lora_sd.cli", "tiny", "7")
    assert k["ranks"] == [2, 4] and k["alphas"] == [1.0, 8.0] and k["targets"] == 40 and k["dtype"] == "F32"
    assert k["modules_by_component"] == {"unet": 28, "text_encoder": 12} and k["architecture"] == "sd1"
    assert "unet.mid_block" in k["blocks"] and "text_encoder.text_model.encoder.layers.0" in k["blocks"]   # kohya names: text_model.
    assert k["convert_to"] == ["kohya", "diffusers"]
    d = af.inspect(files["ours_diffusers"][0])
    assert (d["ranks"], d["alphas"], d["target_modules"]) == (k["ranks"], k["alphas"], k["target_modules"])
    # diffusers' own files: alpha = r (diffusers writes alpha = rank), targets the 4 attention projections
    for name in ("diffusers_saved", "diffusers_kohya"):
        s = af.inspect(files[name][0])
        assert s["ranks"] == [4] and s["alphas"] == [4.0] and s["targets"] == 56   # attn1 and attn2
        assert s["target_leaves"] == ["to_k", "to_out.0", "to_q", "to_v"]
    h = af.inspect(files["hand_kohya"][0])
    assert h["alphas"] == [1.5] and h["ranks"] == [3] and h["dtype"] == "BF16,F16"
    assert h["target_modules"] == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    c = af.inspect(files["lora_core"][0])
    assert (c["format"], c["tool"], c["ranks"], c["alphas"], c["target_modules"]) == \
        ("lora_core", "lora-llm", [2], [4.0], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"])
    assert c["base_model"] == "tiny-gpt2" and c["steps"] == "3" and c["blocks"] == ["transformer.h.0", "transformer.h.1"]
    assert c["convert_to"] == [] and "merge" in c["commands"]
    p = af.inspect(files["peft_gpt2_folder"][0])
    assert (p["format"], p["ranks"], p["alphas"], p["targets"]) == ("peft", [2], [6.0], 2)
    o = af.inspect(files["our_peft"][0])   # fused q,v: rank 2*r with lora_alpha / rank = our scale
    assert o["ranks"] == [4] and o["alphas"] == [8.0]


def test_gui_and_both_clis_show_the_same_description(files, capsys):
    from lora_gui.adapter_scan import describe
    from lora_gui.workspace import Workspace
    from lora_llm.cli import main as llm_cli
    from lora_sd.cli import main as sd_cli
    for name, cli in (("ours_kohya", sd_cli), ("diffusers_saved", sd_cli), ("lora_core", llm_cli),
                      ("peft_gpt2_folder", llm_cli), ("lora_core", sd_cli)):
        path = files[name][0]
        capsys.readouterr()
        assert cli(["inspect", str(path), "--json"]) == 0
        shown = describe(path, Workspace(path.parent))   # the GUI's table row: the description, rank and alpha
        desc = json.loads(capsys.readouterr().out)
        assert {k: v for k, v in shown.items() if k not in ("rank", "alpha", "type")} == {**desc, "file": path.name}
        assert shown["cli"] == af.get_format(files[name][1]).cli and shown["type"] == "lora"


def test_lora_sd_refuses_an_llm_file_by_naming_its_tool(files):
    with pytest.raises(af.LoraLoadError, match="`lora-llm` reads it"):
        formats.read_adapter(files["lora_core"][0])


# ------------------------------------------------------------------ convert
def test_convert_files_of_other_tools(files, tmp_path, pipe):
    """diffusers' kohya file and its PEFT file convert to each other and load to the same weights."""
    a, b = tmp_path / "from_kohya.safetensors", tmp_path / "from_diffusers.safetensors"
    assert formats.convert(files["diffusers_kohya"][0], a, "diffusers")["modules"] == 56
    assert formats.convert(files["diffusers_saved"][0], b, "kohya")["modules"] == 56
    x, _, _ = formats.read_adapter(a)
    y, _, _ = formats.read_adapter(files["diffusers_saved"][0])
    assert x.keys() == y.keys() and all(torch.equal(x[k].up, y[k].up) and x[k].alpha == y[k].alpha for k in x)
    with pytest.raises(af.LoraLoadError, match="a lora_core file cannot be converted to kohya"):
        af.convert(files["lora_core"][0], tmp_path / "x.safetensors", "kohya")
    with pytest.raises(af.LoraLoadError, match="unknown adapter format 'lycoris'"):
        af.convert(files["ours_kohya"][0], tmp_path / "x.safetensors", "lycoris")


@pytest.mark.parametrize("culprit", ["alpha_inf", "weight_nan", "fp16_overflow"])
def test_convert_refuses_non_finite_tensors(files, tmp_path, capsys, culprit):
    from lora_sd.cli import main as sd_cli
    mod = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd = {f"{mod}.lora_down.weight": torch.randn(3, 32), f"{mod}.lora_up.weight": torch.randn(32, 3),
          f"{mod}.alpha": torch.tensor(3.0)}
    up, args = sd[f"{mod}.lora_up.weight"], ["--dtype", "fp16"] if culprit == "fp16_overflow" else []
    if culprit == "alpha_inf":
        sd[f"{mod}.alpha"] = torch.tensor(math.inf)
    elif culprit == "weight_nan":
        sd[f"{mod}.lora_up.weight"] = up.index_fill(0, torch.tensor([5]), math.nan)
    else:
        sd[f"{mod}.lora_up.weight"] = up * 1e6   # finite in fp32, inf in fp16
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(sd, str(src))
    capsys.readouterr()
    assert sd_cli(["convert", str(src), str(dst), "--to", "diffusers", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tensor '" in err and "non-finite" in err
    assert (mod if culprit != "fp16_overflow" else "lora_B.weight") in err
    assert not dst.exists() and not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------ the fused-slice rule
def _loralib_delta(A, B, mask, out_features):
    """loralib.MergedLinear.merge_AB + zero_pad, written out (loralib/layers.py)."""
    n_on = sum(mask)
    lora_ind = torch.tensor(mask).repeat_interleave(out_features // len(mask))
    delta = F.conv1d(A.unsqueeze(0), B.unsqueeze(-1), groups=n_on).squeeze(0)
    full = delta.new_zeros(out_features, A.shape[1])
    full[lora_ind] = delta
    return full


MASKS = [[True, False, True], [False, True, True], [True, True, True], [False, True], [True, False, False, True]]


@pytest.mark.parametrize("mask", MASKS)
def test_fused_block_B_equals_loralib_in_torch(mask):
    r, in_f, out_f = 3, 10, 12 * len(mask)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f))
    add_lora(model, LoraConfig(r=r, alpha=r, target_modules=["0"], fused_slices={"0": mask}))
    (_, layer), = lora_layers(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    ref = _loralib_delta(A, B, mask, out_f)
    torch.testing.assert_close(block_B(B, mask, out_f, r, lambda s, like: like.new_zeros(s), torch.cat) @ A, ref)
    torch.testing.assert_close(layer.delta_weight("default").double(), ref, rtol=1e-6, atol=1e-6)
    x = torch.randn(2, in_f, generator=g)
    torch.testing.assert_close(model(x) - model[0].base_layer(x), x @ ref.float().T, rtol=1e-5, atol=1e-5)


def test_peft_export_uses_the_same_block_B():
    from lora_llm.adapter_io import peft_tensors_and_config
    m = _tiny_gpt2()
    add_lora(m, LoraConfig(r=2, alpha=4, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    for _, layer in lora_layers(m):
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    tensors, cfg = peft_tensors_and_config(m, "CAUSAL_LM")
    for name, layer in lora_layers(m):
        A = layer.lora_A["default"].weight.detach().double()
        B = tensors[f"base_model.model.{name}.lora_B.weight"].double()
        torch.testing.assert_close(B @ A, _loralib_delta(A, layer.lora_B["default"].weight.detach().double(),
                                                         [True, False, True], layer.out_features))


@pytest.mark.parametrize("mask", MASKS[:3])
def test_fused_block_B_equals_loralib_in_mindspore(mask):
    ms = pytest.importorskip("mindspore")
    import numpy as np
    from lora_core.mindspore import LoraDense
    r, in_f, out_f = 3, 10, 12 * len(mask)
    layer = LoraDense(ms.nn.Dense(in_f, out_f), r=r, alpha=r, slices=mask)
    rng = np.random.default_rng(0)
    layer.lora_B.weight.set_data(ms.Tensor(rng.standard_normal(layer.lora_B.weight.shape).astype(np.float32)))
    A = torch.from_numpy(layer.lora_A.weight.asnumpy()).double()
    B = torch.from_numpy(layer.lora_B.weight.asnumpy()).double()
    ref = _loralib_delta(A, B, mask, out_f)
    torch.testing.assert_close(torch.from_numpy(layer.full_B().asnumpy()).double() @ A, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(layer.delta_weight()).double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ no torch
def test_header_reader_detector_and_inspect_import_no_torch(files):
    code = (
        "import sys, json\n"
        "from lora_core import adapter_files as af\n"
        "import lora_gui.adapter_scan as gui\n"
        f"paths = {[str(files[n][0]) for n in ('ours_kohya', 'lora_core', 'peft_gpt2_folder', 'diffusers_saved')]!r}\n"
        "print(json.dumps([af.inspect(p)['format'] for p in paths] + [af.detect(p).format for p in paths]))\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'mindspore', 'safetensors.torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == ["kohya", "lora_core", "peft", "diffusers"] * 2


@pytest.mark.parametrize("header_len", [640, 768, 1152, 1280])   # lengths whose first bytes are 80 02..80 05
def test_a_header_length_that_looks_like_a_pickle_opcode_is_read(tmp_path, header_len):
    """A safetensors file starts with its header's length: 640 is the bytes 80 02, the start of a protocol-2
    pickle; the header's "{" that follows tells them apart, so such a file is read (and a real pickle is not)."""
    from safetensors.torch import save_file
    meta = {"pad": ""}
    save_file({"w": torch.ones(2)}, str(tmp_path / "probe.safetensors"), metadata=meta)
    base = int.from_bytes((tmp_path / "probe.safetensors").read_bytes()[:8], "little")
    meta["pad"] = "x" * (header_len - base)
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata=meta)
    assert int.from_bytes(path.read_bytes()[:8], "little") == header_len
    assert af.read_header(path).tensors["w"]["shape"] == [2]
    torch.save({"w": torch.ones(2)}, str(tmp_path / "p.safetensors"), _use_new_zipfile_serialization=False)
    with pytest.raises(af.LoraLoadError, match="pickle"):
        af.read_header(tmp_path / "p.safetensors")
