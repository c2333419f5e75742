"""Single-file checkpoints (lora_sd.single_file): the original LDM / SGM layout, offline.

- shipped configs build the real SD 1.5 / 2.1 / SDXL models (parameter counts of the released models);
- at real size (meta tensors) our diffusers -> original name map is undone exactly by diffusers' own
  converters (single_file_utils), and the detector names each architecture from those keys;
- tiny pipelines of each architecture round-trip through one file (our map both ways) with identical
  weights, and diffusers' from_single_file loads the same file to the same weights;
- .ckpt: torch.load(weights_only=True) only; a pickle that runs code is refused without running it;
- bad inputs: one line each, naming the file and what was expected.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_core.errors import ModelLoadError
from lora_sd import single_file as sf
from lora_sd.models import (build_tiny_pipeline, load_pipeline, make_component, save_single_file, save_tiny_pipeline,
                            to_original_state)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("sd15", "sd21-base", "sd21-v", "sdxl-base")
ARCH_OF = {"sd15": "sd1", "sd21-base": "sd2", "sd21-v": "sd2", "sdxl-base": "sdxl"}
# parameters of the released models (UNet, VAE, text encoder(s) as diffusers builds them)
PARAMS = {"sd15": (859_520_964, 83_653_863, [123_060_480]),
          "sd21-base": (865_910_724, 83_653_863, [340_387_840]),
          "sd21-v": (865_910_724, 83_653_863, [340_387_840]),
          "sdxl-base": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840])}


def _components(arch):
    return list(sf.LAYOUT[arch])


def _meta_models(name):
    """The shipped configs' components on the meta device (no memory, no random init)."""
    from accelerate import init_empty_weights
    configs = sf._read_config_folder(sf.CONFIG_DIR / name)
    with init_empty_weights():
        return {c: make_component(c, configs[c]) for c in _components(ARCH_OF[name])}, configs


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_build_the_real_models(name):
    models, configs = _meta_models(name)
    unet, vae, te = PARAMS[name]
    assert _count(models["unet"]) == unet
    assert _count(models["vae"]) == vae
    assert [_count(models[c]) for c in ("text_encoder", "text_encoder_2") if c in models] == te
    assert configs["index"]["_class_name"] == ("StableDiffusionXLPipeline" if name == "sdxl-base" else "StableDiffusionPipeline")
    pred = configs["scheduler"]["prediction_type"]
    assert pred == ("v_prediction" if name == "sd21-v" else "epsilon")


