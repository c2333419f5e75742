"""SDXL trained by `lora-sd train` with lora.type = loha and lokr on the UNet and both text encoders: the run's
kohya/LyCORIS file, loaded by LyCORIS' own loader (`lycoris.kohya.create_network_from_weights`, then `apply_to`)
into a fresh tiny SDXL, gives the trained model's UNet and text-encoder outputs. SD 1.x trained with lora.type = oft:
its file holds full weight differences (LyCORIS' `full`), which LyCORIS (apply_to and merge_to), our loader and
`lora-sd merge` read to the trained model's outputs; and why it cannot be an `oft_blocks` file."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import helpers
import lora_core as lc
from lora_sd import formats, train
from lora_sd.testing import make_images, train_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

pytest.importorskip("lycoris.kohya")
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_lyco") / "images"
    make_images(root, 4, size=(32, 32))
    return root


def _trained_run(path, images, monkeypatch, kind: str, model: str = "tiny-sdxl"):
    """Train 3 steps of `kind` on the UNet and every text encoder of `model`; returns the trained pipeline (the
    very objects the trainer trained)."""
    seen = {}
    add = train._add_adapters

    def capture(cfg, pipe):
        seen["pipe"] = pipe
        return add(cfg, pipe)

    monkeypatch.setattr(train, "_add_adapters", capture)
    sizes = ({"oft_block_size": 4}, {"oft_block_size": 4}) if kind == "oft" else \
        ({"r": 4, "alpha": 3.0}, {"r": 2, "alpha": 3.0})
    te = {"type": kind, **sizes[1]}
    tes = {"text_encoder_lora": te, **({"text_encoder_2_lora": te} if model == "tiny-sdxl" else {})}
    cfg = train_config(path, model, images, path.parent / "cache", output={"save_diffusers": False},
                       lora={"type": kind, **sizes[0], "target_modules": "cross_attn+conv"}, **tes,
                       train={"max_steps": 3, "checkpoint_every": 0, "learning_rate": 2e-2, "lr_warmup_steps": 0})
    assert train.run_training(cfg)["state"] == "done"
    pipe = seen["pipe"]
    for m in helpers.components(pipe).values():
        m.eval()
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_trained_sdxl_file_loads_in_lycoris(images, tmp_path, monkeypatch, tiny_pipeline, kind):
    pipe = _trained_run(tmp_path / "run", images, monkeypatch, kind)
    expected = _moved(pipe, tiny_pipeline, "sdxl")
    assert expected.keys() == {"unet", "text_encoder", "text_encoder_2"}
    sd, meta = formats.read_safetensors(tmp_path / "run" / "test_lora.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert {k.split("_")[1] for k in sd} == {"unet", "te1", "te2"}   # SGM / lora_te1_ / lora_te2_ names
    assert not any(k.endswith(("lora_down.weight", "lora_up.weight")) for k in sd)
    helpers.lycoris_on_diffusers(monkeypatch)
    theirs = tiny_pipeline(0, "sdxl")
    helpers.lycoris_load(theirs, sd, merge=False)
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(theirs), "LyCORIS' loader (apply_to)")


def _moved(pipe, tiny_pipeline, arch: str) -> dict:
    """The trained pipeline's outputs, checked to differ from the base's in every part (else comparing says little)."""
    expected = helpers.unet_te_outputs(pipe)
    base = helpers.unet_te_outputs(tiny_pipeline(0, arch))
    for name, out in expected.items():
        assert (out - base[name]).abs().max() > 1e-3 * out.abs().max(), name
    return expected


@pytest.mark.slow
def test_trained_oft_file_loads_in_lycoris_and_ours(images, tmp_path, monkeypatch, tiny_pipeline):
    """SD 1.x, lora.type = oft on the UNet (cross-attention and 3x3 convs) and the text encoder: the file holds each
    adapted weight's W' - W (LyCORIS' `full`: `diff`, the weight's shape, no alpha), which LyCORIS' loader uses
    every key of (apply_to and merge_to), and which our loader (`generate`) and `lora-sd merge` read: all give
    the trained model's outputs. `convert --to diffusers` refuses it in one line."""
    from lora_core.adapter_files import inspect
    from lora_sd.cli import main
    from lora_sd.generate import load_adapters
    from lora_sd.models import load_pipeline
    pipe = _trained_run(tmp_path / "run", images, monkeypatch, "oft", "tiny-random")
    expected = _moved(pipe, tiny_pipeline, "sd1")
    assert expected.keys() == {"unet", "text_encoder"}
    path = tmp_path / "run" / "test_lora.safetensors"
    sd, meta = formats.read_safetensors(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "full", "trained_as": "oft"}
    weights = sorted(tuple(layer.base_layer.weight.shape) for m in helpers.components(pipe).values()
                     for _, layer in lc.lora_layers(m))   # one diff per adapted module, of its weight's shape
    assert all(k.endswith(".diff") for k in sd) and sorted(tuple(t.shape) for t in sd.values()) == weights
    assert any(len(s) == 4 and s[2:] == (3, 3) for s in weights)   # the convs too
    helpers.lycoris_on_diffusers(monkeypatch)
    for merge in (False, True):
        theirs = tiny_pipeline(0, "sd1")
        helpers.lycoris_load(theirs, sd, merge=merge)
        helpers.assert_same_outputs(expected, helpers.unet_te_outputs(theirs), f"LyCORIS' loader (merge={merge})")
    ours = load_pipeline("tiny-random")
    load_adapters(ours, [(str(path), 1.0)])
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(ours), "our loader")
    assert main(["merge", "--model", "tiny-random", "--lora", f"{path}:1", "--out", str(tmp_path / "merged")]) == 0
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(load_pipeline(str(tmp_path / "merged"))),
                                "lora-sd merge")
    assert inspect(path)["adapter_types"] == {"full": len(sd)}
    with pytest.raises(ValueError, match="a full adapter has no diffusers LoRA form") as e:
        formats.convert(path, tmp_path / "d.safetensors", "diffusers")
    assert "\n" not in str(e.value)


def test_oft_has_no_oft_blocks_form():
    """Why lora.type = oft is written as full weight differences, not `oft_blocks` (docs/sd.md): LyCORIS' own
    diag-OFT module (`oft_blocks`) rotates the output, keeping the norm of every column of W; ours (PEFT's) rotates
    the input, keeping the rows' norms and changing the columns', so no oft_blocks equals it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 12))
    W = net[0].weight.detach().clone()
    theirs = DiagOFTModule("lora_unet_x", copy.deepcopy(net[0]), lora_dim=4)
    with torch.no_grad():
        theirs.oft_blocks.normal_(0, 0.3)
        w_theirs = theirs.make_weight().detach()
    lc.add_lora(net, lc.LoraConfig(type="oft", oft_block_size=4, use_cayley_neumann=False, target_modules=["0"]))
    with torch.no_grad():
        for p in lc.lora_parameters(net):
            p.normal_(0, 0.3)
        w_ours = W + dict(lc.lora_layers(net))["0"].delta_weight("default")
    for w, kept, changed in ((w_theirs, 0, 1), (w_ours, 1, 0)):
        torch.testing.assert_close(w.norm(dim=kept), W.norm(dim=kept), rtol=1e-5, atol=1e-6)
        assert (w.norm(dim=changed) - W.norm(dim=changed)).abs().max() > 1e-2
