"""kohya/LyCORIS files of every adapter type (LoRA, DoRA + LoCon, LoHa, LoKr) for SD 1.x and SDXL, read by a
real third-party loader: LyCORIS' own (`lycoris.kohya.create_network_from_weights`, then `merge_to`) into the
diffusers pipeline's modules, compared with the trained model, with our loader and with a merge computed here
from the file's tensors by LyCORIS' formulas. Files written by the `lycoris-lora` package itself read back to
LyCORIS' own weights. Full weight differences (LyCORIS' `full`, how an OFT is written) read exactly."""
from __future__ import annotations

import json

import pytest
import torch

import lora_core as lc
from lora_core import LoraConfig, LoraLoadError
import helpers

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

lycoris_kohya = pytest.importorskip("lycoris.kohya")

TE = r".*(q_proj|k_proj|v_proj|out_proj)$"


def _unet_configs():
    from lora_sd.config import TARGET_PRESETS
    targets = TARGET_PRESETS["cross_attn+conv"]
    return {"lora": LoraConfig(r=4, alpha=2, target_modules=TARGET_PRESETS["cross_attn"]),
            "dora_locon": LoraConfig(r=4, alpha=2, conv_r=2, conv_alpha=3, use_dora=True, target_modules=targets),
            "loha": LoraConfig(type="loha", r=4, alpha=3, target_modules=targets),
            "lokr": LoraConfig(type="lokr", r=2, alpha=3, target_modules=targets)}


def _train(pipe, kind: str, seed: int = 3):
    """The pipeline with a random (non-trivial) adapter of `kind` on its UNet and text encoders."""
    cfg = _unet_configs()[kind]
    lc.add_lora(pipe.unet, cfg)
    for te in helpers.text_encoders(pipe).values():
        lc.add_lora(te, LoraConfig(**{**cfg.__dict__, "target_modules": TE, "conv_r": None, "conv_alpha": None}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in helpers.components(pipe).values():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
                elif p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe


@pytest.fixture
def lycoris_on_diffusers(monkeypatch):
    helpers.lycoris_on_diffusers(monkeypatch)


def _hand_delta(parts: dict, weight: torch.Tensor) -> torch.Tensor:
    """The merged weight of one module from its file tensors, by LyCORIS' formulas (written out here)."""
    def factor(name):
        if name in parts:
            return parts[name].flatten(1), None
        return parts[name + "_a"] @ parts[name + "_b"], parts[name + "_a"].shape[1]

    W = weight.flatten(1)
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"].flatten(1), parts["lora_up.weight"].flatten(1)
        new = W + parts["alpha"] / down.shape[0] * up @ down
        if "dora_scale" in parts:
            new = parts["dora_scale"].reshape(-1, 1) * new / new.norm(dim=1, keepdim=True)
    elif "hada_w1_a" in parts:
        r = parts["hada_w1_b"].shape[0]
        new = W + (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * parts["alpha"] / r
    else:
        (w1, r1), (w2, r2) = factor("lokr_w1"), factor("lokr_w2")
        r = r1 or r2
        new = W + torch.kron(w1, w2) * (parts["alpha"] / r if r else 1.0)
    return new.reshape(weight.shape)


def _hand_merge(pipe, sd: dict) -> None:
    """Merge the file's tensors into the pipeline by _hand_delta (module names as LyCORIS finds them)."""
    from lora_sd import formats
    names = formats.kohya_names(helpers.components(pipe))
    by_base: dict[str, dict] = {}
    for k, t in helpers.for_lycoris(sd, pipe).items():
        base, _, part = k.partition(".")
        by_base.setdefault(base, {})[part] = t.float()
    comps = helpers.components(pipe)
    with torch.no_grad():
        for base, parts in by_base.items():
            comp, _, path = names[base].partition(".")
            module = comps[comp].get_submodule(path)
            module.weight.copy_(_hand_delta(parts, module.weight))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "dora_locon", "loha", "lokr"])
def test_lycoris_loads_our_kohya_files(tiny_pipeline, tmp_path, lycoris_on_diffusers, arch, kind):
    from lora_sd import formats
    trained = _train(tiny_pipeline(arch=arch), kind)
    path = tmp_path / f"{kind}.safetensors"
    formats.write_adapter(path, formats.from_model(helpers.components(trained)), "kohya")
    sd, meta = formats.read_safetensors(path)
    expected = helpers.unet_te_outputs(trained)
    assert expected.keys() == {"unet", *helpers.text_encoders(trained)}

    ours = tiny_pipeline(arch=arch)
    formats.apply_to_components(formats.read_adapter(path)[0], helpers.components(ours))
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(ours), "our loader")

    theirs = tiny_pipeline(arch=arch)
    helpers.lycoris_load(theirs, sd, merge=False)
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(theirs), "LyCORIS' loader (apply_to)")
    # LyCORIS 4.1.3's LohaModule / LokrModule.merge_to scale ΔW by alpha/r twice (get_weight and get_diff_weight
    # both apply it; their forward, above, once): its merge is checked for LoRA and DoRA/LoCon only
    if kind not in ("loha", "lokr"):
        theirs = tiny_pipeline(arch=arch)
        helpers.lycoris_load(theirs, sd, merge=True)
        helpers.assert_same_outputs(expected, helpers.unet_te_outputs(theirs), "LyCORIS' loader (merge_to)")

    by_hand = tiny_pipeline(arch=arch)
    _hand_merge(by_hand, sd)
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(by_hand), "the hand merge")
    if kind in ("loha", "lokr"):
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind
        assert not any(k.endswith("lora_down.weight") for k in sd)