def _diffusers_convert(arch, comp, model, original):
    """diffusers' own original -> diffusers converter for one component (the independent reference)."""
    from diffusers.loaders import single_file_utils as su
    prefix, layout = sf.LAYOUT[arch][comp]
    if layout == "unet":
        return su.convert_ldm_unet_checkpoint(original, dict(model.config))
    if layout == "vae":
        return su.convert_ldm_vae_checkpoint(original, dict(model.config))
    if layout == "clip":
        sd = su.convert_ldm_clip_checkpoint({k: v for k, v in original.items() if k.startswith(prefix)})
    else:
        sd = su.convert_open_clip_checkpoint(model, original, prefix=prefix)
    flat = not any(k.startswith("text_model.") for k in model.state_dict())
    return {k.removeprefix("text_model.") if flat else k: v for k, v in sd.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_name_map_at_real_size_is_undone_by_diffusers_and_detected(name):
    """Our map at the real models' size (meta tensors): diffusers' converters give back every diffusers
    key with its shape, and the detector names the architecture from the original keys and shapes."""
    models, _ = _meta_models(name)
    arch = ARCH_OF[name]
    original = to_original_state(SimpleNamespace(**models), arch)
    for comp, model in models.items():
        back = _diffusers_convert(arch, comp, model, original)
        want = model.state_dict()
        assert set(back) == set(want), (comp, sorted(set(back) ^ set(want))[:5])
        assert all(back[k].shape == want[k].shape for k in want), comp
    ck = sf.Checkpoint(Path(name), {k: list(v.shape) for k, v in original.items()}, {})
    got, why = sf.classify(ck)
    assert got == arch
    assert ("OpenCLIP" in why) == (arch != "sd1")


# ------------------------------------------------------------------ round trips of tiny pipelines
def _sdxl_distinct_widths():
    """The tiny SDXL pipeline with text_encoder_2 48 wide instead of 32. diffusers' from_single_file
    picks the loader of text_encoder_2 by comparing the width of conditioner.embedders.0's position
    embedding with the model's: in the stock tiny SDXL both encoders are 32 wide, so diffusers loads
    text_encoder_2 from embedders.0 (the CLIP ViT-L keys) and its weights come out wrong (real SDXL:
    768 vs 1280, no clash). Our loader reads embedders.1 either way; both are checked on this variant."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    pipe = build_tiny_pipeline(0, "sdxl")
    cfg = pipe.text_encoder_2.config.to_dict()
    cfg["hidden_size"] = 48
    torch.manual_seed(1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfg))
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    pipe.register_modules(text_encoder_2=te2, unet=unet)
    return pipe


def _assert_same_weights(a, b, arch):
    for comp in _components(arch):
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys(), comp
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, (comp, bad[:3])


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_round_trip_ours_and_diffusers(arch, tmp_path, caplog, tiny_pipeline):
    pipe = tiny_pipeline(0, arch)
    out = tmp_path / f"{arch}.safetensors"
    save_single_file(pipe, out)
    with caplog.at_level("INFO", logger="lora_sd"):
        back = load_pipeline(str(out))
    detected = [r.getMessage() for r in caplog.records if "detected" in r.getMessage()]
    assert len(detected) == 1 and sf.TITLE[arch] in detected[0] and "metadata" in detected[0]
    assert type(back) is type(pipe)
    _assert_same_weights(pipe, back, arch)
    for part in ("scheduler", "unet", "vae"):
        cfg = lambda c: json.dumps({k: v for k, v in dict(getattr(c, part).config).items() if k[0] != "_"}, sort_keys=True)
        assert cfg(back) == cfg(pipe), part
    assert back._lora_sd_random_weights
    assert sf.detect_checkpoint(out)[0] == arch

    # the independent check: diffusers' from_single_file, given the tiny model's folder as config
    ref = _sdxl_distinct_widths() if arch == "sdxl" else pipe
    folder = tmp_path / "folder"
    ref.save_pretrained(str(folder))
    if arch == "sdxl":
        out = tmp_path / "sdxl_48.safetensors"
        save_single_file(ref, out)
        _assert_same_weights(ref, load_pipeline(str(out)), arch)
    kw = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    theirs = type(ref).from_single_file(str(out), config=str(folder), local_files_only=True, **kw)
    _assert_same_weights(ref, theirs, arch)


def test_half_file_and_model_config_folder(tmp_path):
    """--half stores float16; a file without our metadata loads with model.config = a diffusers folder,
    and without it the shipped real configs do not fit a tiny model: one line saying what to set."""
    from safetensors.torch import load_file, save_file
    folder = save_tiny_pipeline(tmp_path / "tiny", arch="sd2")
    pipe = load_pipeline(str(folder))
    half = tmp_path / "half.safetensors"
    save_single_file(pipe, half, half=True)
    tensors = load_file(str(half))
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))                       # no metadata: an ordinary original-layout file
    with pytest.raises(ModelLoadError, match="model.config") as e:
        load_pipeline(str(bare))
    assert "\n" not in str(e.value) and "sd21-v" in str(e.value)
    back = load_pipeline(str(bare), config=str(folder), dtype=torch.float16)
    ref = {k: v.half() for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(ref[k], v) for k, v in back.unet.state_dict().items())


def test_extra_keys_of_real_files_are_skipped(tmp_path, caplog):
    """Real SD 2.x files hold OpenCLIP's 24th layer, text_projection and logit_scale (diffusers' encoder
    has none): skipped quietly; an unknown tensor of a component: one warning."""
    from safetensors.torch import save_file
    folder = save_tiny_pipeline(tmp_path / "tiny", arch="sd2")
    pipe = load_pipeline(str(folder))
    tensors = to_original_state(pipe, "sd2")
    te = "cond_stage_model.model."
    tensors.update({te + "transformer.resblocks.23.ln_1.weight": torch.ones(32), te + "text_projection": torch.ones(32, 32),
                    te + "logit_scale": torch.ones(()), sf.UNET + "input_blocks.1.1.extra.weight": torch.ones(2),
                    "model_ema.decay": torch.ones(()), "alphas_cumprod": torch.ones(1000)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "real.safetensors"))
    with caplog.at_level("INFO", logger="lora_sd"):
        back = load_pipeline(str(tmp_path / "real.safetensors"), config=str(folder))
    _assert_same_weights(pipe, back, "sd2")
    unused = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(unused) == 1 and "1 tensor(s)" in unused[0] and "extra.weight" in unused[0]


# ------------------------------------------------------------------ .ckpt
def test_ckpt_weights_only_nested_state_dict(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "tiny", arch="sd1")
    pipe = load_pipeline(str(folder))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_original_state(pipe, "sd1"), "global_step": 10, "epoch": 1}, str(ckpt))
    assert sf.detect_checkpoint(ckpt)[0] == "sd1"
    _assert_same_weights(pipe, load_pipeline(str(ckpt), config=str(folder)), "sd1")
    legacy = tmp_path / "legacy.ckpt"      # torch's pre-1.6 format: no zip, no mmap
    torch.save({"state_dict": to_original_state(pipe, "sd1")}, str(legacy), _use_new_zipfile_serialization=False)
    assert sf.detect_checkpoint(legacy)[0] == "sd1"
    _assert_same_weights(pipe, load_pipeline(str(legacy), config=str(folder)), "sd1")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_that_runs_code_is_refused_unrun(tmp_path, tiny_pipeline):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.ckpt"
    state = to_original_state(tiny_pipeline(0, "sd1"), "sd1")
    torch.save({"state_dict": state, "callbacks": _Evil(marker)}, str(ckpt))
    assert sf.detect_checkpoint(ckpt)[0] == "sd1"       # key names only: the pickle is never run
    with pytest.raises(ModelLoadError, match=r"refused: .* names posix\.system.*weights_only=True") as e:
        load_pipeline(str(ckpt))
    assert str(ckpt) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_sd2_variant_choice_without_metadata():
    """v-prediction cannot be seen in weights: 768-v by default (as diffusers), 512-base when
    model.prediction_type = epsilon or a .ckpt's global_step is 875000."""
    assert sf._shipped("sd2", "", None)[0] == "sd21-v"
    assert sf._shipped("sd2", "epsilon", None)[0] == "sd21-base"
    assert sf._shipped("sd2", "", 875000)[0] == "sd21-base"
    assert sf._shipped("sd2", "v_prediction", 875000)[0] == "sd21-v"
    assert sf._shipped("sd1", "", None)[0] == "sd15" and sf._shipped("sdxl", "", None)[0] == "sdxl-base"


