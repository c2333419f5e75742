"""SD 3.5 and Flux in the GUI: the base-model input detects them, the Generate tab's samplers are the ones that fit
the detected architecture, and the Compare tab's grid runs on SD 3.5 and Flux."""
import json
import time

import pytest

from lora_gui.controller import Controller
from lora_gui.forms import sampler_choices
from lora_gui.services.grid_request import GridRequest
from lora_gui.workspace import Workspace
from lora_sd.config import SAMPLERS


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
