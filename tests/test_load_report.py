"""Load reports (lora_core.adapter_files.LoadReport): an adapter for another architecture names the
mismatched blocks and fails to load with the report; a fitting adapter reports all matched; `inspect --base`."""
import json

import pytest

from lora_core import LoraConfig, LoraLoadError, add_lora
from lora_core.io import save_lora
from lora_sd import formats
from lora_sd.cli import main as sd_cli
from lora_sd.generate import load_adapters
from lora_sd.models import build_tiny_pipeline

ATTN = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def _pipe(channels=(32, 64), cross=32):
    from diffusers import UNet2DConditionModel
    pipe = build_tiny_pipeline()
    if channels != (32, 64) or cross != 32:
        pipe.unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross, attention_head_dim=2, norm_num_groups=32)
    return pipe


def _write(pipe, path):
    add_lora(pipe.unet, LoraConfig(r=2, target_modules=ATTN))
    formats.write_adapter(path, formats.from_model({"unet": pipe.unet}), formats.KOHYA,
                          {"ss_base_model_version": "sd_v1"})
    return path


def test_fitting_adapter_reports_all_matched(tmp_path):
    f = _write(_pipe(), tmp_path / "fits.safetensors")
    pipe = _pipe()
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    adapter, _, _ = formats.read_adapter(f, comps)
    rep = formats.load_report(adapter, comps, str(f))
    assert rep.fits and len(rep.matched) == len(adapter) == 7 * 8   # 7 transformer blocks x attn1/attn2 q,k,v,out and not rep.bad_blocks
    assert set(rep.blocks) == {"unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0",
                               "unet.up_blocks.1"}
    assert "cross-attention width 32" in rep.made_for and "UNet channels 32/64" in rep.made_for
    assert "every adapted module matches" in rep.text()
    assert load_adapters(pipe, [(str(f), 1.0)])[0]["matched_modules"] == 56


def test_other_architecture_names_the_mismatched_blocks(tmp_path):
    # made for a UNet whose second level has 96 channels: down_blocks.1, mid_block and up_blocks.0 differ
    f = _write(_pipe(channels=(32, 96)), tmp_path / "other.safetensors")
    pipe = _pipe()
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    adapter, _, _ = formats.read_adapter(f, comps)
    rep = formats.load_report(adapter, comps, str(f))
    assert not rep.fits
    assert rep.bad_blocks == ["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0"]
    assert rep.blocks["unet.down_blocks.0"] == {"matched": 8, "unmatched": 0, "mismatched": 0}
    assert rep.blocks["unet.mid_block"]["mismatched"] == 8
    assert "UNet channels 32/96" in rep.made_for
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert rep.mismatched[key] == "file (in 96, out 96) vs model (in 64, out 64)"
    before = [n for n, _ in pipe.unet.named_modules()]
    with pytest.raises(LoraLoadError, match=r"24 of 56 adapted modules match this pipeline") as e:
        load_adapters(pipe, [(str(f), 1.0)])
    assert "unet.mid_block" in str(e.value) and "wrong shape" in str(e.value)
    assert e.value.report.bad_blocks == rep.bad_blocks
    assert [n for n, _ in pipe.unet.named_modules()] == before   # nothing was loaded


def test_cli_inspect_base(tmp_path, capsys, tiny_sd_model):
    base = tiny_sd_model
    good = _write(_pipe(), tmp_path / "good.safetensors")
    bad = _write(_pipe(cross=48), tmp_path / "bad.safetensors")
    assert sd_cli(["inspect", str(good), "--base", str(base)]) == 0
    assert "every adapted module matches" in capsys.readouterr().out
    assert sd_cli(["inspect", str(bad), "--base", str(base), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["matched"] == 42 and len(d["mismatched"]) == 14   # attn2.to_k / to_v of 7 blocks
    assert "cross-attention width 48" in d["made_for"]


def test_llm_report_and_load(tmp_path, tiny_lm):
    from lora_llm.adapter_io import load_adapter, load_report
    src, _ = tiny_lm(n_layer=3)
    add_lora(src, LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    save_lora(tmp_path / "a.safetensors", src, {"llm_info": json.dumps({"pretrained": "tiny-3-layers"})})
    same, _ = tiny_lm(n_layer=3)
    assert load_report(tmp_path / "a.safetensors", same).fits
    two, _ = tiny_lm(n_layer=2)
    rep = load_report(tmp_path / "a.safetensors", two, base="tiny")
    assert not rep.fits and rep.bad_blocks == ["transformer.h.2"] and rep.made_for.startswith("tiny-3-layers")
    assert all("no such module" in why for why in rep.unmatched.values()) and len(rep.unmatched) == 3
    with pytest.raises(LoraLoadError, match=r"transformer\.h\.2"):
        load_adapter(tmp_path / "a.safetensors", two)
    wide, _ = tiny_lm(n_layer=3, n_embd=96)
    rep = load_report(tmp_path / "a.safetensors", wide)
    assert len(rep.mismatched) == len(rep.matched) + len(rep.mismatched) == 9


def test_llm_fused_slices_fit(tmp_path, tiny_lm):
    """GPT-2's q,v slices of c_attn (B has 2/3 of its rows) fit; on a wider model they do not."""
    from lora_llm.adapter_io import load_adapter, load_report
    src, _ = tiny_lm()
    add_lora(src, LoraConfig(r=2, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    save_lora(tmp_path / "qv.safetensors", src)
    model, _ = tiny_lm()
    rep = load_report(tmp_path / "qv.safetensors", model)
    assert rep.fits and len(rep.matched) == 2
    load_adapter(tmp_path / "qv.safetensors", model)


def test_llm_cli_inspect_base(tmp_path, capsys, tiny_lm):
    from lora_llm.adapter_io import save_adapter
    from lora_llm.cli import main
    from lora_llm.models import make_tiny_model
    model, _ = tiny_lm()
    add_lora(model, LoraConfig(r=2, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    save_adapter(tmp_path / "run", model, {"task": "wikitext2", "num_labels": 0, "pretrained": "tiny",
                                           "model": {"pretrained": "tiny"}})
    make_tiny_model(tmp_path / "wide", n_embd=96)
    assert main(["inspect", str(tmp_path / "run"), "--base", "tiny"]) == 0
    assert "every adapted module matches" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "run" / "peft"), "--base", "tiny"]) == 0   # the PEFT export too
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "run" / "adapter.safetensors"), "--base", str(tmp_path / "wide"),
                 "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["bad_blocks"] == ["transformer.h.0", "transformer.h.1"]
    assert d["mismatched"]["transformer.h.0.attn.c_attn"] == "file (in 64, out 128) vs model (in 96, out 288)"
