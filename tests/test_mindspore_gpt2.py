"""MindSpore GPT-2 + LoRA against transformers' GPT-2 + lora_core (fp32): logits, LoRA gradients,
adapter files both ways, training steps in PyNative and graph mode."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore", reason="MindSpore is not installed (pip install '.[mindspore]')")
torch = pytest.importorskip("torch")

import lora_core as lc  # noqa: E402
import lora_core.mindspore as lcm  # noqa: E402
from lora_core.config import LoraConfig  # noqa: E402
from lora_core.training import TrainSettings, make_optimizer, make_scheduler  # noqa: E402
from lora_llm.mindspore.gpt2 import GPT2Config, build_gpt2, load_hf_state_dict  # noqa: E402
from lora_llm.mindspore.train import LoraTrainer, lr_schedule, set_device  # noqa: E402
from lora_llm.models import tiny_gpt2_config  # noqa: E402

pytestmark = pytest.mark.mindspore
VOCAB, RTOL = 97, 1e-5
LORA = LoraConfig(r=4, alpha=8, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def torch_model(num_labels=0):
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    cfg = tiny_gpt2_config(VOCAB, n_embd=32, n_head=4, n_inner=64, n_positions=32, num_labels=max(num_labels, 2))
    torch.manual_seed(0)
    m = (GPT2ForSequenceClassification(cfg) if num_labels else GPT2LMHeadModel(cfg)).eval()
    return m


def ms_twin(tm, num_labels=0):
    """The MindSpore cell with the torch model's weights (Conv1D transposed, LayerNorm gamma/beta)."""
    net = build_gpt2(GPT2Config.from_dict(tm.config.to_dict()), num_labels)
    load_hf_state_dict(net, {k: v.numpy() for k, v in tm.state_dict().items()})
    net.set_train(False)
    return net


def randomize_adapter(net, seed=1):
    """Non-zero B (A alone gets no gradient from a zero B) on the MindSpore side; returns the adapter."""
    rng = np.random.RandomState(seed)
    sd = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in lcm.lora_state_dict(net).items()}
    lcm.load_lora_state_dict(net, sd)
    return sd


def pair(num_labels=0, lora=LORA):
    """(torch model, MindSpore net) with the same base weights and the same adapter."""
    set_device("CPU")
    tm = torch_model(num_labels)
    net = ms_twin(tm, num_labels)
    lcm.add_lora(net, lora)
    sd = randomize_adapter(net)
    lc.add_lora(tm, lora)
    lc.load_lora_state_dict(tm, {k: torch.from_numpy(v) for k, v in sd.items()})
    return tm, net


def inputs(batch=3, t=10, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, t))
    mask = np.ones((batch, t), np.int64)
    mask[1, t - 3:] = 0  # right padding
    ids[1, t - 3:] = VOCAB - 1
    return ids, mask


def T(x):
    return ms.Tensor(x, ms.int32)


def test_base_logits_match_transformers():
    tm = torch_model()
    net = ms_twin(tm)
    ids, mask = inputs()
    with torch.no_grad():
        ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = net(T(ids), T(mask)).asnumpy()
    real = mask.astype(bool)
    assert rel(out[real], ref[real]) < RTOL


def test_load_gpt2_from_a_saved_folder_and_file(tmp_path):
    from lora_llm.mindspore.gpt2 import load_gpt2
    from lora_llm.models import make_tiny_model
    tm, _ = make_tiny_model(tmp_path / "tiny", n_layer=1)
    ids = np.array([[5, 17, 300, 2]])
    with torch.no_grad():
        ref = tm(torch.tensor(ids)).logits.numpy()
    for src in (tmp_path / "tiny", tmp_path / "tiny" / "model.safetensors"):
        net = load_gpt2(src)
        net.set_train(False)
        assert rel(net(T(ids), T(np.ones_like(ids))).asnumpy(), ref) < RTOL
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        load_gpt2(tmp_path / "no-such-folder")


