"""The training forms offer the adapter type (lora_core LoraConfig.type) with the fields each type adds: the SD
form every type its kohya/LyCORIS files hold (lora, loha, lokr, and oft as full weight differences) and the switch
for the diffusers-layout copy they cannot have; the text-task form every type, OFT's fields included. The form
builds the config a user would write."""
import pytest

from lora_core.errors import ConfigError
from lora_gui.controller import Controller
from lora_gui.job_kinds import KINDS
from lora_gui.workspace import Workspace


def _form(tmp_path, kind):
    ctrl = Controller(Workspace(tmp_path / "ws"))
    base = ctrl.configs.default(kind)
    return ctrl, base, ctrl.configs.form_values(kind, base)


def test_sd_form_trains_every_type_and_names_the_diffusers_switch(tmp_path):
    fields = {f.key: f for f in KINDS["sd-train"].fields}
    assert fields["lora.type"].choices == ("lora", "loha", "lokr", "oft")   # OFT: written as full differences
    assert {"lora.decompose_factor", "lora.decompose_both", "lora.oft_block_size", "lora.coft",
            "output.save_diffusers"} <= set(fields)
    ctrl, base, shown = _form(tmp_path, "sd-train")
    assert (shown["lora.type"], shown["output.save_diffusers"]) == ("lora", True)
    with pytest.raises(ConfigError, match=r"lora.type = 'lokr' has no diffusers LoRA form"):
        ctrl.configs.build("sd-train", base, {**shown, "lora.type": "lokr"})
    cfg = ctrl.configs.build("sd-train", base, {**shown, "lora.type": "lokr", "output.save_diffusers": False,
                                                "lora.decompose_factor": 4, "lora.decompose_both": True})
    assert (cfg.lora.type, cfg.lora.decompose_factor, cfg.lora.decompose_both) == ("lokr", 4, True)
    assert not cfg.output.save_diffusers
    with pytest.raises(ConfigError, match=r"lora.type = 'oft' has no diffusers LoRA form"):
        ctrl.configs.build("sd-train", base, {**shown, "lora.type": "oft"})
    cfg = ctrl.configs.build("sd-train", base, {**shown, "lora.type": "oft", "output.save_diffusers": False,
                                                "lora.oft_block_size": 8})
    assert (cfg.lora.type, cfg.lora.oft_block_size, cfg.output.save_diffusers) == ("oft", 8, False)


def test_llm_form_offers_every_type_with_ofts_fields(tmp_path):
    fields = {f.key: f for f in KINDS["llm-train"].fields}
    assert fields["lora.type"].choices == ("lora", "loha", "lokr", "oft")
    ctrl, base, shown = _form(tmp_path, "llm-train")
    cfg = ctrl.configs.build("llm-train", base, {**shown, "lora.type": "oft", "lora.oft_block_size": 16,
                                                 "lora.coft": True})
    assert (cfg.lora.type, cfg.lora.oft_block_size, cfg.lora.coft) == ("oft", 16, True)
