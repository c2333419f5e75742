"""Adapter variants in lora_core against PEFT (the reference): DoRA, LoCon (k×k Conv2d LoRA),
rank_pattern / alpha_pattern; their files through diffusers; the MindSpore twin's DoRA."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_core as lc
from lora_core.config import LoraConfig

from helpers import OneLayerNet, layer_kinds

peft = pytest.importorskip("peft")
IN, OUT = 6, 10


LAYERS = layer_kinds(IN, OUT, (7, 9))


def Net(kind):
    return OneLayerNet(LAYERS, kind, OUT)


def _peft_config(cfg: LoraConfig, fan_in_fan_out=False):
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=["layer"], lora_dropout=0.0,
                           use_dora=cfg.use_dora, use_rslora=cfg.use_rslora, fan_in_fan_out=fan_in_fan_out,
                           rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern)


def twins(kind, cfg):
    """Our model and PEFT's, same base weights, same random (non-trivial) adapter weights."""
    ours = Net(kind)
    ref = copy.deepcopy(ours)
    lc.add_lora(ours, cfg)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT warns that Conv1D wants fan_in_fan_out
        ref = peft.get_peft_model(ref, _peft_config(cfg, fan_in_fan_out=kind == "conv1d"))
    g = torch.Generator().manual_seed(1)
    ours_layer = ours.layer
    ref_layer = ref.base_model.model.layer
    with torch.no_grad():
        for part in ("lora_A", "lora_B"):
            w = getattr(ours_layer, part)["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.4)
            getattr(ref_layer, part)["default"].weight.copy_(w)
        if cfg.use_dora:
            m = ours_layer.lora_magnitude_vector["default"]
            # PEFT started from the same ||W||; perturb both alike
            ref_m = ref_layer.lora_magnitude_vector["default"].weight
            assert ref_m.shape == m.shape
            torch.testing.assert_close(ref_m, m, rtol=1e-6, atol=1e-7)
            m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))
            ref_m.copy_(m)
    return ours, ref


def _grads(model, x, names):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    (out ** 2).sum().backward()
    params = dict(model.named_parameters())
    return out.detach(), x.grad.detach(), {n: params[p].grad.detach().clone() for n, p in names.items()}


def assert_parity(kind, cfg, tol=1e-6):
    ours, ref = twins(kind, cfg)
    x = torch.randn(LAYERS[kind][1], generator=torch.Generator().manual_seed(2))
    parts = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if cfg.use_dora else [])
    our_names = {p: f"layer.{p}.default" + ("" if p == "lora_magnitude_vector" else ".weight") for p in parts}
    ref_names = {p: f"base_model.model.layer.{p}.default.weight" for p in parts}
    y, gx, g = _grads(ours, x, our_names)
    y_ref, gx_ref, g_ref = _grads(ref, x, ref_names)
    assert (y - ours.post(torch.tanh(ours.layer.base_layer(x)))).abs().max() > 1e-2   # the adapter does something
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)
    for p in parts:
        assert g[p].abs().max() > 0, p
        torch.testing.assert_close(g[p], g_ref[p], rtol=tol, atol=tol, msg=lambda m: f"{p}: {m}")
    # merge / unmerge
    w0 = ours.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        lc.merge_lora(ours)
        ref.merge_adapter()
        torch.testing.assert_close(ours.layer.base_layer.weight, ref_layer_weight(ref), rtol=tol, atol=tol)
        torch.testing.assert_close(ours(x), y, rtol=tol, atol=tol)
        lc.unmerge_lora(ours)
        ref.unmerge_adapter()
        torch.testing.assert_close(ours.layer.base_layer.weight, w0, rtol=tol, atol=tol)
        torch.testing.assert_close(ours(x), y, rtol=tol, atol=tol)
    return ours, ref


def ref_layer_weight(ref):
    return ref.base_model.model.layer.base_layer.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv1x1"])