@pytest.mark.slow
def test_lokr_full_factors_keep_their_scale(tiny_pipeline, tmp_path):
    """A LoKr whose two factors are full: LyCORIS and ComfyUI scale it by 1, so alpha / r goes into lokr_w2."""
    from lora_sd import formats
    pipe = tiny_pipeline()
    lc.add_lora(pipe.unet, LoraConfig(type="lokr", r=8, alpha=2, target_modules=r".*attn2\.to_q$"))
    with torch.no_grad():
        for p in lc.lora_parameters(pipe.unet):
            p.normal_(0, 0.2)
    formats.write_adapter(tmp_path / "a.safetensors", formats.from_model({"unet": pipe.unet}), "kohya")
    sd, _ = formats.read_safetensors(tmp_path / "a.safetensors")
    assert any(k.endswith(".lokr_w2") for k in sd) and not any(k.endswith("_a") for k in sd)
    assert all(float(v) == 8.0 for k, v in sd.items() if k.endswith(".alpha"))
    fresh = tiny_pipeline()
    formats.apply_to_components(formats.read_adapter(tmp_path / "a.safetensors")[0], {"unet": fresh.unet})
    torch.testing.assert_close(helpers.unet_te_outputs(fresh)["unet"], helpers.unet_te_outputs(pipe)["unet"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algo,kwargs", [("loha", {}), ("lokr", {"factor": 4}), ("lokr", {"decompose_both": True,
                                                                                        "factor": 8})])
def test_files_written_by_lycoris_load_exactly(tiny_pipeline, tmp_path, lycoris_on_diffusers, algo, kwargs):
    """A kohya file LyCORIS' own network writes (its module choice, names and factor split; UNet and text
    encoder) gives our pipeline the outputs of LyCORIS' own forward."""
    from lora_sd import formats
    pipe = tiny_pipeline()
    net = lycoris_kohya.create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, algo=algo, **kwargs)
    net.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    expected = helpers.unet_te_outputs(pipe)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    sd, _ = formats.read_safetensors(tmp_path / "lyco.safetensors")
    assert any(k.startswith("lora_te_") for k in sd) and not any(k.endswith("lora_down.weight") for k in sd)
    fresh = tiny_pipeline()
    adapter, _, fmt = formats.read_adapter(tmp_path / "lyco.safetensors", helpers.components(fresh))
    assert fmt == "kohya" and {m.kind for m in adapter.values()} == {algo}
    n_modules = len(net.unet_loras + net.text_encoder_loras)
    assert formats.apply_to_components(adapter, helpers.components(fresh)) == n_modules
    helpers.assert_same_outputs(expected, helpers.unet_te_outputs(fresh), "our loader")


def _named_file(tmp_path, parts: dict, name: str = "named"):
    """A kohya file built here from LyCORIS' naming rules: lora_unet_<diffusers path, . -> _>.<tensor>."""
    from lora_core.io import atomic_save_safetensors
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    path = tmp_path / f"{name}.safetensors"
    atomic_save_safetensors(path, {f"{base}.{n}": t for n, t in parts.items()}, {})
    return path


