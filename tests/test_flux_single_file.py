"""FLUX.1 single-file checkpoints (lora_sd.single_file): BFL's original transformer layout (double_blocks.*,
single_blocks.*, no prefix) and ComfyUI's checkpoint layout (model.diffusion_model.*, vae.*,
text_encoders.clip_l / t5xxl.*).

- the shipped configs build FLUX.1 dev and schnell at real size on the meta device (dev: 11.9 B), our name
  map at that size is undone by diffusers' Flux converter (keys and shapes), and at FLUX.1's width (the
  converter hard-codes 3072) it gives back every value in place, the fused single-block linear1 included;
- the tiny Flux pipeline round-trips through one file; a BFL transformer file takes the rest from
  model.config;
- diffusers' own reader, FluxTransformer2DModel.from_single_file, loads our files of a LoRA-merged transformer
  at FLUX.1's width (one block of each kind) to the same tensors: the ComfyUI checkpoint and BFL's layout.
"""
import gc
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core import LoraConfig, add_lora, lora_layers, remove_lora
from lora_core.errors import ModelLoadError
from lora_sd import single_file as sf
from lora_sd.config import JOINT_ATTN, SINGLE_BLOCKS
from lora_sd.models import component_to_original, load_pipeline, make_component, save_single_file, to_original_state

from helpers import assert_same_weights

