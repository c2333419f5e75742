"""SD architectures in the GUI: the SD base-model inputs show the architecture lora_sd detects (tiny names,
diffusers folders, single files; without torch in the GUI process), the SDXL section's field turns
SDXL's second text-encoder LoRA on, and a rank of 0 leaves the optional table out."""
import textwrap

import pytest

from lora_core.errors import ConfigError
from lora_gui.config_data import apply_form
from lora_gui.field_kinds import TABLE_RANK
from lora_gui.forms import Field
from lora_gui.job_kinds import KINDS
from lora_gui.workspace import Workspace

from helpers import HEAVY, run_python_json


def test_arch_note_in_a_torch_free_process(tmp_path, tiny_pipeline):
    from lora_sd.models import save_single_file, save_tiny_pipeline
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    save_tiny_pipeline(ws / "models" / "xl", arch="sdxl")
    save_single_file(tiny_pipeline(arch="sd2"), ws / "models" / "sd2.safetensors")
    (ws / "models" / "notes.safetensors").write_text("not a checkpoint")
    code = textwrap.dedent(f"""
        import json, sys
        from lora_gui.controller import Controller
        from lora_gui.workspace import Workspace
        ctrl = Controller(Workspace({str(ws)!r}))
        notes = {{m: ctrl.configs.arch_note(m) for m in
                 ("tiny", "tiny-random", "tiny-sdxl", "models/xl", "models/sd2.safetensors", "models/notes.safetensors",
                  "owner/some-model", "models/missing.safetensors")}}
        print(json.dumps({{"notes": notes, "heavy": [h for h in {HEAVY!r} if h in sys.modules]}}))
    """)
    res = run_python_json(code)
    assert res["heavy"] == []
    n = res["notes"]
    assert n["tiny"][0] == "sd1" and "SD 1.x" in n["tiny"][1] and "pretrained" in n["tiny"][1]
    assert n["tiny-random"][0] == "sd1" and "random weights" in n["tiny-random"][1]
    assert n["tiny-sdxl"][0] == "sdxl" and "SDXL" in n["tiny-sdxl"][1]
    assert n["models/xl"][0] == "sdxl" and "StableDiffusionXLPipeline" in n["models/xl"][1]
    assert n["models/sd2.safetensors"][0] == "sd2" and "OpenCLIP" in n["models/sd2.safetensors"][1]
    arch, line = n["models/notes.safetensors"]
    assert arch == "" and line.startswith("⚠") and "notes.safetensors" in line and "\n" not in line
    assert n["owner/some-model"] == ["", "Architecture: a hub id: its architecture is read when it is loaded"]
    arch, line = n["models/missing.safetensors"]
    assert arch == "" and line.startswith("⚠") and "missing.safetensors" in line


def _sd_form(ctrl, base=None, **values):
    """The SD form as the GUI fills it from a config (`base`: the GUI's default, model tiny-sdxl)."""
    fields = list(KINDS["sd-train"].fields)
    if base is None:
        base = ctrl.configs.default("sd-train")
        base["model"]["pretrained"] = "tiny-sdxl"
    shown = ctrl.configs.form_values("sd-train", base)
    for key, v in values.items():
        assert key in shown
        shown[key] = v
    return fields, base, shown


def test_text_encoder_rank_fields_make_or_drop_the_optional_tables(tmp_path):
    from lora_gui.controller import Controller
    ctrl = Controller(Workspace(tmp_path / "ws"))
    fields, base, shown = _sd_form(ctrl)
    te2 = next(f for f in fields if f.key == "text_encoder_2_lora.r")
    assert te2.group == "sdxl" and te2.kind is TABLE_RANK
    assert te2.shown(base) == 0 and shown["text_encoder_2_lora.r"] == 0   # no table: shown as 0 (off)
    data = apply_form(base, fields, shown, ctrl.ws)
    assert "text_encoder_lora" not in data and "text_encoder_2_lora" not in data
    fields, base, shown = _sd_form(ctrl, **{"text_encoder_2_lora.r": 4, "text_encoder_lora.r": ""})
    data = apply_form(base, fields, shown, ctrl.ws)
    assert data["text_encoder_2_lora"] == {"r": 4} and "text_encoder_lora" not in data
    cfg = ctrl.configs.build("sd-train", base, shown)
    assert cfg.text_encoder_2_lora.r == 4 and cfg.text_encoder_lora is None
    # the table a loaded config has is shown with its rank, and set back to 0 it is removed
    base = {**base, "text_encoder_2_lora": {"r": 8, "alpha": 8.0}}
    fields, base, shown = _sd_form(ctrl, base)
    assert shown["text_encoder_2_lora.r"] == 8
    shown["text_encoder_2_lora.r"] = 0
    assert "text_encoder_2_lora" not in apply_form(base, fields, shown, ctrl.ws)


