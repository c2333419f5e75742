"""The LyCORIS adapter types in lora_core (lora.type = loha / lokr / oft) against PEFT 0.21.2's LoHaConfig,
LoKrConfig and OFTConfig modules on the same weights: forward, gradients, merge / unmerge; several named adapters
with scales; rank_pattern; our file round trip; the refusals."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_core as lc
from lora_core.config import LoraConfig
from lora_core.errors import NonFiniteError

from helpers import OneLayerNet, layer_kinds

peft = pytest.importorskip("peft")
IN, OUT, TOL = 8, 12, 1e-6


LAYERS = layer_kinds(IN, OUT, (6, 7))


def Net(kind):
    return OneLayerNet(LAYERS, kind, OUT)


def _reference_base(net):
    """A copy PEFT can adapt: an HF Conv1D (which PEFT's LoHa / LoKr / OFT do not take) as the nn.Linear it is."""
    ref = copy.deepcopy(net)
    if type(ref.layer).__name__ == "Conv1D":
        lin = nn.Linear(IN, OUT)
        with torch.no_grad():
            lin.weight.copy_(ref.layer.weight.T)
            lin.bias.copy_(ref.layer.bias)
        ref.layer = lin
    return ref


def peft_config(cfg: LoraConfig):
    common = dict(target_modules=cfg.target_modules)
    if cfg.type == "oft":
        return peft.OFTConfig(r=0, oft_block_size=cfg.oft_block_size, coft=cfg.coft, eps=cfg.coft_eps,
                              block_share=cfg.block_share, use_cayley_neumann=cfg.use_cayley_neumann,
                              num_cayley_neumann_terms=cfg.num_cayley_neumann_terms, **common)
    common.update(r=cfg.r, alpha=cfg.alpha, rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern)
    if cfg.type == "lokr":
        return peft.LoKrConfig(decompose_both=cfg.decompose_both, decompose_factor=cfg.decompose_factor, **common)
    return peft.LoHaConfig(**common)


def peft_param(ref_layer, key, adapter="default"):
    """PEFT's parameter for our file key (`hada_w1_a`, `lokr_w2`, `oft_R.weight`) of one adapter."""
    head, *rest = key.split(".")
    obj = getattr(ref_layer, head)[adapter]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def randomize(ours, ref, adapter="default", gen=None, size=None):
    """Give our adapter non-trivial weights (small for OFT's generators) and copy them into PEFT's."""
    gen = gen or torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lc.lora_layers(ours):
            if adapter not in layer.lycoris:
                continue
            v = layer.lycoris[adapter]
            for key, p in v.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (size or (0.15 if v.rotates else 0.4)))
                theirs = peft_param(ref.base_model.model.get_submodule(name), v.key_prefix + key, adapter)
                assert theirs.shape == p.shape, (name, key)
                theirs.copy_(p)