def test_files_built_from_lycoris_naming_rules(tiny_pipeline, tmp_path):
    """LoHa and LoKr tensors named by LyCORIS' rules, read without a model; ΔW as LyCORIS computes it."""
    from lora_core.adapter_files import inspect
    from lora_sd import formats
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    layer = tiny_pipeline().unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q")
    out_f, in_f = layer.weight.shape
    cases = {"loha": {"hada_w1_a": r(out_f, 2), "hada_w1_b": r(2, in_f), "hada_w2_a": r(out_f, 2),
                      "hada_w2_b": r(2, in_f), "alpha": torch.tensor(1.0)},
             "lokr": {"lokr_w1": r(4, 4), "lokr_w2_a": r(out_f // 4, 2), "lokr_w2_b": r(2, in_f // 4),
                      "alpha": torch.tensor(3.0)}}
    for kind, parts in cases.items():
        path = _named_file(tmp_path, parts, kind)
        adapter, _, _ = formats.read_adapter(path)
        (key, ml), = adapter.items()
        assert key == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q" and ml.kind == kind
        pipe = tiny_pipeline()
        formats.apply_to_components(adapter, {"unet": pipe.unet})
        got = dict(lc.lora_layers(pipe.unet))[key[5:]].delta_weight("default")
        want = _hand_delta({**parts, "alpha": float(parts["alpha"])}, layer.weight) - layer.weight
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        info = inspect(path)
        assert info["adapter_types"] == {kind: 1} and info["ranks"] == [2]
        from lora_gui.adapter_scan import adapter_type   # the GUI's adapter table names the type
        assert adapter_type(info) == kind


@pytest.mark.parametrize("parts,message", [
    ({"hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 4), "hada_w2_a": torch.zeros(4, 2),
      "hada_w2_b": torch.zeros(2, 4), "hada_t1": torch.zeros(2, 2, 3, 3)}, "Tucker LoHa"),
    ({"oft_blocks": torch.zeros(4, 8, 8), "alpha": torch.tensor(0.0)}, "rotates blocks of the output"),
    ({"hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 4)}, "LoHa without hada_w2_a"),
    ({"lokr_w1": torch.zeros(2, 2)}, "neither lokr_w2 nor"),
    ({"diff": torch.zeros(4, 8), "diff_b": torch.zeros(4)}, "bias difference"),
])
def test_unsupported_lycoris_files_refused_in_one_line(tmp_path, parts, message):
    from lora_sd import formats
    with pytest.raises(LoraLoadError, match=message) as e:
        formats.read_adapter(_named_file(tmp_path, parts))
    assert "\n" not in str(e.value)


def test_full_differences_read_exactly(tiny_pipeline, tmp_path):
    """A full weight difference named by LyCORIS' rules (`diff`, the weight's shape) reads as a full module: on the
    model it adds scale · diff (forward and merge); an OFT is saved so (origin oft, kept through kohya -> kohya);
    inspect and the GUI name the type; no diffusers LoRA form."""
    from lora_core.adapter_files import inspect
    from lora_gui.adapter_scan import adapter_type
    from lora_sd import formats
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    layer = tiny_pipeline().unet.get_submodule(key[5:])
    diff = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(2))
    path = _named_file(tmp_path, {"diff": diff}, "full")
    adapter, _, _ = formats.read_adapter(path)
    assert list(adapter) == [key] and adapter[key].kind == "full"
    pipe = tiny_pipeline()
    formats.apply_to_components(adapter, {"unet": pipe.unet}, scale=0.5)
    torch.testing.assert_close(dict(lc.lora_layers(pipe.unet))[key[5:]].delta_weight("default"), 0.5 * diff)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(pipe.unet.get_submodule(key[5:])(x), x @ (layer.weight + 0.5 * diff).T)
    lc.merge_lora(pipe.unet)
    torch.testing.assert_close(pipe.unet.get_submodule(key[5:]).base_layer.weight, layer.weight + 0.5 * diff)
    info = inspect(path)
    assert info["adapter_types"] == {"full": 1} and adapter_type(info) == "full"
    pipe = tiny_pipeline()   # an OFT: saved as its W' - W, marked trained_as oft, which convert keeps
    lc.add_lora(pipe.unet, LoraConfig(type="oft", oft_block_size=4, target_modules=r".*attn2\.to_q$"))
    with torch.no_grad():
        for p in lc.lora_parameters(pipe.unet):
            p.normal_(0, 0.2)
    adapter = formats.from_model({"unet": pipe.unet})
    assert {ml.kind for ml in adapter.values()} == {"full"} and adapter[key].origin == "oft"
    torch.testing.assert_close(adapter[key].tensors["diff"],
                               dict(lc.lora_layers(pipe.unet))[key[5:]].delta_weight("default"))
    formats.write_adapter(tmp_path / "o.safetensors", adapter, "kohya")
    formats.convert(tmp_path / "o.safetensors", tmp_path / "o2.safetensors", "kohya")
    for f in ("o", "o2"):
        meta = formats.read_safetensors(tmp_path / f"{f}.safetensors")[1]
        assert json.loads(meta["ss_network_args"]) == {"algo": "full", "trained_as": "oft"}, f
    with pytest.raises(ValueError, match="a full adapter has no diffusers LoRA form") as e:
        formats.convert(tmp_path / "o.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert "\n" not in str(e.value) and not (tmp_path / "d.safetensors").exists()


def test_diffusers_layout_refused(tiny_pipeline, tmp_path):
    """LoHa / LoKr have no diffusers LoRA form."""
    from lora_sd import formats
    pipe = _train(tiny_pipeline(), "lokr")
    adapter = formats.from_model({"unet": pipe.unet})
    formats.write_adapter(tmp_path / "k.safetensors", adapter, "kohya")
    with pytest.raises(ValueError, match="lokr adapter has no diffusers LoRA form") as e:
        formats.convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers")
    assert "\n" not in str(e.value) and not (tmp_path / "d.safetensors").exists()
    # kohya -> kohya keeps every tensor
    formats.convert(tmp_path / "k.safetensors", tmp_path / "k2.safetensors", "kohya")
    a, _ = formats.read_safetensors(tmp_path / "k.safetensors")
    b, _ = formats.read_safetensors(tmp_path / "k2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_merge_and_load_report_of_loha_and_lokr_files(tiny_sd_model, tiny_pipeline, tmp_path):
    """`lora-sd merge` folds a LoHa (UNet) + LoKr (text encoder) file at scale 0.7 into a plain pipeline with the
    loaded adapter's outputs; the load report matches every module on its base, and finds the modules whose
    shapes differ in SDXL's UNet."""
    from lora_sd import formats
    from lora_sd.cli import main
    from lora_sd.generate import load_adapters
    from lora_sd.models import load_pipeline
    pipe = load_pipeline(tiny_sd_model)
    lc.add_lora(pipe.unet, _unet_configs()["loha"])
    lc.add_lora(pipe.text_encoder, LoraConfig(type="lokr", r=2, alpha=3, target_modules=TE))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in [*lc.lora_parameters(pipe.unet), *lc.lora_parameters(pipe.text_encoder)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "mixed.safetensors"
    adapter = formats.from_model({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    formats.write_adapter(path, adapter, "kohya")
    meta = formats.read_safetensors(path)[1]
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert set(json.loads(meta["lora_sd.module_types"]).values()) == {"lokr"}
    assert main(["merge", "--model", tiny_sd_model, "--lora", f"{path}:0.7", "--out", str(tmp_path / "merged")]) == 0
    merged = load_pipeline(str(tmp_path / "merged"))
    assert not list(lc.lora_layers(merged.unet)) and not list(lc.lora_layers(merged.text_encoder))
    ref = load_pipeline(tiny_sd_model)
    load_adapters(ref, [(str(path), 0.7)])
    helpers.assert_same_outputs(helpers.unet_te_outputs(ref), helpers.unet_te_outputs(merged), "merged")
    rep = formats.load_report(formats.read_adapter(path)[0], helpers.components(load_pipeline(tiny_sd_model)))
    assert rep.fits and len(rep.matched) == len(adapter)
    sdxl = tiny_pipeline(arch="sdxl")
    rep = formats.load_report(formats.read_adapter(path)[0], helpers.components(sdxl))
    assert not rep.fits and any(k.startswith("unet.") for k in rep.mismatched)
