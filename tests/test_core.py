"""The shared LoRA core: exact parity with PEFT and loralib semantics, verbs, and files."""
import copy
import math

import peft
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lora_core import (LoraConfig, LoraLoadError, add_lora, delete_adapter, load_lora, load_lora_state_dict,
                       lora_disabled, lora_layers, lora_parameters, lora_state_dict, merge_lora, remove_lora,
                       save_lora, set_adapter, set_scale, unmerge_lora)
from lora_core.configfile import dumps, load_config
from lora_core.errors import UnknownAdapterError
from lora_core.errors import ConfigError

torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(12, 10)
        elif kind == "conv1d":
            self.proj = Conv1D(15, 12)  # GPT-2 style: weight (in=12, out=15)
        else:
            self.proj = nn.Conv2d(12, 10, 1)
        self.kind = kind

    def forward(self, x):
        return self.proj(x)


def _input(kind):
    return torch.randn(3, 12, 4, 4) if kind == "conv2d" else torch.randn(3, 5, 12)


def _randomize_B(model):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for B in layer.lora_B.values():
                B.weight.normal_()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft(kind, rslora):
    base = Net(kind)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    add_lora(ours, LoraConfig(r=4, alpha=6, target_modules=["proj"], use_rslora=rslora))
    _randomize_B(ours)
    pc = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["proj"], use_rslora=rslora,
                         fan_in_fan_out=(kind == "conv1d"))
    theirs = peft.get_peft_model(theirs, pc)
    layer = ours.proj
    pl = theirs.base_model.model.proj
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
        pl.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    assert pl.lora_A["default"].weight.shape == layer.lora_A["default"].weight.shape
    x = _input(kind)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    for n in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(layer, n)["default"].weight.grad, getattr(pl, n)["default"].weight.grad,
                                   rtol=1e-6, atol=1e-6)
    # the state dict names are PEFT's (without the adapter name)
    peft_keys = {k.replace("base_model.model.", "") for k in peft.get_peft_model_state_dict(theirs)}
    assert set(lora_state_dict(ours)) == peft_keys


def test_scale_and_init():
    m = Net("linear")
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules=["proj"]))
    assert m.proj.scaling["default"] == 2.0
    assert torch.count_nonzero(m.proj.lora_B["default"].weight) == 0  # B starts at zero: no change
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on fan_in 12
    assert m.proj.lora_A["default"].weight.abs().max() <= bound
    g = Net("linear")
    add_lora(g, LoraConfig(r=16, alpha=4, target_modules=["proj"], init="gaussian", use_rslora=True))
    assert g.proj.scaling["default"] == 1.0
    assert abs(g.proj.lora_A["default"].weight.std().item() - 1 / 16) < 0.02


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def test_fused_slices_match_loralib_semantics():
    model = _tiny_gpt2()
    ref = copy.deepcopy(model)
    names = add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["c_attn"],
                                       fused_slices={"c_attn": [True, False, True]}))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    _randomize_B(model)
    layer = model.transformer.h[0].attn.c_attn
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (4, 16) and B.shape == (32, 2)  # loralib MergedLinear shapes for [q, v]
    x = torch.randn(2, 3, 16)
    base = ref.transformer.h[0].attn.c_attn(x)
    out = layer(x)
    q = x @ A[:2].T @ B[:16].T * 2.0
    v = x @ A[2:].T @ B[16:].T * 2.0
    torch.testing.assert_close(out[..., :16], base[..., :16] + q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., 16:32], base[..., 16:32], rtol=0, atol=0)  # k untouched
    torch.testing.assert_close(out[..., 32:], base[..., 32:] + v, rtol=1e-6, atol=1e-6)
    # and the merged weight changes q and v columns only (Conv1D weight is (in, out))
    merge_lora(model)
    W0, W1 = ref.transformer.h[0].attn.c_attn.weight, layer.base_layer.weight
    assert torch.equal(W0[:, 16:32], W1[:, 16:32]) and not torch.equal(W0[:, :16], W1[:, :16])