def test_a_bad_rank_names_the_field(tmp_path):
    ws = Workspace(tmp_path / "ws")
    f = Field("text_encoder_lora.r", "Text-encoder LoRA rank (0 = off)", TABLE_RANK)
    try:
        f.parse("2.5", ws)
    except ConfigError as e:
        assert "text_encoder_lora.r" in str(e) and "whole number" in str(e)
    else:
        raise AssertionError("2.5 accepted as a rank")


def test_fit_badge_maps_text_encoder_names_with_and_without_text_model():
    """Our and kohya's files name CLIP modules text_model.encoder...; this transformers' CLIPTextModel has
    no text_model level: the header-only fit check maps both spellings (and kohya's) onto the base's module."""
    from lora_gui.services.fit import module_aliases
    names = module_aliases("text_encoder.encoder.layers.0.self_attn.q_proj")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in names
    assert {"lora_te_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= set(names)
    assert module_aliases("unet.mid_block.attentions.0.proj_in") == ["lora_unet_mid_block_attentions_0_proj_in"]



# kohya's MMDiT names, spelled here by sd-scripts' rule ("lora_unet_" + the original module, "." -> "_"), and
# the diffusers modules each holds (diffusers' single-file converters): fused ones are cut into their parts
_J, _S = "transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0."
KOHYA_MMDIT = {
    "sd3": {"lora_unet_joint_blocks_0_x_block_attn_qkv": (_J + "attn.to_q", _J + "attn.to_k", _J + "attn.to_v"),
            "lora_unet_joint_blocks_0_context_block_mlp_fc1": (_J + "ff_context.net.0.proj",)},
    "flux": {"lora_unet_single_blocks_0_linear1": (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
             "lora_unet_double_blocks_0_txt_attn_qkv": (_J + "attn.add_q_proj", _J + "attn.add_k_proj",
                                                        _J + "attn.add_v_proj")}}


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_fit_places_kohya_mmdit_names_on_their_fused_parts(arch, tiny_pipeline, tmp_path):
    """The header-only fit check reads an SD 3 / Flux kohya file's native names: a fused module (q, k, v;
    Flux's linear1 = q, k, v + the MLP input) is each of its parts at the base's own shapes; a text encoder's
    lora_te1_ name lands on CLIP-L; a fused module of the wrong width stays as the file names it (unmatched)."""
    import torch
    from safetensors.torch import save_file
    from lora_gui.services.fit import adapter_shapes
    from lora_sd.formats import model_shapes
    pipe = tiny_pipeline(arch=arch)
    modules = model_shapes({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})[0]
    te = next(k for k in modules if k.startswith("text_encoder.") and k.endswith("layers.0.self_attn.q_proj"))
    flat = "lora_te1_text_model_" + te.partition(".")[2].removeprefix("text_model.").replace(".", "_")
    tensors, want = {}, {}
    for name, paths in {**KOHYA_MMDIT[arch], flat: (te,)}.items():
        want.update({p: tuple(modules[p]) for p in paths})
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, modules[paths[0]][0])
        tensors[f"{name}.lora_up.weight"] = torch.zeros(sum(modules[p][1] for p in paths), 2)
    save_file(tensors, tmp_path / "k.safetensors")
    assert adapter_shapes(tmp_path / "k.safetensors", modules) == want

    first, paths = next(iter(KOHYA_MMDIT[arch].items()))
    tensors[f"{first}.lora_up.weight"] = torch.zeros(sum(modules[p][1] for p in paths) + 1, 2)
    save_file(tensors, tmp_path / "bad.safetensors")
    got = adapter_shapes(tmp_path / "bad.safetensors", modules)
    assert first in got and not set(paths) & set(got) and len(got) == len(want) - len(paths) + 1