def test_dora_matches_peft(kind):
    ours, _ = assert_parity(kind, LoraConfig(r=3, alpha=5, target_modules=["layer"], use_dora=True))
    m = ours.layer.lora_magnitude_vector["default"]
    assert tuple(m.shape) == ((1, OUT, 1, 1) if kind == "conv1x1" else (OUT,))
    assert "layer.lora_magnitude_vector" in lc.lora_state_dict(ours)
    assert m.requires_grad


def test_dora_on_3x3_conv_matches_peft():
    assert_parity("conv3x3", LoraConfig(r=2, alpha=4, target_modules=["layer"], use_dora=True))


@pytest.mark.parametrize("kind", ["conv3x3", "conv3x3_stride2"])
def test_locon_matches_peft_conv2d_lora(kind):
    ours, ref = assert_parity(kind, LoraConfig(r=3, alpha=6, target_modules=["layer"]))
    A, B = ours.layer.lora_A["default"], ours.layer.lora_B["default"]
    assert tuple(A.weight.shape) == (3, IN, 3, 3) and tuple(B.weight.shape) == (OUT, 3, 1, 1)   # kohya's layout
    base = ours.layer.base_layer
    assert (A.stride, A.padding, A.dilation) == (base.stride, base.padding, base.dilation)


def test_dora_initial_magnitude_is_weight_norm_and_identity():
    net = Net("conv1d")
    x = torch.randn(4, IN)
    y0 = net(x)
    lc.add_lora(net, LoraConfig(r=2, target_modules=["layer"], use_dora=True))
    torch.testing.assert_close(net.layer.lora_magnitude_vector["default"], net.layer.base_layer.weight.norm(dim=0))
    torch.testing.assert_close(net(x), y0)     # B = 0 and m = ||W||: the adapter starts as the identity


def test_dora_refuses_fused_slices_and_locon_conv_rank():
    with pytest.raises(ValueError, match="use_dora.*fused_slices"):
        LoraConfig(target_modules=["c_attn"], use_dora=True, fused_slices={"c_attn": [True, False, True]})
    with pytest.raises(ValueError, match=r"lora.rank_pattern \['q'\] must be a positive integer"):
        LoraConfig(rank_pattern={"q": 0})
    with pytest.raises(ValueError, match="lora.alpha_pattern key '\\(' is not a valid regex"):
        LoraConfig(alpha_pattern={"(": 2.0})
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Linear(5, 5))
    lc.add_lora(net, LoraConfig(r=4, alpha=8, conv_r=2, conv_alpha=1, target_modules=["0", "1", "2"]))
    assert (net[0].r["default"], net[0].alpha["default"]) == (2, 1.0)        # k×k conv: conv_dim / conv_alpha
    assert (net[1].r["default"], net[1].alpha["default"]) == (4, 8.0)        # 1x1 conv: the main rank, as kohya
    assert (net[2].r["default"], net[2].alpha["default"]) == (4, 8.0)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 8)}) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b["q"](x) + b["v"](x))
        return x