# ------------------------------------------------------------------ detection on real-layout headers
def _real_layout_file(path, name, drop=(), add=None):
    """A .safetensors with the key names of the real model `name` (from the shipped configs through our
    map) and tiny tensors of the same rank (input conv keeps its 4 latent channels)."""
    from safetensors.torch import save_file
    models, _ = _meta_models(name)
    original = to_original_state(SimpleNamespace(**models), ARCH_OF[name])
    tensors = {k: torch.zeros([min(d, 4) for d in v.shape]) for k, v in original.items()
               if not k.startswith(drop or ("-",))}
    tensors.update(add or {})
    save_file(tensors, str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sdxl-base"])
def test_detect_real_layout_headers(tmp_path, name):
    arch, why = sf.detect_checkpoint(_real_layout_file(tmp_path / "m.safetensors", name))
    assert arch == ARCH_OF[name]
    assert {"sd1": "cond_stage_model.transformer", "sd2": "linear proj_in",
            "sdxl": "conditioner.embedders"}[arch] in why


def _bad_files(tmp_path):
    """name -> (file, words its error must hold)."""
    from safetensors.torch import save_file
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my prompts\n" * 20)
    good = _real_layout_file(tmp_path / "good.safetensors", "sd15")
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other = tmp_path / "other.safetensors"
    save_file({"backbone.layer1.weight": torch.zeros(2, 2)}, str(other))
    unet_only = _real_layout_file(tmp_path / "unet_te.safetensors", "sd15", drop=("cond_stage_model.",))
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 2, 3, 3)}, str(vae))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    inpaint = _real_layout_file(tmp_path / "inpaint.safetensors", "sd15",
                                add={sf.UNET + "input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3)})
    trunc_ckpt = tmp_path / "truncated.ckpt"
    trunc_ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return {"text": (text, "not a safetensors file"), "truncated": (trunc, "truncated"),
            "unknown": (other, "not a Stable Diffusion model"),
            "unknown_te": (unet_only, "unknown architecture"), "vae_only": (vae, "VAE-only"),
            "lora": (lora, "LoRA"), "inpainting": (inpaint, "9 input channels"),
            "truncated_ckpt": (trunc_ckpt, "truncated")}


@pytest.mark.slow
def test_bad_inputs_one_line_each(tmp_path):
    for name, (path, words) in _bad_files(tmp_path).items():
        with pytest.raises(ModelLoadError) as e:
            load_pipeline(str(path))
        msg = str(e.value)
        assert words in msg and str(path) in msg and "\n" not in msg, (name, msg)
        assert "expected" in msg, (name, msg)


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(bad))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "lora_sd.cli", "save-single-file", str(bad), str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if "torchvision" not in l]
    assert lines == [f"lora-sd save-single-file: error: {bad}: a VAE-only file (encoder/decoder keys, no UNet "
                     "model.diffusion_model.*); a Stable Diffusion 1.x / 2.x / SDXL checkpoint (UNet, VAE and text "
                     "encoder in one file; model.config may give configs for other sizes) was expected"], r.stderr
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.slow
def test_detect_is_torch_free(tmp_path):
    """The GUI's detector: .safetensors header and .ckpt opcodes, with torch made unimportable."""
    st = _real_layout_file(tmp_path / "m.safetensors", "sd21-v")
    ckpt = tmp_path / "m.ckpt"
    from safetensors.torch import load_file
    torch.save({"state_dict": load_file(str(_real_layout_file(tmp_path / "x.safetensors", "sdxl-base")))}, str(ckpt))
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lora_sd.single_file import detect_checkpoint\n"
            f"print(detect_checkpoint({str(st)!r})[0], detect_checkpoint({str(ckpt)!r})[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["sd2", "sdxl"]


def test_metadata_holds_the_configs(tmp_path, tiny_pipeline):
    from lora_core.adapter_files import read_header
    out = tmp_path / "x.safetensors"
    save_single_file(tiny_pipeline(0, "sdxl"), out)
    meta = read_header(out).metadata
    configs = json.loads(meta[sf.META_CONFIGS])
    assert configs["arch"] == "sdxl" and configs["text_encoder_2"]["hidden_size"] == 32
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
