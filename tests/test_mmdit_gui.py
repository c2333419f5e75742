"""SD 3.5 and Flux in the GUI: the base-model input detects them, the Train form's rectified-flow section holds the
[flow] fields (shown only for SD 3.5 and Flux; Flux's own only for Flux), the Targets presets and the Generate tab's samplers are the ones that fit the
detected architecture, the form's values build a valid SD 3.5 config, and the Compare tab's grid runs on SD 3.5
and Flux."""
import json
import time

import pytest

from lora_core.errors import ConfigError
from lora_gui.controller import Controller
from lora_gui.forms import ARCH_GROUPS, group_shown, sampler_choices, target_choices, target_for
from lora_gui.job_kinds import KINDS
from lora_gui.services.grid_request import GridRequest
from lora_gui.workspace import Workspace
from lora_sd.config import JOINT_ATTN, SAMPLERS, TARGET_PRESETS


def test_mmdits_are_detected_below_the_base_model_input(tmp_path):
    ctrl = Controller(Workspace(tmp_path / "ws"))
    arch, line = ctrl.configs.arch_note("tiny-sd3")
    assert arch == "sd3" and line.startswith("**Architecture: SD 3.5**")
    arch, line = ctrl.configs.arch_note("tiny-flux-schnell")
    assert arch == "flux" and line.startswith("**Architecture: FLUX.1**")


def test_the_generate_tab_offers_the_samplers_that_fit_the_architecture():
    assert sampler_choices("sd3") == sampler_choices("flux") == ["auto", "flow_euler"]
    assert "flow_euler" not in sampler_choices("sdxl") and {"auto", "ddim", "euler"} <= set(sampler_choices("sd1"))
    assert sampler_choices("") == ["auto", *SAMPLERS]   # unknown (a hub id): all of them


def test_target_presets_follow_the_architecture():
    assert target_choices("sd3") == target_choices("flux") == ("joint_attn", "joint_attn_image", "attn+ff", "all_linear")
    assert "joint_attn" not in target_choices("sdxl") and target_choices("sd1")[0] == "cross_attn"
    assert set(target_choices("")) == set(TARGET_PRESETS)
    # a preset of the other family becomes this family's default; a fitting preset or a regex stays
    assert target_for("sd3", "cross_attn") == "joint_attn" and target_for("sd1", "attn+ff") == "cross_attn"
    assert target_for("sd3", "attn+ff") == "attn+ff" and target_for("sd3", r".*to_q") == r".*to_q"


def test_the_flow_sections_hold_the_flow_fields_and_build_a_valid_config(tmp_path):
    ctrl = Controller(Workspace(tmp_path / "ws"))
    fields = KINDS["sd-train"].fields
    assert {f.key for f in fields if f.group == "flow"} == {
        "flow.timestep_density", "flow.logit_mean", "flow.logit_std", "flow.mode_scale", "flow.sigmoid_scale",
        "flow.loss_weighting", "flow.shift"}
    assert {f.key for f in fields if f.group == "flux"} == {"flow.flux_shift", "flow.guidance_scale", "flow.single_layers"}
    assert next(f for f in fields if f.key == "flow.timestep_density").choices == (
        "uniform", "logit_normal", "mode", "sigmoid")
    shown = {arch: [g for g in ARCH_GROUPS if group_shown(g, arch)] for arch in ("sd1", "sdxl", "sd3", "flux", "")}
    assert shown == {"sd1": [], "sdxl": ["sdxl"], "sd3": ["flow"], "flux": ["flow", "flux"], "": []}
    base = ctrl.configs.default("sd-train")
    shown = ctrl.configs.form_values("sd-train", base)
    shown.update({"model.pretrained": "tiny-sd3", "lora.target_modules": target_for("sd3", shown["lora.target_modules"]),
                  "flow.timestep_density": "mode", "flow.mode_scale": 0.8, "flow.shift": 3.0})
    cfg = ctrl.configs.build("sd-train", base, shown)
    assert (cfg.model.pretrained, cfg.lora.target_modules) == ("tiny-sd3", JOINT_ATTN)
    assert (cfg.flow.timestep_density, cfg.flow.mode_scale, cfg.flow.shift) == ("mode", 0.8, 3.0)
    assert shown["flow.single_layers"] == ""   # all single blocks
    shown.update({"model.pretrained": "tiny-flux", "flow.flux_shift": True, "flow.guidance_scale": 3.5,
                  "flow.single_layers": "2, 0"})
    cfg = ctrl.configs.build("sd-train", base, shown)
    assert (cfg.model.pretrained, cfg.flow.flux_shift, cfg.flow.guidance_scale) == ("tiny-flux", True, 3.5)
    assert cfg.flow.single_layers == [2, 0]
    assert ctrl.configs.build("sd-train", base, {**shown, "flow.single_layers": "top:3"}).flow.single_layers == "top:3"
    with pytest.raises(ConfigError, match=r"^Single blocks trained \(flow.single_layers\): write indices such as"):
        ctrl.configs.build("sd-train", base, {**shown, "flow.single_layers": "0, two"})
    with pytest.raises(ConfigError, match=r"flow.single_layers must be a list of layer indices or 'top:K'"):
        ctrl.configs.build("sd-train", base, {**shown, "flow.single_layers": "top:0"})


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_compare_tab_grid_on_an_mmdit(tmp_path, model):
    """The Compare tab's grid (`lora-sd grid` in the background) on an MMDiT base model: two seeds, each cell made
    with the flow-matching sampler ("auto") and its parameters in index.json."""
    ctrl = Controller(Workspace(tmp_path / "ws").create())
    request = GridRequest([], [], "1", "a red square", "0, 1", model, 32, 2, 3.0)
    args, _ = request.cli_args(ctrl.ws)
    assert args[args.index("--scheduler") + 1] == "auto"
    name = ctrl.grids.start("g", request)
    end = time.time() + 300
    while (snap := ctrl.grids.state(name)).state == "running" and time.time() < end:
        time.sleep(0.5)
    assert snap.state == "done", snap.error
    index = json.loads((ctrl.grids.folder(name).path / "index.json").read_text())
    assert [c["generation"]["seed"] for c in index["cells"]] == [0, 1]
    assert {c["generation"]["scheduler"] for c in index["cells"]} == {"flow_euler"}
    assert {c["generation"]["model"] for c in index["cells"]} == {model}