def test_rank_and_alpha_patterns_match_peft():
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q", "v"],
                     rank_pattern={r"blocks\.1\.q": 2, "v": 6, "q": 3}, alpha_pattern={r"blocks\.[02]\.v": 3.0})
    ours, ref = Blocks(), None
    ref = copy.deepcopy(ours)
    lc.add_lora(ours, cfg)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                   rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern))
    for name, layer in lc.lora_layers(ours):
        ref_layer = ref.base_model.model.get_submodule(name)
        assert layer.r["default"] == ref_layer.r["default"], name
        assert layer.scaling["default"] == pytest.approx(ref_layer.scaling["default"]), name
        with torch.no_grad():
            for part in ("lora_A", "lora_B"):
                w = getattr(layer, part)["default"].weight
                w.normal_(0, 0.3)
                getattr(ref_layer, part)["default"].weight.copy_(w)
    ranks = {n: l.r["default"] for n, l in lc.lora_layers(ours)}
    assert ranks == {"blocks.0.q": 3, "blocks.0.v": 6, "blocks.1.q": 2, "blocks.1.v": 6, "blocks.2.q": 3, "blocks.2.v": 6}
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the MindSpore twin's DoRA
class TorchPair(nn.Module):
    """A Linear or an HF Conv1D (the layout a MindSpore GPT-2 stores as Dense) followed by a Linear."""

    def __init__(self, conv1d: bool):
        super().__init__()
        self.proj = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)
        self.head = nn.Linear(OUT, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


@pytest.mark.mindspore
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_mindspore_dora_matches_torch(conv1d, tmp_path):
    ms = pytest.importorskip("mindspore")
    import lora_core.mindspore as lcm

    class MSPair(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.proj, self.head = ms.nn.Dense(IN, OUT), ms.nn.Dense(OUT, 3)

        def construct(self, x):
            return self.head(ms.ops.tanh(self.proj(x)))

    torch.manual_seed(0)
    tn, mn = TorchPair(conv1d), MSPair()
    for q in mn.get_parameters():
        t = tn.state_dict()[q.name]
        q.set_data(ms.Tensor((t.T if conv1d and q.name == "proj.weight" else t).numpy()))
    cfg = LoraConfig(r=3, alpha=5, target_modules=["proj"], use_dora=True)
    lcm.add_lora(mn, cfg)
    lc.add_lora(tn, cfg)
    np.testing.assert_allclose(lcm.lora_state_dict(mn)["proj.lora_magnitude_vector"],
                               lc.lora_state_dict(tn)["proj.lora_magnitude_vector"].numpy(), rtol=1e-6)
    rng = np.random.RandomState(3)
    sd = {k: (v * (1 + 0.3 * rng.rand(*v.shape)) if "magnitude" in k else rng.normal(0, 0.4, v.shape)).astype(np.float32)
          for k, v in lcm.lora_state_dict(mn).items()}
    lcm.load_lora_state_dict(mn, sd)
    lc.load_lora_state_dict(tn, {k: torch.from_numpy(v) for k, v in sd.items()})
    x = rng.normal(size=(5, IN)).astype(np.float32)
    y_t = tn(torch.from_numpy(x))
    (y_t ** 2).sum().backward()
    params = [p for p in mn.trainable_params()]
    loss_fn = lambda inp: (mn(inp) ** 2).sum()   # noqa: E731
    y_m = mn(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(y_m, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    _, grads = ms.value_and_grad(loss_fn, None, params)(ms.Tensor(x))
    t_params = dict(tn.named_parameters())
    torch_name = {"proj.lora_A.weight": "proj.lora_A.default.weight", "proj.lora_B.weight": "proj.lora_B.default.weight",
                  "proj.lora_magnitude_vector": "proj.lora_magnitude_vector.default"}
    assert sorted(p.name for p in params) == sorted(torch_name)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(g.asnumpy(), t_params[torch_name[p.name]].grad.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=p.name)
    # merge / unmerge, and the file between the backends
    w0 = mn.proj.base_layer.weight.asnumpy().copy()
    lcm.merge_lora(mn)
    lc.merge_lora(tn)
    merged_t = tn.proj.base_layer.weight.detach().numpy()
    np.testing.assert_allclose(mn.proj.base_layer.weight.asnumpy(), merged_t.T if conv1d else merged_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mn(ms.Tensor(x)).asnumpy(), y_m, rtol=1e-5, atol=1e-5)
    lcm.unmerge_lora(mn)
    lc.unmerge_lora(tn)
    np.testing.assert_allclose(mn.proj.base_layer.weight.asnumpy(), w0, rtol=1e-5, atol=1e-6)
    lcm.save_lora(tmp_path / "ms_dora.safetensors", mn)
    t2 = TorchPair(conv1d)
    t2.load_state_dict({k.replace("base_layer.", ""): v for k, v in tn.state_dict().items() if "lora_" not in k})
    assert lc.load_lora(tmp_path / "ms_dora.safetensors", t2).use_dora
    with torch.no_grad():
        np.testing.assert_allclose(t2(torch.from_numpy(x)).numpy(), y_m, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ files through diffusers
@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline):
    return tiny_pipeline()


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx).sample


def _trained_unet(pipe, cfg, seed=5):
    """A copy of the pipeline's UNet with a random (non-trivial) adapter of `cfg`."""
    unet = copy.deepcopy(pipe.unet)
    lc.add_lora(unet, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lc.lora_layers(unet):
            for part in ("lora_A", "lora_B"):
                w = getattr(layer, part)["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
            for m in layer.lora_magnitude_vector.values():
                m.mul_(1 + 0.3 * torch.rand(m.shape, generator=g))
    return unet


def _locon_dora_config(dora):
    from lora_sd.config import TARGET_PRESETS
    return LoraConfig(r=4, alpha=2, conv_r=2, conv_alpha=3, use_dora=dora, target_modules=TARGET_PRESETS["cross_attn+conv"])


def _load_into_diffusers(pipe, path, caplog):
    pipe = copy.deepcopy(pipe)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(path), adapter_name="ours")
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "unexpected keys" not in text and "missing keys" not in text, text
    return pipe


def _peft_modules(unet):
    return sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A") and "ours" in m.lora_A)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_locon_file_loads_in_diffusers_with_same_output(tiny_pipe, tmp_path, caplog, fmt):
    from lora_sd import formats
    unet = _trained_unet(tiny_pipe, _locon_dora_config(False))
    layers = dict(lc.lora_layers(unet))
    assert layers["down_blocks.0.resnets.0.conv1"].r["default"] == 2        # conv_r on the 3x3 convs
    assert layers["down_blocks.0.downsamplers.0.conv"].base_layer.stride == (2, 2)
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"].r["default"] == 4
    adapter = formats.from_model({"unet": unet})
    formats.write_adapter(tmp_path / "locon.safetensors", adapter, fmt)
    sd, _ = formats.read_safetensors(tmp_path / "locon.safetensors")
    if fmt == "kohya":   # kohya's conv_dim layout, each module's own alpha
        assert tuple(sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape) == (2, 32, 3, 3)
        assert tuple(sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape) == (32, 2, 1, 1)
        assert float(sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 3.0
        assert float(sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.alpha"]) == 2.0
    pipe = _load_into_diffusers(tiny_pipe, tmp_path / "locon.safetensors", caplog)
    assert _peft_modules(pipe.unet) == sorted(layers)
    expected = _unet_out(unet)
    assert (expected - _unet_out(tiny_pipe.unet)).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    # and back into our core
    back, _, got_fmt = formats.read_adapter(tmp_path / "locon.safetensors")
    assert got_fmt == fmt
    ours = copy.deepcopy(tiny_pipe.unet)
    formats.apply_to_components(back, {"unet": ours})
    torch.testing.assert_close(_unet_out(ours), expected, rtol=1e-5, atol=1e-6)


def test_dora_diffusers_file_loads_in_diffusers_with_same_output(tiny_pipe, tmp_path, caplog):
    from lora_core.adapter_files import inspect
    from lora_sd import formats
    unet = _trained_unet(tiny_pipe, _locon_dora_config(True))
    formats.write_adapter(tmp_path / "dora.safetensors", formats.from_model({"unet": unet}), "diffusers")
    sd, _ = formats.read_safetensors(tmp_path / "dora.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora_magnitude_vector"
    assert tuple(sd[key].shape) == (32,)
    assert tuple(sd["unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"].shape) == (1, 32, 1, 1)
    pipe = _load_into_diffusers(tiny_pipe, tmp_path / "dora.safetensors", caplog)
    peft_layer = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert "ours" in peft_layer.lora_magnitude_vector                  # diffusers built a DoRA adapter
    expected = _unet_out(unet)
    torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    info = inspect(tmp_path / "dora.safetensors")
    assert info["dora"] and info["conv_modules"] == sum(1 for n, _ in lc.lora_layers(unet) if "conv" in n)


def test_dora_kohya_file(tiny_pipe, tmp_path, caplog):
    """kohya/LyCORIS dora_scale in the output-axis layout: our reader gives the model back exactly;
    diffusers' SD loader loads every module (it drops dora_scale by design, with a warning), and its
    kohya converter maps each dora_scale to PEFT's lora_magnitude_vector."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from lora_sd import formats
    unet = _trained_unet(tiny_pipe, _locon_dora_config(True))
    adapter = formats.from_model({"unet": unet})
    formats.write_adapter(tmp_path / "dora_kohya.safetensors", adapter, "kohya")
    sd, _ = formats.read_safetensors(tmp_path / "dora_kohya.safetensors")
    assert tuple(sd["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape) == (32, 1, 1, 1)
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    assert tuple(sd[f"{base}.dora_scale"].shape) == (32, 1)
    torch.testing.assert_close(sd[f"{base}.dora_scale"].flatten(),
                               unet.get_submodule(base[10:].replace("_", ".").replace("down.blocks", "down_blocks")
                                                  .replace("transformer.blocks", "transformer_blocks")
                                                  .replace("to.q", "to_q")).lora_magnitude_vector["default"])
    back, _, _ = formats.read_adapter(tmp_path / "dora_kohya.safetensors")
    ours = copy.deepcopy(tiny_pipe.unet)
    formats.apply_to_components(back, {"unet": ours})
    torch.testing.assert_close(_unet_out(ours), _unet_out(unet), rtol=1e-5, atol=1e-6)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    mags = [k for k in converted if k.endswith("lora_magnitude_vector.weight") or "lora_magnitude_vector" in k]
    assert len(mags) == len(adapter)
    pipe = copy.deepcopy(tiny_pipe)
    pipe.load_lora_weights(str(tmp_path / "dora_kohya.safetensors"), adapter_name="ours")
    assert _peft_modules(pipe.unet) == sorted(n for n, _ in lc.lora_layers(unet))
    # `lora-sd convert` to diffusers keeps DoRA: diffusers then gives our model's output
    from lora_core.adapter_files import inspect
    assert inspect(tmp_path / "dora_kohya.safetensors")["dora"]
    formats.convert(tmp_path / "dora_kohya.safetensors", tmp_path / "converted.safetensors", "diffusers")
    pipe = _load_into_diffusers(tiny_pipe, tmp_path / "converted.safetensors", caplog)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(unet), rtol=1e-4, atol=1e-5)


def test_dora_scale_input_axis_is_refused(tmp_path):
    from lora_sd import formats
    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(6, 2),
          "lora_unet_mid_block_attentions_0_proj_in.dora_scale": torch.ones(1, 8)}
    with pytest.raises(lc.LoraLoadError, match="dora_scale.*output-axis"):
        formats.from_kohya(sd)


class Mixed(nn.Module):
    """A Linear, an HF Conv1D, a 1x1 and a 3x3 conv: every layer kind the variants cover."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.c1d = nn.Linear(8, 8), Conv1D(8, 8)
        self.pw, self.conv = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):                      # x: (N, 8, H, W)
        h = self.conv(torch.tanh(self.pw(x)))
        v = h.mean(dim=(2, 3))
        return self.c1d(torch.tanh(self.fc(v)))


def _randomize(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)) if "magnitude" in n
                        else torch.randn(p.shape, generator=g) * 0.3)


def test_our_file_and_peft_export_keep_dora_locon_and_patterns(tmp_path):
    from lora_llm.adapter_io import export_peft
    cfg = LoraConfig(r=4, alpha=8, conv_r=2, conv_alpha=5, use_dora=True, target_modules=["fc", "c1d", "pw", "conv"],
                     rank_pattern={"pw": 3}, alpha_pattern={"c1d": 2.0})
    model = Mixed()
    lc.add_lora(model, cfg)
    _randomize(model)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        y = model(x)
    lc.save_lora(tmp_path / "ours.safetensors", model)
    keys = set(lc.read_safetensors(tmp_path / "ours.safetensors")[0])
    assert {f"{m}.lora_magnitude_vector" for m in ("fc", "c1d", "pw", "conv")} <= keys
    again = Mixed()
    assert lc.load_lora(tmp_path / "ours.safetensors", again) == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(x), y, rtol=1e-6, atol=1e-6)
    ranks = {n: (l.r["default"], l.alpha["default"]) for n, l in lc.lora_layers(again)}
    assert ranks == {"fc": (4, 8.0), "c1d": (4, 2.0), "pw": (3, 8.0), "conv": (2, 5.0)}
    # PEFT's own loader reads the PEFT export (DoRA, rank/alpha patterns, the k×k conv) to the same output
    export_peft(tmp_path / "peft", model, task_type=None)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(Mixed(), str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(ref(x), y, rtol=1e-5, atol=1e-6)


def test_inspect_names_the_variants(tmp_path):
    from lora_core.adapter_files import inspect
    model = Mixed()
    lc.add_lora(model, LoraConfig(r=4, alpha=8, conv_r=2, use_dora=True, target_modules=["fc", "conv"],
                                  rank_pattern={"fc": 6}, alpha_pattern={"fc": 3.0}))
    lc.save_lora(tmp_path / "a.safetensors", model)
    info = inspect(tmp_path / "a.safetensors")
    assert info["dora"] is True and info["ranks"] == [2, 4, 6] and 3.0 in info["alphas"]


def test_plain_and_dora_adapters_together_match_peft():
    """Two active adapters, plain then DoRA: forward, merge of both, unmerge (PEFT's semantics:
    DoRA rescales the output so far, and merges against the unmerged weight's norm)."""
    ours = Net("linear")
    ref = copy.deepcopy(ours)
    lc.add_lora(ours, LoraConfig(r=2, alpha=3, target_modules=["layer"]), adapter="a")
    lc.add_lora(ours, LoraConfig(r=3, alpha=5, target_modules=["layer"], use_dora=True), adapter="b")
    lc.set_adapter(ours, ["a", "b"])
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["layer"]), adapter_name="a")
    ref.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["layer"], use_dora=True))
    ref.base_model.set_adapter(["a", "b"])
    _randomize(ours)
    ref_layer = ref.base_model.model.layer
    with torch.no_grad():
        for a in ("a", "b"):
            for part in ("lora_A", "lora_B"):
                getattr(ref_layer, part)[a].weight.copy_(getattr(ours.layer, part)[a].weight)
        ref_layer.lora_magnitude_vector["b"].weight.copy_(ours.layer.lora_magnitude_vector["b"])
        x = torch.randn(4, IN)
        y = ours(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
        w0 = ours.layer.base_layer.weight.clone()
        lc.merge_lora(ours)
        ref.base_model.merge_adapter(["a", "b"])
        torch.testing.assert_close(ours.layer.base_layer.weight, ref_layer.base_layer.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-6)
        lc.unmerge_lora(ours)
        torch.testing.assert_close(ours.layer.base_layer.weight, w0, rtol=1e-5, atol=1e-6)


def test_sd_training_with_dora_and_locon_exports_loadable_files(tiny_pipe, tmp_path, caplog, tiny_sd_model):
    """`lora-sd train` with the cross_attn+conv preset, conv_r and DoRA: the magnitudes train, and the
    exported diffusers file gives diffusers' UNet the trained model's output."""
    from lora_sd import formats
    from lora_sd.testing import make_images, train_config
    from lora_sd.train import DIFFUSERS_FILE, run_training
    model = tiny_sd_model
    make_images(tmp_path / "data", 2)
    cfg = train_config(tmp_path / "run", str(model), tmp_path / "data", tmp_path / "cache",
                       lora={"target_modules": "cross_attn+conv", "conv_r": 2, "conv_alpha": 1.0, "use_dora": True},
                       train={"max_steps": 2, "checkpoint_every": 0})
    run_training(cfg)
    sd, _ = formats.read_safetensors(tmp_path / "run" / "test_lora.safetensors")
    assert tuple(sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape) == (2, 32, 3, 3)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.dora_scale" in sd
    adapter, _, _ = formats.read_adapter(tmp_path / "run" / DIFFUSERS_FILE)
    fresh = copy.deepcopy(tiny_pipe.unet)
    start = {k: fresh.get_submodule(k[5:]).weight.detach().flatten(1).norm(dim=1) for k in adapter}   # m = ||W||
    moved = [k for k in adapter if (adapter[k].magnitude - start[k]).abs().max() > 1e-5]
    assert len(moved) > len(adapter) // 2, moved   # the magnitudes trained
    formats.apply_to_components(adapter, {"unet": fresh})
    pipe = _load_into_diffusers(tiny_pipe, tmp_path / "run" / DIFFUSERS_FILE, caplog)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(fresh), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_dora_with_dropout_in_training_matches_peft(kind):
    """In training with dropout, DoRA's base term uses the dropped input (PEFT's rule)."""
    cfg = LoraConfig(r=3, alpha=5, dropout=0.4, target_modules=["layer"], use_dora=True)
    ours, ref = twins(kind, LoraConfig(**{**cfg.to_dict(), "dropout": 0.0}))
    ours.layer.lora_dropout["default"] = nn.Dropout(0.4)
    ref.base_model.model.layer.lora_dropout["default"] = nn.Dropout(0.4)
    ours.train()
    ref.train()
    x = torch.randn(LAYERS[kind][1], generator=torch.Generator().manual_seed(2))
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)
    torch.testing.assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
    ours.eval()
    assert (ours(x) - y).abs().max() > 1e-3      # the dropout did something