def twins(kind, cfg):
    ours = Net(kind)
    ref = _reference_base(ours)
    lc.add_lora(ours, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(ref, peft_config(cfg))
    randomize(ours, ref)
    return ours, ref


def close(a, b, rtol=TOL, atol=TOL):
    """Equal to 1e-6, relative to the larger of 1 and b's largest entry (fp32 sums of many terms, e.g. the
    gradient of a shared OFT block, carry about that much rounding on either side)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


def _run(model, x, params):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    (out ** 2).sum().backward()
    return out.detach(), x.grad.detach(), [p.grad.detach().clone() for p in params]


def our_weight(ours):
    """The base weight in nn.Linear / Conv2d layout (an HF Conv1D's transposed), as PEFT's reference holds it."""
    w = ours.layer.base_layer.weight
    return w.T if type(ours.layer.base_layer).__name__ == "Conv1D" else w


def _params(ours, ref, adapter="default"):
    v = ours.layer.lycoris[adapter]
    keys = [k for k, _ in v.named_parameters()]
    return ([p for _, p in v.named_parameters()],
            [peft_param(ref.base_model.model.layer, v.key_prefix + k, adapter) for k in keys])


def assert_parity(kind, cfg, wrap=None, shape=None):
    """Forward, input and adapter gradients, merge and unmerge equal to PEFT's (fp32, 1e-6), on an input of
    `shape` (default: the kind's)."""
    ours, ref = twins(kind, cfg)
    x = torch.randn(shape or LAYERS[kind][1], generator=torch.Generator().manual_seed(2))
    mine, theirs = _params(ours, ref)
    y, gx, g = _run(ours, x, mine)
    y_ref, gx_ref, g_ref = _run(wrap(ref) if wrap else ref, x, theirs)
    assert (y - ours.post(torch.tanh(ours.layer.base_layer(x)))).abs().max() > 1e-3   # the adapter does something
    close(y, y_ref)
    close(gx, gx_ref)
    for a, b in zip(g, g_ref):
        assert a.abs().max() > 0
        close(a, b)
    w0 = ours.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        lc.merge_lora(ours)
        ref.merge_adapter()
        close(our_weight(ours), ref.base_model.model.layer.base_layer.weight)
        close(ours(x), y)
        lc.unmerge_lora(ours)
        close(ours.layer.base_layer.weight, w0)
        close(ours(x), y)
    return ours, ref


KINDS = list(LAYERS)


@pytest.mark.parametrize("kind", KINDS)
def test_loha_matches_peft(kind):
    ours, _ = assert_parity(kind, LoraConfig(type="loha", r=3, alpha=5, target_modules=["layer"]))
    v = ours.layer.lycoris["default"]
    fan_in = IN * (9 if kind.startswith("conv3x3") else 1)
    assert tuple(v.hada_w1_a.shape) == (OUT, 3) and tuple(v.hada_w2_b.shape) == (3, fan_in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_loha_at_low_rank_matches_peft_without_the_dense_delta(kind, monkeypatch):
    """r=2 on a 8 -> 12 Linear: r²·(in + out) < in·out, so the output comes from the rank-r² factors, never from
    a dense ΔW; forward, gradients and merge still equal PEFT's."""
    from lora_core.variants import LoHa
    dense, real = [], LoHa.delta_rows
    monkeypatch.setattr(LoHa, "delta_rows", lambda self, *a: dense.append(1) or real(self, *a))
    ours, ref = twins(kind, LoraConfig(type="loha", r=2, alpha=5, target_modules=["layer"]))
    x = torch.randn(LAYERS[kind][1])
    mine, theirs = _params(ours, ref)
    (y, gx, g), (y_ref, gx_ref, g_ref) = _run(ours, x, mine), _run(ref, x, theirs)
    assert not dense   # the forward and backward passes built no ΔW
    for a, b in zip([y, gx, *g], [y_ref, gx_ref, *g_ref]):
        close(a, b)
    with torch.no_grad():
        lc.merge_lora(ours)
        close(ours(x), y)


LOKR = {"w1 full, w2 = w2_a w2_b": dict(r=1),
        "decompose_both": dict(r=1, decompose_both=True),
        "w2 full (large r)": dict(r=4),
        "decompose_factor": dict(r=2, decompose_factor=2)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", list(LOKR))
def test_lokr_matches_peft(kind, opts):
    ours, _ = assert_parity(kind, LoraConfig(type="lokr", alpha=3, target_modules=["layer"], **LOKR[opts]))
    keys = {k for k, _ in ours.layer.lycoris["default"].named_parameters()}
    assert ("lokr_w1_a" in keys) == (opts == "decompose_both")
    assert ("lokr_w2" in keys) == (opts == "w2 full (large r)")


@pytest.mark.parametrize("out, fan_in, factor", [(12, 8, -1), (8, 12, -1), (16, 6, 2), (6, 16, 2)])
def test_lokr_on_a_linear_skips_the_dense_delta_and_equals_it(out, fan_in, factor):
    """A Linear's LoKr output is computed from the two factors (w2 first, or w1 first when cheaper: (12, 8) and
    (8, 12) take one way each) and equals the layer op with the dense ΔW = w1 ⊗ w2, gradients included."""
    from lora_core.variants import LoKr
    torch.manual_seed(3)
    v = LoKr(out, fan_in, (), r=1, alpha=3, factor=factor)
    with torch.no_grad():
        for p in v.parameters():
            p.normal_()
    x = torch.randn(5, 3, fan_in)
    y = v.output(x, torch.nn.functional.linear, 0.7, -1)
    grads = torch.autograd.grad(y.square().sum(), list(v.parameters()))
    y_ref = torch.nn.functional.linear(x, v.delta_rows(0.7, torch.float32))
    ref_grads = torch.autograd.grad(y_ref.square().sum(), list(v.parameters()))
    close(y, y_ref)
    for a, b in zip(grads, ref_grads):
        close(a, b)


OFT = {"neumann": dict(), "exact cayley": dict(use_cayley_neumann=False), "coft": dict(coft=True, coft_eps=0.3),
       "block_share": {"block_share": True}, "3 terms": dict(num_cayley_neumann_terms=3)}


class RotatedReference(nn.Module):
    """PEFT's OFT on a k×k Conv2d with its rotation taken as the weight's (PEFT's merge, differentiable): PEFT
    0.21.2's unmerged k×k forward sums the overlapping unfolded patches back (F.fold), so it is not the base
    layer even at R = I; its merge is the OFT of the paper, and what our layer computes."""

    def __init__(self, ref):
        super().__init__()
        self.ref = ref

    def forward(self, x):
        net, layer = self.ref.base_model.model, self.ref.base_model.model.layer
        W = layer.base_layer.weight
        rot = layer.oft_R["default"]
        if rot.coft:   # as PEFT's forward (its get_weight, for merging, keeps no gradient under coft)
            with torch.no_grad():
                rot.weight.copy_(rot._project_batch(rot.weight, eps=rot.eps))
        blocks = rot._cayley_batch(rot.weight, rot.block_size, rot.use_cayley_neumann, rot.num_cayley_neumann_terms)
        R = rot._block_diagonal(blocks, rot.in_features // rot.block_size)
        w = (R @ W.flatten(1).T).T.reshape(W.shape)
        return net.post(torch.tanh(layer.base_layer._conv_forward(x, w, layer.base_layer.bias)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", list(OFT))
def test_oft_matches_peft(kind, opts):
    kxk = kind.startswith("conv3x3")
    cfg = LoraConfig(type="oft", oft_block_size=4, target_modules=["layer"], **OFT[opts])
    ours, _ = assert_parity(kind, cfg, wrap=RotatedReference if kxk else None)
    v = ours.layer.lycoris["default"]
    blocks = IN * (9 if kxk else 1) // 4
    assert tuple(v.weight.shape) == (1 if opts == "block_share" else blocks, 6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rows", [4, 30])
def test_oft_rotates_the_input_or_the_weight_alike(kind, rows, monkeypatch):
    """A Linear rotates its input (x R Wᵀ, PEFT's way) whatever its number of input rows (4 or 30, OUT = 12),
    and equals PEFT; the weight's rotation (x (W Rᵀ)ᵀ) is the Conv2d's and the fused slices' (tests above and
    test_llm_types)."""
    from lora_core.variants import OFT as OFTVariant
    calls = []
    real = OFTVariant.rotate_input
    monkeypatch.setattr(OFTVariant, "rotate_input", lambda self, x, s: calls.append(x.shape) or real(self, x, s))
    assert_parity(kind, LoraConfig(type="oft", oft_block_size=4, target_modules=["layer"]), shape=(rows, IN))
    assert calls and all(shape[0] == rows for shape in calls)


# ------------------------------------------------------------------ several adapters, scales, patterns
def _two_adapters(kind, cfg_a, cfg_b):
    """Our net and PEFT's with adapters "one" (cfg_a) and "two" (cfg_b), both active, with the same random weights."""
    ours = Net(kind)
    ref = _reference_base(ours)
    lc.add_lora(ours, cfg_a, "one")
    lc.add_lora(ours, cfg_b, "two")
    ref = peft.get_peft_model(ref, peft_config(cfg_a), adapter_name="one")
    ref.add_adapter("two", peft_config(cfg_b))
    ref.base_model.set_adapter(["one", "two"])
    randomize(ours, ref, "one")
    randomize(ours, ref, "two", gen=torch.Generator().manual_seed(5))
    return ours, ref


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("type_", ["loha", "lokr"])
def test_two_named_adapters_with_scales_match_peft(kind, type_):
    cfg_a = LoraConfig(type=type_, r=2, alpha=3, target_modules=["layer"])
    cfg_b = LoraConfig(type=type_, r=3, alpha=2, target_modules=["layer"])
    ours, ref = _two_adapters(kind, cfg_a, cfg_b)
    lc.set_scale(ours, "one", 0.5)
    ref.base_model.model.layer.set_scale("one", 0.5)
    x = torch.randn(LAYERS[kind][1])
    with torch.no_grad():
        y = ours(x)
        close(y, ref(x))
        lc.set_adapter(ours, "two")
        ref.base_model.set_adapter("two")
        close(ours(x), ref(x))
        lc.set_adapter(ours, ["one", "two"])
        ref.base_model.set_adapter(["one", "two"])
        lc.merge_lora(ours)
        ref.merge_adapter()
        close(our_weight(ours), ref.base_model.model.layer.base_layer.weight)
        close(ours(x), y)


def test_two_oft_adapters_with_scales_match_peft_merge():
    """PEFT's OFT has no scale: ours multiplies the generator Q, so scale s equals PEFT's adapter with s·Q. Two
    rotations compose in the order of PEFT's merge (W R₁ᵀ R₂ᵀ); PEFT's unmerged forward applies them the other
    way round (x R₁ R₂ Wᵀ), so ours is checked against PEFT's merged weight."""
    cfg = LoraConfig(type="oft", oft_block_size=4, target_modules=["layer"])
    ours, ref = _two_adapters("linear", cfg, cfg)
    lc.set_scale(ours, "one", 0.5)
    x = torch.randn(4, IN)
    w0 = ours.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        peft_param(ref.base_model.model.layer, "oft_R.weight", "one").mul_(0.5)
        y = ours(x)
        ref.merge_adapter()
        close(y, ref(x))
        lc.merge_lora(ours)
        close(ours.layer.base_layer.weight, ref.base_model.model.layer.base_layer.weight)
        close(ours(x), y)
        lc.unmerge_lora(ours)
        close(ours.layer.base_layer.weight, w0)
        lc.set_scale(ours, "one", 0.0)
        lc.set_scale(ours, "two", 0.0)
        close(ours(x), ours.post(torch.tanh(ours.layer.base_layer(x))))   # scale 0: off


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(16, 16), "v": nn.Linear(16, 16)}) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b["q"](x) + b["v"](x))
        return x


@pytest.mark.parametrize("type_", ["loha", "lokr"])
def test_rank_and_alpha_patterns_match_peft(type_):
    cfg = LoraConfig(type=type_, r=4, alpha=8, target_modules=["q", "v"],
                     rank_pattern={r"blocks\.1\.q": 1, "v": 6}, alpha_pattern={r"blocks\.[02]\.v": 3.0})
    ours = Blocks()
    ref = peft.get_peft_model(copy.deepcopy(ours), peft_config(cfg))
    lc.add_lora(ours, cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lc.lora_layers(ours):
            v, ref_layer = layer.lycoris["default"], ref.base_model.model.get_submodule(name)
            assert (v.r, v.scaling) == (ref_layer.r["default"], pytest.approx(ref_layer.scaling["default"])), name
            for key, p in v.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                peft_param(ref_layer, key).copy_(p)
    assert {n: l.lycoris["default"].r for n, l in lc.lora_layers(ours)} == {
        "blocks.0.q": 4, "blocks.0.v": 6, "blocks.1.q": 1, "blocks.1.v": 6, "blocks.2.q": 4, "blocks.2.v": 6}
    x = torch.randn(5, 16)
    with torch.no_grad():
        close(ours(x), ref(x))


# ------------------------------------------------------------------ files, start, refusals
TYPES = {"loha": dict(type="loha", r=2), "lokr": dict(type="lokr", r=1, decompose_both=True),
         "oft": dict(type="oft", oft_block_size=4, coft=True)}


@pytest.mark.parametrize("type_", list(TYPES))
def test_save_load_round_trip(tmp_path, type_):
    cfg = LoraConfig(target_modules=["layer"], rank_pattern={} if type_ == "oft" else {"layer": 3}, **TYPES[type_])
    ours = Net("conv3x3")
    fresh = copy.deepcopy(ours)
    lc.add_lora(ours, cfg)
    with torch.no_grad():
        for p in lc.lora_parameters(ours):
            p.normal_(0, 0.1)
    lc.save_lora(tmp_path / "a.safetensors", ours)
    keys = set(lc.lora_state_dict(ours))
    assert keys == {f"layer.{ours.layer.lycoris['default'].key_prefix}{k}"
                    for k, _ in ours.layer.lycoris["default"].named_parameters()}
    assert lc.load_lora(tmp_path / "a.safetensors", fresh) == cfg
    x = torch.randn(2, IN, 6, 6)
    with torch.no_grad():
        close(fresh(x), ours(x), rtol=0, atol=0)
    if type_ != "oft":
        assert fresh.layer.lycoris["default"].r == 3


@pytest.mark.parametrize("type_", list(TYPES))
@pytest.mark.parametrize("kind", ["conv1d", "conv3x3"])
def test_starts_as_identity_and_trains_its_own_weights(type_, kind):
    net = Net(kind)
    x = torch.randn(LAYERS[kind][1])
    y0 = net(x).detach()
    lc.add_lora(net, LoraConfig(target_modules=["layer"], **TYPES[type_]))
    close(net(x), y0, rtol=1e-6, atol=1e-6)
    trainable = {id(p) for p in lc.lora_parameters(net)}
    assert trainable == {id(p) for p in net.layer.lycoris.parameters()}


def test_type_specific_fields_are_refused_elsewhere():
    cases = [(dict(type="loha", use_dora=True), "lora.use_dora applies to lora.type = 'lora' only"),
             (dict(type="lokr", dropout=0.1), "lora.dropout applies to lora.type = 'lora' only"),
             (dict(type="loha", decompose_both=True), "lora.decompose_both applies to lora.type = 'lokr' only"),
             (dict(oft_block_size=8), "lora.oft_block_size applies to lora.type = 'oft' only"),
             (dict(type="oft", rank_pattern={"q": 2}), "lora.rank_pattern applies to lora.type = 'lora' or 'loha' or"),
             (dict(type="lora", coft=True), "lora.coft applies to lora.type = 'oft' only")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            LoraConfig(**kwargs)
    with pytest.raises(ValueError, match="lora.type"):
        LoraConfig(type="boft")


def test_bad_fits_are_one_line_and_change_nothing():
    net = Net("linear")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer: lora.oft_block_size = 3 does not divide this layer's input size 8"):
        lc.add_lora(net, LoraConfig(type="oft", oft_block_size=3, target_modules=["layer"]))
    assert not list(lc.lora_layers(net))
    lc.add_lora(net, LoraConfig(type="oft", oft_block_size=4, target_modules=["layer"]), "rot")
    for type_ in ("lora", "loha"):
        with pytest.raises(ValueError, match=r"layer: adapter 'x' \(" + type_ + r"\) cannot share a layer with "
                                             r"adapters \['rot'\] \(oft\)"):
            lc.add_lora(net, LoraConfig(type=type_, target_modules=["layer"]), "x")
    assert lc.adapter_names(net) == ["rot"] and list(net.layer.lycoris) == ["rot"]
    lc.remove_lora(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("type_", list(TYPES))
def test_merge_of_a_non_finite_adapter_changes_nothing(type_):
    net = Net("conv1x1")
    lc.add_lora(net, LoraConfig(target_modules=["layer"], **TYPES[type_]))
    w0 = net.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        next(net.layer.lycoris["default"].parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"adapter\(s\) \['default'\] hold NaN or inf"):
        lc.merge_lora(net)
    assert torch.equal(net.layer.base_layer.weight, w0) and net.layer.merged_adapters == []


def test_the_trainers_refuse_what_their_files_cannot_hold_in_one_line():
    """The SD trainer takes LoHa, LoKr and OFT (kohya/LyCORIS files; OFT as full weight differences) but not a
    diffusers copy of them;
    the LLM trainer takes every type, except on its MindSpore backend (LoRA only there: the twin's LoHa / LoKr,
    tests/test_mindspore_core.py, has no fused slices yet)."""
    from lora_core.errors import ConfigError
    from lora_llm.config import load_llm_config
    from lora_sd.config import load_train_config
    assert load_train_config(None, ["data.path=x", "lora.type=loha", "output.save_diffusers=false"]).lora.type == "loha"
    with pytest.raises(ConfigError, match=r"lora.type = 'lokr' has no diffusers LoRA form: set output.save_diffusers"):
        load_train_config(None, ["data.path=x", "lora.type=lokr"])
    with pytest.raises(ConfigError, match=r"text_encoder_lora.type = 'oft' has no diffusers LoRA form"):
        load_train_config(None, ["data.path=x", "text_encoder_lora.type=oft"])
    assert load_train_config(None, ["data.path=x", "text_encoder_lora.type=oft", "output.save_diffusers=false"]
                             ).text_encoder_lora.type == "oft"
    assert load_llm_config(None, ["lora.type=lokr"]).lora.type == "lokr"
    with pytest.raises(ConfigError, match=r"lora.type = 'lokr': the MindSpore backend trains LoRA only"):
        load_llm_config(None, ["lora.type=lokr", "backend=mindspore"])
    # LoRA+ speeds up lora_B matrices: with no LoRA-type adapter it would do nothing, refused at load
    with pytest.raises(ConfigError, match=r"train.loraplus_lr_ratio acts on lora_B matrices, which lora.type = 'loha'"):
        load_llm_config(None, ["lora.type=loha", "train.loraplus_lr_ratio=16"])
    sd = ["data.path=x", "lora.type=lokr", "output.save_diffusers=false", "train.loraplus_lr_ratio=16"]
    with pytest.raises(ConfigError, match=r"train.loraplus_lr_ratio acts on lora_B matrices, which lora.type = 'lokr'"):
        load_train_config(None, sd)
    assert load_train_config(None, [*sd, "text_encoder_lora.r=4"]).train.loraplus_lr_ratio == 16   # the TE's LoRA


@pytest.mark.parametrize("type_", list(TYPES))
def test_float64_parity_and_low_precision_adapters(type_):
    """Moved with .double() (nn.Module's own machinery: an adapter module must not shadow it), ours equals PEFT to
    1e-10; bf16 adapter weights on an fp32 base run, keep the base dtype and merge to what they compute."""
    cfg = LoraConfig(target_modules=["layer"], **TYPES[type_])
    ours, ref = twins("conv3x3" if type_ != "oft" else "conv1x1", cfg)
    ours.double()
    ref.double()
    x = torch.randn(2, IN, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    net = Net("conv3x3")
    lc.add_lora(net, cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in lc.lora_parameters(net):
            p.normal_(0, 0.1)
        x = torch.randn(2, IN, 6, 6)
        y = net(x)
        assert y.dtype == torch.float32 and next(net.layer.lycoris.parameters()).dtype == torch.bfloat16
        lc.merge_lora(net)
        torch.testing.assert_close(net(x), y, rtol=2e-2, atol=2e-2)