def test_only_lora_parameters_get_gradients():
    model = _tiny_gpt2()
    add_lora(model, LoraConfig(r=2, alpha=2, target_modules=["c_attn"], fused_slices={"c_attn": [1, 0, 1]}))
    _randomize_B(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in lora_parameters(model)) == 2 * (4 * 16 + 32 * 2)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


def test_merge_unmerge_remove_roundtrip():
    model = _tiny_gpt2()
    orig = copy.deepcopy(model.state_dict())
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]))
    _randomize_B(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 8))
    y = model(ids).logits
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)
    remove_lora(model)
    assert not list(lora_layers(model))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, orig[k], rtol=1e-6, atol=1e-6)
    # remove with merge keeps the adapted function in plain modules
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    _randomize_B(model)
    y = model(ids).logits
    remove_lora(model, merge=True)
    assert not list(lora_layers(model))
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_fp16_merge_computes_delta_in_fp32():
    lin = nn.Linear(64, 64).half()
    m = nn.Sequential(lin)
    add_lora(m, LoraConfig(r=4, alpha=4, target_modules=["0"]))
    _randomize_B(m)
    layer = m[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(1e-3)  # a tiny delta: fp16 A@B products would lose it
    expected = (lin.weight.float() + layer.delta_weight("default")).half()
    assert layer.lora_A["default"].weight.dtype == torch.float32  # LoRA stays fp32 under fp16 base
    merge_lora(m)
    assert torch.equal(lin.weight, expected)
    assert lin.weight.dtype == torch.float16


def test_several_adapters_scale_enable_and_active():
    model = _tiny_gpt2()
    model.eval()
    ids = torch.randint(0, 50, (1, 6))
    base = model(ids).logits
    add_lora(model, LoraConfig(r=2, alpha=2, target_modules=["c_attn"]), adapter="a")
    add_lora(model, LoraConfig(r=3, alpha=6, target_modules=["c_attn"]), adapter="b")
    _randomize_B(model)
    set_adapter(model, "a")
    ya = model(ids).logits
    set_adapter(model, "b")
    yb = model(ids).logits
    set_adapter(model, ["a", "b"])
    yab = model(ids).logits
    assert not torch.allclose(ya, yb)
    # deltas add up at the level of each layer: check with scale 0 on one adapter
    set_scale(model, "b", 0.0)
    torch.testing.assert_close(model(ids).logits, ya, rtol=1e-5, atol=1e-5)
    set_scale(model, "b", 1.0)
    torch.testing.assert_close(model(ids).logits, yab)
    with lora_disabled(model):
        torch.testing.assert_close(model(ids).logits, base, rtol=1e-6, atol=1e-6)
    with pytest.raises(UnknownAdapterError, match="nope"):
        set_adapter(model, "nope")
    delete_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, yb, rtol=1e-5, atol=1e-5)
    assert set(lora_state_dict(model, "b")) and pytest.raises(UnknownAdapterError, lora_state_dict, model, "a")