def test_dora_text_encoder_diffusers_file_loads_its_magnitudes(tiny_pipe, tmp_path):
    """DoRA on the UNet and the text encoder in the diffusers layout: StableDiffusionPipeline.load_lora_weights
    gives both our outputs (the text encoder's magnitudes are `.lora_magnitude_vector.weight`, what transformers'
    load_adapter needs; PEFT's bare name leaves them at their initial values), and our reader reads it back."""
    from lora_sd import formats
    pipe = copy.deepcopy(tiny_pipe)
    lc.add_lora(pipe.unet, _locon_dora_config(True))
    lc.add_lora(pipe.text_encoder, LoraConfig(r=2, alpha=2, use_dora=True, target_modules=r".*(q_proj|v_proj)$"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=g)) if "magnitude" in name
                            else torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "dora_te.safetensors"
    formats.write_adapter(path, formats.from_model({"unet": pipe.unet, "text_encoder": pipe.text_encoder}), "diffusers")
    ids = torch.randint(0, 1000, (1, 7), generator=g)
    with torch.no_grad():
        te_out = pipe.text_encoder(ids).last_hidden_state
    theirs = copy.deepcopy(tiny_pipe)
    theirs.load_lora_weights(str(path), adapter_name="ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs.text_encoder(ids).last_hidden_state, te_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_unet_out(theirs.unet), _unet_out(pipe.unet), rtol=1e-4, atol=1e-5)
    back = copy.deepcopy(tiny_pipe)
    formats.apply_to_components(formats.read_adapter(path)[0], {"unet": back.unet, "text_encoder": back.text_encoder})
    with torch.no_grad():
        torch.testing.assert_close(back.text_encoder(ids).last_hidden_state, te_out, rtol=1e-5, atol=1e-6)
