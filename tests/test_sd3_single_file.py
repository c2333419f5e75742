"""SD 3.5 single-file checkpoints (lora_sd.single_file): the original / ComfyUI layout
(model.diffusion_model.joint_blocks.*, first_stage_model.*, text_encoders.clip_l / clip_g / t5xxl.*).

- the shipped configs build SD 3.5 Medium and Large at real size on the meta device with the released
  parameter counts; our name map at that size is undone by diffusers' own SD3 converters, and the detector
  names Medium / Large from the keys and shapes;
- the tiny SD 3.5 pipeline round-trips through one file (our map both ways), and diffusers'
  StableDiffusion3Pipeline.from_single_file / SD3Transformer2DModel.from_single_file load the same file
  to the same weights;
- a transformer-only file takes the rest from model.config; without it one line says so; T5's tokenizer
  comes only from model.config (one line).
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_core.errors import ModelLoadError
from lora_sd import single_file as sf
from lora_sd.models import load_pipeline, make_component, save_single_file, to_original_state

from helpers import assert_same_weights

COMPONENTS = list(sf.LAYOUT["sd3"])
# the released sizes: the transformer's parameters + its positional embedding (a parameter in the original
# MMDiT, a buffer in diffusers): SD 3.5 Medium 2.47 B ("2.5 B"), Large 8.15 B ("8.1 B")
TRANSFORMER = {"sd35-medium": (2_243_171_520, 226_492_416), "sd35-large": (8_056_627_520, 89_653_248)}
OTHERS = {"vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
          "text_encoder_3": 4_762_310_656}


def _meta_models(name):
    configs = sf._read_config_folder(sf.CONFIG_DIR / name)
    with torch.device("meta"):
        return {c: make_component(c, configs[c]) for c in COMPONENTS}


def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,billions", [("sd35-medium", 2.5), ("sd35-large", 8.1)])
def test_shipped_sd35_configs_build_the_released_sizes_and_are_detected(name, billions):
    from diffusers.loaders import single_file_utils as su
    models = _meta_models(name)
    params, pos = TRANSFORMER[name]
    tr = models["transformer"]
    assert _count(tr) == params and tr.pos_embed.pos_embed.numel() == pos
    assert round((params + pos) / 1e9, 1) == billions
    assert {c: _count(models[c]) for c in OTHERS} == OTHERS

    original = to_original_state(SimpleNamespace(**models), "sd3")
    back = su.convert_sd3_transformer_checkpoint_to_diffusers(
        {k.removeprefix(sf.UNET): v for k, v in original.items() if k.startswith(sf.UNET)})
    want = tr.state_dict()
    assert set(back) == set(want) and all(back[k].shape == want[k].shape for k in want)
    for comp, convert in (("text_encoder", lambda o: su.convert_ldm_clip_checkpoint(o, sf.LAYOUT["sd3"]["text_encoder"][0])),
                          ("text_encoder_2", lambda o: su.convert_ldm_clip_checkpoint(o, sf.LAYOUT["sd3"]["text_encoder_2"][0])),
                          ("text_encoder_3", su.convert_sd3_t5_checkpoint_to_diffusers)):
        got = convert(original)
        assert set(got) == set(models[comp].state_dict()), comp

    shapes = {k: list(v.shape) for k, v in original.items()}
    arch, why = sf.classify(sf.Checkpoint(Path("m.safetensors"), shapes, {}))
    assert arch == "sd3" and ("SD 3.5 Medium" if name == "sd35-medium" else "SD 3.5 Large") in why
    assert "the file holds transformer, VAE, CLIP-L, CLIP-G, T5" in why
    alone = {k: s for k, s in shapes.items() if k.startswith(sf.UNET)}
    arch, why = sf.classify(sf.Checkpoint(Path("t.safetensors"), alone, {}))
    assert arch == "sd3" and why.endswith("the file holds transformer")


@pytest.mark.slow
def test_sd3_round_trip_ours_and_diffusers(tmp_path, caplog, tiny_pipeline):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    pipe = tiny_pipeline(arch="sd3")
    out = tmp_path / "sd3.safetensors"
    save_single_file(pipe, out)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    assert {sf.UNET + "joint_blocks.2.context_block.adaLN_modulation.1.weight", sf.UNET + "x_embedder.proj.weight",
            "first_stage_model.decoder.conv_out.weight", "text_encoders.t5xxl.transformer.shared.weight",
            "text_encoders.clip_g.transformer.text_projection.weight"} <= keys
    with caplog.at_level("INFO", logger="lora_sd"):
        back = load_pipeline(str(out))
    detected = [r.getMessage() for r in caplog.records if "detected" in r.getMessage()]
    assert len(detected) == 1 and "Stable Diffusion 3.5" in detected[0] and "3 joint blocks" in detected[0]
    assert type(back).__name__ == "StableDiffusion3Pipeline" and back._lora_sd_random_weights
    assert_same_weights(pipe, back, COMPONENTS)
    assert sf.detect_checkpoint(out)[0] == "sd3"

    # the independent reader: diffusers' from_single_file, given the tiny model's folder as config
    folder = tmp_path / "folder"
    pipe.save_pretrained(str(folder))
    theirs = StableDiffusion3Pipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    assert_same_weights(pipe, theirs, COMPONENTS)
    transformer = SD3Transformer2DModel.from_single_file(str(out), config=str(folder), subfolder="transformer",
                                                         local_files_only=True)
    assert_same_weights(pipe, SimpleNamespace(transformer=transformer), ["transformer"])


def _rewrite(src: Path, dst: Path, keep=lambda k: True, metadata=None):
    """`src` with only the tensors `keep` accepts and the given metadata (default: src's)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        meta = f.metadata() if metadata is None else metadata
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.slow
def test_sd3_transformer_only_file_takes_the_rest_from_model_config(tmp_path, tiny_pipeline):
    pipe = tiny_pipeline(arch="sd3")
    full = tmp_path / "full.safetensors"
    save_single_file(pipe, full)
    alone = _rewrite(full, tmp_path / "transformer.safetensors", keep=lambda k: k.startswith(sf.UNET))
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(str(alone))
    msg = str(e.value)
    assert "\n" not in msg and str(alone) in msg and "holds only the transformer" in msg and "model.config" in msg
    assert "stabilityai/stable-diffusion-3.5-medium" in msg

    folder = tmp_path / "folder"
    pipe.save_pretrained(str(folder))
    back = load_pipeline(str(alone), config=str(folder))
    assert_same_weights(pipe, back, COMPONENTS)
    assert type(back.tokenizer_3).__name__ == type(pipe.tokenizer_3).__name__


@pytest.mark.slow
def test_sd3_t5_tokenizer_comes_from_model_config(tmp_path, tiny_pipeline):
    """A real (not random-weights) file: CLIP's tokenizers come offline, T5's only from model.config."""
    pipe = tiny_pipeline(arch="sd3")
    full = tmp_path / "full.safetensors"
    save_single_file(pipe, full)
    with safe_open(str(full), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != sf.META_RANDOM}
    real = _rewrite(full, tmp_path / "real.safetensors", metadata=meta)
    with pytest.raises(ModelLoadError, match="T5's tokenizer") as e:
        load_pipeline(str(real))
    assert "\n" not in str(e.value) and "model.config" in str(e.value) and "tokenizer_3" in str(e.value)
    folder = tmp_path / "folder"
    pipe.save_pretrained(str(folder))
    back = load_pipeline(str(real), config=str(folder))
    assert back.tokenizer_3("a red square").input_ids == pipe.tokenizer_3("a red square").input_ids
    assert len(back.tokenizer) == 49408 and not getattr(back, "_lora_sd_random_weights", False)


def test_mmdit_bad_inputs_one_line_each(tmp_path):
    files = {"diffusers_layout": ({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, "diffusers layout"),
             "lora": ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 2)}, "LoRA"),
             "odd_size": ({sf.UNET + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(6, 2),
                           sf.UNET + "x_embedder.proj.weight": torch.zeros(8, 16, 2, 2)}, "SD 3.5 Medium or SD 3.5 Large")}
    for name, (tensors, words) in files.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ModelLoadError) as e:
            load_pipeline(str(path))
        msg = str(e.value)
        assert words in msg and str(path) in msg and "\n" not in msg and "expected" in msg, (name, msg)


@pytest.mark.slow
def test_released_hub_id_loads_with_its_pipeline_class(monkeypatch, tiny_pipeline):
    """stabilityai/stable-diffusion-3.5-medium is read by StableDiffusion3Pipeline, without the SD 1.x
    safety-checker switches (diffusers would warn that they are not expected)."""
    from diffusers import StableDiffusion3Pipeline
    calls = []

    def fake(cls, name, **kw):
        calls.append((cls.__name__, name, kw))
        return tiny_pipeline(arch="sd3")
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", classmethod(fake))
    pipe = load_pipeline("stabilityai/stable-diffusion-3.5-medium", variant="fp16")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    (cls, name, kw), = calls
    assert (cls, name) == ("StableDiffusion3Pipeline", "stabilityai/stable-diffusion-3.5-medium")
    assert "safety_checker" not in kw and kw["variant"] == "fp16"
