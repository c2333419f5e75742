"""Adapter variants in lora_core against PEFT (the reference): DoRA, LoCon (k×k Conv2d LoRA),
rank_pattern / alpha_pattern; their files through diffusers; the MindSpore twin's DoRA."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import lora_core as lc
from lora_core.config import LoraConfig

peft = pytest.importorskip("peft")
IN, OUT = 6, 10


def _conv1d(out, inp):
    from transformers.pytorch_utils import Conv1D
    return Conv1D(out, inp)


LAYERS = {
    "linear": (lambda: nn.Linear(IN, OUT), (4, IN)),
    "conv1d": (lambda: _conv1d(OUT, IN), (4, IN)),
    "conv1x1": (lambda: nn.Conv2d(IN, OUT, 1), (2, IN, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(IN, OUT, 3, padding=1), (2, IN, 7, 7)),
    "conv3x3_stride2": (lambda: nn.Conv2d(IN, OUT, 3, stride=2, padding=1), (2, IN, 9, 9)),
}


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.layer = LAYERS[kind][0]()
        self.post = nn.Linear(OUT, 3) if kind in ("linear", "conv1d") else nn.Conv2d(OUT, 3, 1)

    def forward(self, x):
        return self.post(torch.tanh(self.layer(x)))


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
        self.proj = _conv1d(OUT, IN) if conv1d else nn.Linear(IN, OUT)
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
