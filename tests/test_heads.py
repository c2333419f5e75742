"""Per-adapter heads (PEFT's ModulesToSaveWrapper semantics) and the core API's failure rules:
atomic add_lora/load_lora, unknown adapter names refused, non-finite weights refused at load and
merge (fp16 overflow included), each leaving the model exactly as it was."""
import copy

import pytest
import torch
from torch import nn

from lora_core import (AdapterExistsError, HeadConflictError, LoraConfig, LoraLoadError, MergeOverflowError,
                       NonFiniteError, TargetMatchError, UnknownAdapterError, add_lora, delete_adapter, enable_lora,
                       load_lora, load_lora_state_dict, lora_disabled, lora_layers, lora_state_dict, merge_lora,
                       read_safetensors, remove_lora, save_lora, set_adapter, set_scale)
from lora_core.io import atomic_save_safetensors
from lora_core.layers import LoraLayer, ModulesToSaveWrapper

HEADS = LoraConfig(r=2, alpha=4, target_modules=["body"], modules_to_save=["score"])


class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.score = nn.Linear(8, 3)

    def forward(self, x):
        return self.score(torch.relu(self.body(x)))


def _base(seed=0):
    torch.manual_seed(seed)
    return Clf().eval()


def _randomize(model, seed=1, only=None):
    """Non-zero, distinct values in every LoRA weight and head copy (a fresh B is zero and a fresh
    head copy equals the original: both would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("lora_" in n or "modules_to_save." in n) and (only is None or f".{only}." in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _two_adapters():
    base = _base()
    m = copy.deepcopy(base)
    add_lora(m, HEADS, "a")
    add_lora(m, HEADS, "b")
    _randomize(m)
    return base, m


def _snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [(n, type(x).__name__) for n, x in m.named_modules()],
            {n: p.requires_grad for n, p in m.named_parameters()}, dict(getattr(m, "_lora_configs", {})))


def _assert_same(m, snap):
    sd, mods, flags, cfgs = snap
    now = m.state_dict()
    assert list(now) == list(sd) and all(torch.equal(now[k], v) for k, v in sd.items())
    assert [(n, type(x).__name__) for n, x in m.named_modules()] == mods
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert dict(getattr(m, "_lora_configs", {})) == cfgs


# ------------------------------------------------------------------------------------------ heads
def test_two_adapters_own_their_heads_switch_and_disable():
    base, m = _two_adapters()
    x = torch.randn(5, 8)
    assert isinstance(m.score, ModulesToSaveWrapper) and set(m.score.modules_to_save) == {"a", "b"}
    with pytest.raises(HeadConflictError, match=r"\['a', 'b'\]"):   # both active after two add_lora calls
        m(x)
    with pytest.raises(HeadConflictError, match="score"):
        set_adapter(m, ["a", "b"])
    set_adapter(m, "a")
    ya = m(x)
    # the output is exactly LoRA body + adapter a's own head
    h = torch.relu(m.body(x))
    assert torch.equal(ya, m.score.modules_to_save["a"](h)) and m.score.weight is m.score.modules_to_save["a"].weight
    set_adapter(m, "b")
    yb = m(x)
    assert not torch.allclose(ya, yb)
    set_adapter(m, "a")
    assert torch.equal(m(x), ya)
    set_adapter(m, "b")
    assert torch.equal(m(x), yb)
    with lora_disabled(m):   # the original head, not a trained copy
        assert torch.equal(m(x), base(x))
    assert torch.equal(m(x), yb)
    enable_lora(m, False)
    assert torch.equal(m(x), base(x))
    enable_lora(m, True)
    # the original head is kept, frozen; each copy trains; only the active copy gets a gradient
    assert torch.equal(m.score.original_module.weight, base.score.weight)
    assert not m.score.original_module.weight.requires_grad and m.score.modules_to_save["a"].weight.requires_grad
    m(x).sum().backward()
    assert m.score.modules_to_save["b"].weight.grad is not None and m.score.modules_to_save["a"].weight.grad is None
    # delete removes the adapter's copy; the other adapter's output is untouched
    delete_adapter(m, "a")
    assert set(m.score.modules_to_save) == {"b"} and "a" not in m.body.lora_A
    assert torch.equal(m(x), yb)


def test_remove_lora_keeps_the_active_head_only_when_merging():
    base, m = _two_adapters()
    set_adapter(m, "b")
    x = torch.randn(4, 8)
    y = m(x)
    plain = remove_lora(copy.deepcopy(m))
    assert isinstance(plain.score, nn.Linear) and torch.equal(plain(x), base(x))
    merged = remove_lora(m, merge=True)
    assert isinstance(merged.score, nn.Linear) and isinstance(merged.body, nn.Linear)
    torch.testing.assert_close(merged(x), y, rtol=1e-6, atol=1e-6)


def test_save_load_carries_each_head_and_keeps_the_others(tmp_path):
    base, m = _two_adapters()
    save_lora(tmp_path / "a.safetensors", m, adapter="a")
    save_lora(tmp_path / "b.safetensors", m, adapter="b")
    sd_a, _ = read_safetensors(tmp_path / "a.safetensors")
    assert set(sd_a) == {"body.lora_A.weight", "body.lora_B.weight", "score.weight", "score.bias"}
    assert torch.equal(sd_a["score.weight"], m.score.modules_to_save["a"].weight)
    fresh = copy.deepcopy(base)
    load_lora(tmp_path / "a.safetensors", fresh, "a")
    head_a = {k: v.clone() for k, v in fresh.score.modules_to_save["a"].state_dict().items()}
    load_lora(tmp_path / "b.safetensors", fresh, "b")   # does not overwrite adapter a's head
    for k, v in head_a.items():
        assert torch.equal(fresh.score.modules_to_save["a"].state_dict()[k], v)
    assert torch.equal(fresh.score.original_module.weight, base.score.weight)
    x = torch.randn(6, 8)
    for ad in ("a", "b"):
        set_adapter(m, ad)
        set_adapter(fresh, ad)
        assert torch.equal(fresh(x), m(x)), ad
    with lora_disabled(fresh):
        assert torch.equal(fresh(x), base(x))


def test_llm_adapter_folders_carry_their_heads(tmp_path, tiny_lm):
    from lora_llm.adapter_io import load_adapter, save_adapter
    from lora_llm.models import classifier_from_lm
    peft = pytest.importorskip("peft")
    lm, tok = tiny_lm()
    base = classifier_from_lm(lm, 3, tok.eos_token_id)
    ours = copy.deepcopy(base)
    cfg = LoraConfig(r=2, alpha=4, target_modules=["c_attn"], modules_to_save=["score"])
    add_lora(ours, cfg, "a")
    add_lora(ours, cfg, "b")
    _randomize(ours)
    info = {"task": "x", "num_labels": 3, "model": {}, "pretrained": "tiny"}
    for ad in ("a", "b"):
        save_adapter(tmp_path / ad, ours, info, adapter=ad)
    fresh = copy.deepcopy(base)
    load_adapter(tmp_path / "a", fresh, "a")
    head_a = fresh.score.modules_to_save["a"].weight.clone()
    load_adapter(tmp_path / "b", fresh, "b")
    assert torch.equal(fresh.score.modules_to_save["a"].weight, head_a)
    ids = torch.tensor([[464, 2068, 286, 262], [40, 588, 340, 13]]) % (base.config.vocab_size - 1)
    for ad in ("a", "b"):
        set_adapter(ours, ad)
        set_adapter(fresh, ad)
        y = ours.eval()(input_ids=ids).logits
        assert torch.equal(fresh.eval()(input_ids=ids).logits, y)
        # the PEFT folder of each adapter carries that adapter's head
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / ad / "peft").eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    with lora_disabled(fresh):
        assert torch.equal(fresh(input_ids=ids).logits, base.eval()(input_ids=ids).logits)


def test_parity_with_peft_modules_to_save_wrapper():
    peft = pytest.importorskip("peft")
    base = _base()
    pcfg = dict(r=2, lora_alpha=4, target_modules=["body"], modules_to_save=["score"])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**pcfg), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**pcfg))
    _randomize(theirs)
    assert isinstance(theirs.base_model.model.score, peft.utils.other.ModulesToSaveWrapper)
    ours = copy.deepcopy(base)
    add_lora(ours, HEADS, "a")
    add_lora(ours, HEADS, "b")
    for ad in ("a", "b"):   # PEFT's saved names are ours: copy each adapter across by them
        sd = {k.removeprefix("base_model.model."): v
              for k, v in peft.get_peft_model_state_dict(theirs, adapter_name=ad).items()}
        assert set(sd) == set(lora_state_dict(ours, ad))
        load_lora_state_dict(ours, sd, ad)
    theirs.eval()
    x = torch.randn(7, 8)
    outs = {}
    for ad in ("a", "b"):
        theirs.set_adapter(ad)
        set_adapter(ours, ad)
        outs[ad] = ours(x)
        torch.testing.assert_close(outs[ad], theirs(x), rtol=1e-6, atol=1e-6)
        with theirs.disable_adapter(), lora_disabled(ours):
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
            assert torch.equal(ours(x), base(x))
    assert not torch.allclose(outs["a"], outs["b"])
    # delete the active adapter's copy on both sides, then merge-and-unload keeps b's head
    theirs.set_adapter("b")
    theirs.delete_adapter("a")
    delete_adapter(ours, "a")
    assert set(ours.score.modules_to_save) == set(theirs.base_model.model.score.modules_to_save) == {"b"}
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = remove_lora(ours, merge=True)
    torch.testing.assert_close(merged_ours(x), merged_theirs(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(merged_ours.score.weight, merged_theirs.score.weight)


# ------------------------------------------------------------------------------------------ atomic API
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))


def test_failed_add_lora_leaves_the_model_as_it_was():
    m = _gpt2()
    fresh = _snapshot(m)
    # a target that fails halfway (h.0.attn.c_attn is wrapped before h.0.attn.c_proj fails)
    halfway = LoraConfig(target_modules=["c_attn", "attn.c_proj"], fused_slices={"attn.c_proj": [True, False, True]})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj.*divisible"):
        add_lora(m, halfway)
    _assert_same(m, fresh)
    assert not list(lora_layers(m))
    # with an adapter in place: an existing name, a failing target, a missing module to save
    add_lora(m, LoraConfig(r=2, alpha=2, target_modules=["c_attn"]), "a")
    with torch.no_grad():
        m.transformer.h[0].attn.c_attn.lora_B["a"].weight.fill_(0.1)
    before = _snapshot(m)
    with pytest.raises(AdapterExistsError, match=r"'a' exists already on \['transformer\.h\.0\.attn\.c_attn'"):
        add_lora(m, LoraConfig(target_modules=["c_attn", "c_fc"]), "a")
    _assert_same(m, before)
    with pytest.raises(ValueError, match="c_proj"):
        add_lora(m, halfway, "b")
    _assert_same(m, before)
    layer = m.transformer.h[0].attn.c_attn
    assert list(layer.lora_A) == ["a"] and list(layer.r) == ["a"] and layer.active_adapters == ["a"]
    with pytest.raises(TargetMatchError, match="modules_to_save.*no_head"):
        add_lora(m, LoraConfig(target_modules=["c_fc"], modules_to_save=["no_head"]), "b")
    _assert_same(m, before)
    with pytest.raises(TargetMatchError, match=r"\['q_proj', 'v_proj'\].*matched no supported module"):
        add_lora(m, LoraConfig(target_modules=["q_proj", "v_proj"]), "b")
    _assert_same(m, before)
    # an existing name on other modules extends the adapter (per-module ranks, as SD files load)
    assert add_lora(m, LoraConfig(r=4, alpha=4, target_modules=["c_fc"]), "a") == ["transformer.h.0.mlp.c_fc",
                                                                                  "transformer.h.1.mlp.c_fc"]
    assert m.transformer.h[1].mlp.c_fc.r == {"a": 4} and m.transformer.h[1].attn.c_attn.r == {"a": 2}
    # ... and a failure while extending it keeps what it had
    before = _snapshot(m)
    with pytest.raises(ValueError, match="attn.c_proj"):
        add_lora(m, LoraConfig(target_modules=["attn.c_proj"], fused_slices={"attn.c_proj": [True, False, True]}), "a")
    _assert_same(m, before)
    assert m.transformer.h[1].mlp.c_fc.r == {"a": 4} and m.transformer.h[0].attn.c_attn.active_adapters == ["a"]


def test_unknown_adapter_names_are_refused_with_the_known_ones():
    base, m = _two_adapters()
    set_adapter(m, "a")
    before = _snapshot(m)
    calls = [lambda: merge_lora(m, adapters=["typo"]), lambda: set_scale(m, "typo", 0.5),
             lambda: set_adapter(m, "typo"), lambda: set_adapter(m, ["a", "typo"]), lambda: delete_adapter(m, "typo"),
             lambda: lora_state_dict(m, "typo")]
    for call in calls:
        with pytest.raises(UnknownAdapterError) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, ValueError)   # one clear line at the CLI boundary
        assert "'typo'" in msg and "['a', 'b']" in msg and "\n" not in msg, msg
        _assert_same(m, before)
    assert m.body.active_adapters == ["a"] and m.body.user_scale == {"a": 1.0, "b": 1.0}


def _corrupt(src, dst, key, value):
    sd, meta = read_safetensors(src)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    atomic_save_safetensors(dst, sd, meta)


def test_nan_in_a_loaded_file_is_refused_naming_the_tensor(tmp_path):
    base, m = _two_adapters()
    save_lora(tmp_path / "a.safetensors", m, adapter="a")
    _corrupt(tmp_path / "a.safetensors", tmp_path / "nan.safetensors", "body.lora_B.weight", float("nan"))
    _corrupt(tmp_path / "a.safetensors", tmp_path / "inf.safetensors", "score.bias", float("inf"))
    fresh = copy.deepcopy(base)
    before = _snapshot(fresh)
    with pytest.raises(NonFiniteError, match=r"nan\.safetensors.*'body\.lora_B\.weight'.*1 NaN"):
        load_lora(tmp_path / "nan.safetensors", fresh)
    _assert_same(fresh, before)
    with pytest.raises(NonFiniteError, match=r"inf\.safetensors.*'score\.bias'.*1 inf"):
        load_lora(tmp_path / "inf.safetensors", fresh)
    _assert_same(fresh, before)
    # load_lora_state_dict into an existing adapter: refused, adapter a unchanged
    set_adapter(m, "a")
    snap = _snapshot(m)
    bad, _ = read_safetensors(tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteError, match="body.lora_B.weight"):
        load_lora_state_dict(m, bad, "a")
    _assert_same(m, snap)
    # and a file for an existing name is refused before anything changes
    load_lora(tmp_path / "a.safetensors", fresh, "a")
    snap = _snapshot(fresh)
    with pytest.raises(AdapterExistsError, match="'a'"):
        load_lora(tmp_path / "a.safetensors", fresh, "a")
    _assert_same(fresh, snap)


def test_fp16_merge_overflow_and_nan_merge_are_refused_with_weights_unchanged():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).half()
    with torch.no_grad():
        m[1].weight.fill_(6.0e4)   # close to fp16's max (65504)
    add_lora(m, LoraConfig(r=2, alpha=2, target_modules=["0", "1"]))
    with torch.no_grad():
        for _, layer in lora_layers(m):
            layer.lora_A["default"].weight.fill_(1.0)
            layer.lora_B["default"].weight.fill_(3000.0)   # ΔW = r * 3000 = 6000 per entry: ~66000 > 65504
    w0, w1 = m[0].base_layer.weight.clone(), m[1].base_layer.weight.clone()
    with pytest.raises(MergeOverflowError, match=r"into 1 overflows torch\.float16.*6\.\d+e\+04 > 6\.55e\+04"):
        merge_lora(m)
    # no layer merged, not even the first one that would have fit
    assert torch.equal(m[0].base_layer.weight, w0) and torch.equal(m[1].base_layer.weight, w1)
    assert all(not layer.merged_adapters for _, layer in lora_layers(m))
    with pytest.raises(MergeOverflowError):
        remove_lora(m, merge=True)
    assert all(isinstance(x, LoraLayer) for x in m) and torch.equal(m[1].base_layer.weight, w1)
    # a NaN adapter cannot be merged either; the error names the module and the adapter
    with torch.no_grad():
        m[1].base_layer.weight.fill_(1.0)
        m[0].lora_B["default"].weight[0, 0] = float("nan")
    w1 = m[1].base_layer.weight.clone()
    with pytest.raises(NonFiniteError, match=r"into 0 would give non-finite weights.*\['default'\] hold NaN"):
        merge_lora(m)
    assert torch.equal(m[0].base_layer.weight, w0) and torch.equal(m[1].base_layer.weight, w1)
    # fixed: the fp16 merge is the fp32 sum rounded once
    with torch.no_grad():
        m[0].lora_B["default"].weight.fill_(1e-3)
        m[1].lora_B["default"].weight.fill_(1e-3)
    expected = (w0.float() + m[0].delta_weight("default")).half()
    merge_lora(m)
    assert torch.equal(m[0].base_layer.weight, expected)


# ------------------------------------------------------------------------------------------ MindSpore twin
def test_mindspore_twin_keeps_the_original_head(tmp_path):
    """One adapter per net there, same head semantics: a trainable copy keeps the file's names, the
    original runs when the adapter is disabled and comes back with remove_lora; files agree with torch."""
    ms = pytest.importorskip("mindspore", reason="MindSpore is not installed")
    import numpy as np
    from mindspore import nn as msnn
    import lora_core.mindspore as lcm

    class MSClf(msnn.Cell):
        def __init__(self):
            super().__init__()
            self.body = msnn.Dense(8, 8)
            self.score = msnn.Dense(8, 3)

        def construct(self, x):
            return self.score(ms.ops.relu(self.body(x)))

    base = _base()
    net = MSClf()
    for p in net.get_parameters():
        ms.ops.assign(p, ms.Tensor(base.state_dict()[p.name].numpy()))
    x = np.random.RandomState(0).randn(5, 8).astype(np.float32)
    y0 = net(ms.Tensor(x)).asnumpy()
    lcm.add_lora(net, HEADS)
    sd = {k: np.random.RandomState(1).normal(0, 0.5, v.shape).astype(np.float32)
          for k, v in lcm.lora_state_dict(net).items()}
    lcm.load_lora_state_dict(net, sd)
    assert {p.name for p in net.trainable_params()} == set(sd) == {"body.lora_A.weight", "body.lora_B.weight",
                                                                  "score.weight", "score.bias"}
    assert isinstance(net.score, lcm.ModulesToSaveCell)
    y = net(ms.Tensor(x)).asnumpy()
    assert np.abs(y - y0).max() > 1e-2
    lcm.enable_lora(net, False)
    np.testing.assert_array_equal(net(ms.Tensor(x)).asnumpy(), y0)   # the original head, not the trained copy
    lcm.enable_lora(net, True)
    # the same file in torch gives the same outputs, adapter on and off
    lcm.save_lora(tmp_path / "ms.safetensors", net)
    tm = copy.deepcopy(base)
    load_lora(tmp_path / "ms.safetensors", tm)
    np.testing.assert_allclose(tm(torch.from_numpy(x)).detach().numpy(), y, rtol=1e-5, atol=1e-6)
    with lora_disabled(tm):
        np.testing.assert_allclose(tm(torch.from_numpy(x)).detach().numpy(), y0, rtol=1e-5, atol=1e-6)
    lcm.remove_lora(net)
    assert isinstance(net.score, msnn.Dense) and net.score.weight.name == "score.weight"
    np.testing.assert_array_equal(net(ms.Tensor(x)).asnumpy(), y0)
    # a NaN in the file is refused there too, naming the tensor; the net keeps no adapter
    _corrupt(tmp_path / "ms.safetensors", tmp_path / "nan.safetensors", "score.weight", float("nan"))
    with pytest.raises(LoraLoadError, match=r"nan\.safetensors.*'score\.weight'.*1 NaN"):
        lcm.load_lora(tmp_path / "nan.safetensors", net)
    assert not list(lcm.lora_layers(net)) and isinstance(net.score, msnn.Dense)
    np.testing.assert_array_equal(net(ms.Tensor(x)).asnumpy(), y0)


# ------------------------------------------------------------------ a head learning rate (train.head_learning_rate)
def test_head_learning_rate_moves_the_head_only_at_its_rate():
    from lora_core.settings import TrainSettings
    from lora_core.training import make_optimizer
    x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 3

    def first_delta(**kw):
        m = _base()
        add_lora(m, HEADS, "a")
        _randomize(m)
        named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in named}
        opt = make_optimizer(named, TrainSettings(learning_rate=1e-3, **kw))
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        return opt, {n: p.detach() - before[n] for n, p in named}
    _, plain = first_delta()
    opt, fast = first_delta(head_learning_rate=1e-2)
    assert sorted(g.get("lr", 1e-3) for g in opt.param_groups) == [1e-3, 1e-2]
    heads = [n for n in plain if ".modules_to_save." in n]
    assert len(heads) == 2 and len(plain) == 4        # score copy's weight and bias; body's lora_A and lora_B
    for n in plain:     # AdamW's first step moves each weight by ~lr: the head 10x, the adapter as before
        torch.testing.assert_close(fast[n], plain[n] * (10 if n in heads else 1), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="head_learning_rate is set but the model has no modules_to_save"):
        m = _base()
        add_lora(m, LoraConfig(r=2, alpha=4, target_modules=["body"]), "a")
        make_optimizer([(n, p) for n, p in m.named_parameters() if p.requires_grad],
                       TrainSettings(head_learning_rate=1e-2))