COMPONENTS = list(sf.LAYOUT["flux"])
PARAMS = {"flux1-dev": 11_901_408_320, "flux1-schnell": 11_891_178_560}   # the transformers as diffusers builds them
OTHERS = {"vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656}


def _configs(name):
    return sf._read_config_folder(sf.CONFIG_DIR / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell"])
def test_shipped_flux_configs_build_the_released_sizes_and_are_detected(name):
    from diffusers.loaders import single_file_utils as su
    configs = _configs(name)
    with torch.device("meta"):
        models = {c: make_component(c, configs[c]) for c in COMPONENTS}
    tr = models["transformer"]
    assert sum(p.numel() for p in tr.parameters()) == PARAMS[name]
    assert {c: sum(p.numel() for p in models[c].parameters()) for c in OTHERS} == OTHERS
    original = to_original_state(SimpleNamespace(**models), "flux")
    back = su.convert_flux_transformer_checkpoint_to_diffusers(
        {k: v for k, v in original.items() if k.startswith(sf.UNET)})
    want = tr.state_dict()
    assert set(back) == set(want) and all(back[k].shape == want[k].shape for k in want)

    shapes = {k: list(v.shape) for k, v in original.items()}
    arch, why = sf.classify(sf.Checkpoint(Path("m.safetensors"), shapes, {}))
    assert arch == "flux" and ("FLUX.1 dev" if name == "flux1-dev" else "FLUX.1 schnell") in why
    assert "19 double-stream and 38 single-stream blocks 3072 wide" in why and why.endswith("VAE, CLIP-L, T5")
    bfl = {k.removeprefix(sf.UNET): s for k, s in shapes.items() if k.startswith(sf.UNET)}   # BFL's file
    assert "double_blocks.0.img_attn.qkv.weight" in bfl
    ck = sf.Checkpoint(Path("flux1.safetensors"), bfl, {})
    assert ck.bare and sf.classify(ck)[1].endswith("the file holds transformer")
    assert sf.mmdit_size(ck, "flux")[0] == name


def test_flux_map_is_undone_by_diffusers_at_flux_width():
    """Every value in place through diffusers' converter (it hard-codes FLUX.1's 3072 width): one block of
    each kind at real width; only dim 0 is ever split or swapped, so the tensors are one column wide."""
    from diffusers.loaders import single_file_utils as su
    cfg = dict(_configs("flux1-dev")["transformer"], num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in make_component("transformer", cfg).state_dict().items()}
    state, start = {}, 0
    for k, shape in shapes.items():
        state[k] = torch.arange(start, start + shape[0], dtype=torch.float64).reshape(shape[0], *([1] * (len(shape) - 1)))
        start += shape[0]
    original = component_to_original("flux", "transformer", state, cfg)
    assert original[sf.UNET + "single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 4 * 3072
    back = su.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.slow
def test_flux_round_trip_and_bfl_transformer_file(tmp_path, caplog, tiny_pipeline):
    pipe = tiny_pipeline(arch="flux")
    out = tmp_path / "flux.safetensors"
    save_single_file(pipe, out)
    with caplog.at_level("INFO", logger="lora_sd"):
        back = load_pipeline(str(out))
    detected = [r.getMessage() for r in caplog.records if "detected" in r.getMessage()]
    assert len(detected) == 1 and "FLUX.1" in detected[0] and "a guidance embedding (dev)" in detected[0]
    assert type(back).__name__ == "FluxPipeline" and back._lora_sd_random_weights
    assert_same_weights(pipe, back, COMPONENTS)

    # BFL's layout: the transformer alone, no prefix, no metadata: the rest (and the configs) from model.config
    with safe_open(str(out), "pt") as f:
        bare = {k.removeprefix(sf.UNET): f.get_tensor(k) for k in f.keys() if k.startswith(sf.UNET)}
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file(bare, str(bfl))
    assert sf.detect_checkpoint(bfl)[0] == "flux"
    with pytest.raises(ModelLoadError, match="model.config") as e:
        load_pipeline(str(bfl))
    assert "\n" not in str(e.value) and "FLUX.1 dev or FLUX.1 schnell" in str(e.value)
    folder = tmp_path / "folder"
    pipe.save_pretrained(str(folder))
    assert_same_weights(pipe, load_pipeline(str(bfl), config=str(folder)), COMPONENTS)


def _wide_merged_transformer(cfg: dict):
    """A transformer of `cfg` in bf16 (built on the meta device: no fp32 copy) with random weights and a lora_core
    LoRA merged into its attention and single blocks."""
    with torch.device("meta"):
        t = make_component("transformer", cfg)
    t = t.to(torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0.0, 0.02, generator=g)
    assert not list(t.buffers())   # nothing left unset
    add_lora(t, LoraConfig(r=4, alpha=4.0, target_modules=f"{JOINT_ATTN}|{SINGLE_BLOCKS}"))
    for _, layer in lora_layers(t):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02, generator=g)
    return remove_lora(t, merge=True)


@pytest.mark.slow
def test_diffusers_from_single_file_reads_our_files_at_flux_width(tmp_path, tiny_pipeline):
    """FluxTransformer2DModel.from_single_file (diffusers' reader; its converter hard-codes FLUX.1's 3072 width)
    with a local config folder loads every tensor of a LoRA-merged FLUX.1-wide transformer (one double and one
    single block, bf16: 1.1 GB) exactly as we hold it, from BFL's layout (our name map, the transformer alone, no
    prefix) and from the ComfyUI checkpoint save_single_file writes (model.diffusion_model.*, VAE and text
    encoders beside it)."""
    from diffusers import FluxTransformer2DModel
    cfg = dict(_configs("flux1-dev")["transformer"], num_layers=1, num_single_layers=1)
    ours = _wide_merged_transformer(cfg)
    folder = tmp_path / "config"
    ours.save_config(str(folder))
    bfl = tmp_path / "flux1-wide.safetensors"
    save_file({k.removeprefix(sf.UNET): v for k, v in component_to_original("flux", "transformer", ours.state_dict(),
                                                                            dict(ours.config)).items()}, str(bfl))
    pipe = tiny_pipeline(arch="flux")
    pipe.transformer = ours
    comfy = tmp_path / "flux1-wide-comfy.safetensors"
    save_single_file(pipe, comfy)
    with safe_open(str(bfl), "pt") as f:
        assert "single_blocks.0.linear1.weight" in f.keys() and "double_blocks.0.img_attn.qkv.weight" in f.keys()
    with safe_open(str(comfy), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"model", "vae", "text_encoders"}
    want = _fingerprints(ours)
    del pipe, ours   # under 3 GB: ours and theirs never held at once
    gc.collect()
    for path in (bfl, comfy):
        theirs = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), torch_dtype=torch.bfloat16,
                                                         local_files_only=True)
        got = _fingerprints(theirs)
        assert got.keys() == want.keys() and not [k for k in want if got[k] != want[k]], path.name
        del theirs


def _fingerprints(module) -> dict:
    """Each tensor of the state dict as (dtype, shape, SHA-256 of its bytes): equal fingerprints, equal tensors (a
    tensor left on the meta device has no bytes and fails)."""
    return {k: (v.dtype, tuple(v.shape), hashlib.sha256(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                .hexdigest()) for k, v in module.state_dict().items()}


def test_released_hub_ids_are_known_before_loading():
    from lora_sd.single_file import model_arch
    assert model_arch("black-forest-labs/FLUX.1-dev") == ("flux", "the hub id of FLUX.1 dev")
    assert model_arch("black-forest-labs/FLUX.1-schnell")[0] == "flux"
    assert model_arch("stabilityai/stable-diffusion-3.5-large") == ("sd3", "the hub id of SD 3.5 Large")
    assert model_arch("stabilityai/stable-diffusion-3.5-medium")[0] == "sd3"
    assert model_arch("someone/some-model")[0] == ""
