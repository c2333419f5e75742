"""The memory switches in `lora-sd train`: model.weight_dtype (fp8_e4m3 / int8 storage), train.offload_blocks,
the low-memory optimizers, and their bad settings as one line before any model loads."""
import pytest
import torch
from safetensors.torch import load_file

from lora_core.errors import ConfigError, MissingPackageError
from lora_core.lowmem import QuantizedConv2d, QuantizedLinear
from lora_core.offload import model_blocks
from lora_sd.archs import config_blocks, spec_of
from lora_sd.models import load_pipeline
from lora_sd.testing import train_config
from lora_sd.train import run_training


@pytest.mark.slow
def test_fp8_denoiser_int8_text_encoder_fused_adafactor_trains(tiny_sd_model, sd_dataset, tmp_path):
    pytest.importorskip("torchao")
    cfg = train_config(tmp_path / "run", tiny_sd_model, sd_dataset, tmp_path / "cache",
                       model={"weight_dtype": {"denoiser": "fp8_e4m3", "text_encoder": "int8"}},
                       train={"max_steps": 3, "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0,
                              "gradient_checkpointing": True, "mixed_precision": "bf16", "checkpoint_every": 0,
                              "offload_blocks": 2})
    pipe = load_pipeline(tiny_sd_model)
    assert run_training(cfg, pipe=pipe)["state"] == "done"
    unet_layers = [m for m in pipe.unet.modules() if isinstance(m, (QuantizedLinear, QuantizedConv2d))]
    assert unet_layers and all(m.storage == "fp8_e4m3" and m.qweight.dtype == torch.float8_e4m3fn
                               for m in unet_layers)
    assert any(isinstance(m, QuantizedConv2d) for m in unet_layers)
    # two blocks offloaded: after the last backward pass one of them is back on the host (empty placeholders)
    assert any(t.numel() == 0 for t in pipe.unet.buffers())
    te_layers = [m for m in pipe.text_encoder.modules() if isinstance(m, QuantizedLinear)]
    assert te_layers and all(m.storage == "int8" for m in te_layers)
    sd = load_file(str(tmp_path / "run" / "test_lora.safetensors"))
    ups = [t for k, t in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in ups)   # trained, exported fp32
    own = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert own and all(p.dtype == torch.float32 for p in own.values())


@pytest.mark.parametrize("over, err, match", [
    ({"train": {"optimizer": "adamw8bit"}}, MissingPackageError, "pip install bitsandbytes"),
])
def test_bad_memory_settings_fail_before_the_model_loads(tiny_sd_model, sd_dataset, tmp_path, monkeypatch,
                                                         over, err, match):
    import sys
    import lora_sd.train as train_mod
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # as if it were not installed

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(train_mod, "load_pipeline", no_load)
    cfg = train_config(tmp_path / "run", tiny_sd_model, sd_dataset, tmp_path / "cache", **over)
    with pytest.raises(err, match=match):
        run_training(cfg)


def test_offloading_more_blocks_than_the_unet_has_is_one_line(tiny_sd_model, sd_dataset, tmp_path, tiny_pipeline):
    cfg = train_config(tmp_path / "run", tiny_sd_model, sd_dataset, tmp_path / "cache", train={"offload_blocks": 99})
    with pytest.raises(ConfigError, match="train.offload_blocks = 99: the UNet2DConditionModel has only 5 blocks"):
        run_training(cfg, pipe=tiny_pipeline())


def test_offloading_more_blocks_than_the_config_names_is_one_line_before_the_model_loads(tiny_sd_model, sd_dataset,
                                                                                       tmp_path, monkeypatch):
    import lora_sd.train as train_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(train_mod, "load_pipeline", no_load)
    cfg = train_config(tmp_path / "run", tiny_sd_model, sd_dataset, tmp_path / "cache", train={"offload_blocks": 6})
    with pytest.raises(ConfigError, match=r"train.offload_blocks = 6: the UNet2DConditionModel has only 5 blocks "
                                          r"\(.*unet/config.json\); use at most 5$"):
        run_training(cfg)


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "flux"])
def test_blocks_counted_from_the_config_are_the_blocks_offloading_finds(tiny_pipeline, arch):
    pipe = tiny_pipeline(arch=arch)
    den = getattr(pipe, spec_of(pipe).denoiser)
    assert config_blocks(dict(den.config)) == len(model_blocks(den)) > 0