def test_load_hf_state_dict_is_strict():
    tm = torch_model()
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    net = build_gpt2(GPT2Config.from_dict(tm.config.to_dict()))
    bad = dict(sd)
    del bad["transformer.h.1.mlp.c_fc.weight"]
    bad["transformer.h.0.ln_1.weight"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight.*h\.0\.ln_1\.weight"):
        load_hf_state_dict(net, bad, "ckpt")
    # keys without the `transformer.` prefix (the original hub checkpoints) load too
    load_hf_state_dict(net, {k.removeprefix("transformer."): v for k, v in sd.items()})


@pytest.mark.parametrize("num_labels", [0, 3])
def test_lora_logits_and_gradients_match_torch(num_labels):
    lora = LoraConfig(**{**LORA.to_dict(), "modules_to_save": ["score"] if num_labels else []})
    tm, net = pair(num_labels, lora)
    ids, mask = inputs()
    labels = np.random.RandomState(2).randint(0, num_labels, 3) if num_labels else np.where(mask > 0, ids, -100)
    # torch: HF's own loss
    out = tm(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    ref_grads = {f"{n}.lora_{w}.weight": getattr(l, f"lora_{w}")["default"].weight.grad.numpy()
                 for n, l in lc.lora_layers(tm) for w in "AB"}
    if num_labels:
        ref_grads["score.weight"] = tm.score.weight.grad.numpy()
        assert rel(net(T(ids), T(mask)).asnumpy(), out.logits.detach().numpy()) < RTOL
    else:
        real = mask.astype(bool)
        assert rel(net(T(ids), T(mask)).asnumpy()[real], out.logits.detach().numpy()[real]) < RTOL
    params = net.trainable_params()
    assert {p.name for p in params} == set(ref_grads)  # gradients only for trainable_params()
    loss, grads = ms.value_and_grad(net.loss, None, params)(T(ids), T(mask), T(labels))
    assert abs(float(loss.asnumpy()) - out.loss.item()) < RTOL * abs(out.loss.item())
    for p, g in zip(params, grads):
        assert rel(g.asnumpy(), ref_grads[p.name]) < RTOL, p.name


def test_adapter_files_interchange(tmp_path):
    tm, net = pair(num_labels=2, lora=LoraConfig(r=2, alpha=6, use_rslora=True, target_modules=["c_attn", "c_fc"],
                                                 fused_slices={"c_attn": [True, False, True]}, modules_to_save=["score"]))
    ids, mask = inputs()
    # MindSpore -> file -> a fresh torch model
    lcm.save_lora(tmp_path / "ms.safetensors", net, {"note": "from mindspore"})
    fresh = torch_model(2)
    lc.load_lora(tmp_path / "ms.safetensors", fresh)
    with torch.no_grad():
        ref = fresh(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert rel(net(T(ids), T(mask)).asnumpy(), ref) < RTOL
    # torch -> file -> a fresh MindSpore net (change the torch adapter first)
    with torch.no_grad():
        for p in lc.lora_parameters(fresh):
            p.add_(0.05)
        ref2 = fresh(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    lc.save_lora(tmp_path / "pt.safetensors", fresh)
    net2 = ms_twin(torch_model(2), 2)
    cfg = lcm.load_lora(tmp_path / "pt.safetensors", net2)
    assert cfg.use_rslora and cfg.r == 2 and cfg.modules_to_save == ["score"]
    assert rel(net2(T(ids), T(mask)).asnumpy(), ref2) < RTOL
    # the two files hold the same keys and metadata fields
    sd_ms, meta_ms = lc.read_safetensors(tmp_path / "ms.safetensors")
    sd_pt, meta_pt = lc.read_safetensors(tmp_path / "pt.safetensors")
    assert set(sd_ms) == set(sd_pt) and "transformer.h.0.attn.c_attn.lora_A.weight" in sd_ms
    assert {k: meta_ms[k] for k in meta_pt} == meta_pt


def test_load_lora_mismatch_leaves_net_unchanged(tmp_path):
    tm, net = pair()
    lc.save_lora(tmp_path / "a.safetensors", tm)
    other = build_gpt2(GPT2Config.from_dict({**tm.config.to_dict(), "n_layer": 1}))
    before = [p.name for p in other.get_parameters()]
    with pytest.raises(lc.LoraLoadError, match=r"h\.1\.attn\.c_attn"):
        lcm.load_lora(tmp_path / "a.safetensors", other)
    assert [p.name for p in other.get_parameters()] == before
    assert not list(lcm.lora_layers(other))


def _torch_steps(tm, batches, s: TrainSettings):
    params = lc.lora_parameters(tm)
    opt = make_optimizer(params, s)
    sched = make_scheduler(opt, s)
    tm.train()
    losses = []
    for ids, mask, labels in batches:
        loss = tm(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
        loss.backward()
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_training_steps_match_torch(mode):
    """AdamW + warmup/linear schedule + clipping, 4 steps from the same start: same losses, same adapter."""
    tm, net = pair(num_labels=2, lora=LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=["score"],
                                                 fused_slices={"c_attn": [True, False, True]}))
    s = TrainSettings(max_steps=4, learning_rate=5e-2, weight_decay=0.01, lr_scheduler="linear", lr_warmup_steps=1,
                      max_grad_norm=0.5)
    batches = []
    for i in range(s.max_steps):
        ids, mask = inputs(seed=10 + i)
        batches.append((ids, mask, np.random.RandomState(i).randint(0, 2, 3)))
    ref = _torch_steps(tm, batches, s)
    net.set_train(True)
    trainer = LoraTrainer(net, s, graph=mode == "graph")
    lr = lr_schedule(s)
    got = [trainer.step([(T(a), T(b), T(c))], lr(i)) for i, (a, b, c) in enumerate(batches)]
    assert np.allclose(got, ref, rtol=RTOL, atol=0), (got, ref)
    assert len(set(np.round(ref, 4))) == len(ref)  # the losses really moved
    ref_sd = {k: v.numpy() for k, v in lc.lora_state_dict(tm).items()}
    for k, v in lcm.lora_state_dict(net).items():
        assert rel(v, ref_sd[k]) < 1e-4, k


@pytest.mark.slow
def test_graph_gradients_only_for_trainable_params():
    """The trainer differentiates trainable_params() only; frozen weights do not move in graph mode."""
    tm, net = pair()
    frozen = {p.name: p.asnumpy().copy() for p in net.get_parameters() if not p.requires_grad}
    trainer = LoraTrainer(net, TrainSettings(max_steps=1, learning_rate=1e-2, weight_decay=0.1))
    assert [p.name for p in trainer.optimizer.parameters] == [p.name for p in net.trainable_params()]
    ids, mask = inputs()
    loss, grads = trainer.grads(T(ids), T(mask), T(np.where(mask > 0, ids, -100)))
    assert len(grads) == len(trainer.params)
    trainer.apply(grads, 1e-2)
    assert all(np.array_equal(p.asnumpy(), frozen[p.name]) for p in net.get_parameters() if p.name in frozen)