def test_save_load_roundtrip_exact(tmp_path):
    model = _tiny_gpt2()
    ref = copy.deepcopy(model)
    add_lora(model, LoraConfig(r=2, alpha=3, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    _randomize_B(model)
    save_lora(tmp_path / "a.safetensors", model, metadata={"base_model": "tiny-gpt2"})
    cfg = load_lora(tmp_path / "a.safetensors", ref)
    assert cfg.fused_slices == {"c_attn": [True, False, True]} and cfg.alpha == 3
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, lora_state_dict(ref)[k])
    ids = torch.randint(0, 50, (2, 5))
    model.eval(), ref.eval()
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_mismatched_adapters_raise_naming_the_key(tmp_path):
    model = _tiny_gpt2()
    add_lora(model, LoraConfig(r=2, alpha=2, target_modules=["c_attn"]))
    sd = dict(lora_state_dict(model))
    bad_rank = {**sd, "transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(3, 16)}
    with pytest.raises(LoraLoadError, match=r"transformer\.h\.0\.attn\.c_attn\.lora_A\.weight.*\(3, 16\)"):
        load_lora_state_dict(model, bad_rank)
    missing = {k: v for k, v in sd.items() if "h.1." not in k}
    with pytest.raises(LoraLoadError, match=r"missing keys.*h\.1\.attn\.c_attn\.lora_A"):
        load_lora_state_dict(model, missing)
    extra = {**sd, "transformer.h.9.attn.c_attn.lora_A.weight": torch.zeros(2, 16)}
    with pytest.raises(LoraLoadError, match=r"unexpected keys.*h\.9"):
        load_lora_state_dict(model, extra)
    # a file for a model with different modules: nothing is half-loaded
    save_lora(tmp_path / "a.safetensors", model)
    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(LoraLoadError, match=r"a\.safetensors.*h\.1"):
        load_lora(tmp_path / "a.safetensors", other)
    assert not list(lora_layers(other))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="matched no supported module"):
        add_lora(_tiny_gpt2(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lora.r"):
        LoraConfig(r=0)


def test_target_matching_rules():
    c = LoraConfig(target_modules=["to_q", "attn2.to_k"])
    assert c.matches("down.attn2.to_q") and c.matches("to_q") and c.matches("x.attn2.to_k")
    assert not c.matches("x.attn1.to_k") and not c.matches("x.to_qq")
    r = LoraConfig(target_modules=r".*attn2\.(to_q|to_out\.0)")
    assert r.matches("a.attn2.to_out.0") and not r.matches("a.attn2.to_out.0.x")


def test_config_files(tmp_path):
    from dataclasses import dataclass, field
    from lora_core.training import TrainSettings

    @dataclass
    class Job:
        run_dir: str = "runs/x"
        lora: LoraConfig = field(default_factory=LoraConfig)
        train: TrainSettings = field(default_factory=TrainSettings)

    p = tmp_path / "job.toml"
    p.write_text('run_dir = "r"\n[lora]\nr = 4\ntarget_modules = ["c_attn"]\n[train]\nlearning_rate = 1e-3\n')
    job = load_config(Job, p, ["train.max_steps=7", "lora.alpha=2"])
    assert job.lora.r == 4 and job.train.max_steps == 7 and job.lora.alpha == 2.0 and job.train.learning_rate == 1e-3
    (tmp_path / "again.toml").write_text(dumps(job))
    assert load_config(Job, tmp_path / "again.toml") == job
    p.write_text("[train]\nlearnin_rate = 1\n")
    with pytest.raises(ConfigError, match=r"job\.toml.*train.*learnin_rate"):
        load_config(Job, p)
    p.write_text("[lora]\nr = 'four'\n")
    with pytest.raises(ConfigError, match=r"lora\.r: expected an integer"):
        load_config(Job, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "nope.toml")


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_merge_equals_unmerged_for_every_layer_kind_and_slices(kind):
    m = Net(kind)
    slices = {"proj": [False, True]} if kind == "linear" else ({"proj": [True, False, True]} if kind == "conv1d"
                                                             else {"proj": [True, False]})
    add_lora(m, LoraConfig(r=3, alpha=5, target_modules=["proj"], fused_slices=slices))
    _randomize_B(m)
    x = _input(kind)
    y = m(x)
    n = len(slices["proj"])
    out = y.shape[1] if kind == "conv2d" else y.shape[-1]
    base = m.proj.base_layer(x)
    off = [i for i, on in enumerate(slices["proj"]) if not on][0]
    sl = slice(off * out // n, (off + 1) * out // n)
    if kind == "conv2d":
        assert torch.equal(y[:, sl], base[:, sl])
    else:
        assert torch.equal(y[..., sl], base[..., sl])
    merge_lora(m)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
