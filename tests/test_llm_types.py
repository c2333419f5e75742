"""LoHa, LoKr and OFT in `lora-llm train` (lora.type): on GPT-2's fused c_attn q,v slices one adapter per slice,
equal to PEFT's type on separate q / v projections; trained runs resume exactly and merge to their forward; on a
LLaMA-style model with separate projections the run's PEFT folder loads in PeftModel to the same logits; the load
report reads their tensors; the preflight counts their parameters; a sweep varies the type; the frozen-prefix
cache still works."""
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lora_core as lc
from lora_core.config import LoraConfig
from lora_core.errors import ConfigError
from lora_core.preflight import print_report
from lora_core.run import RunDir
from lora_core.sweep import expand
from lora_llm.adapter_io import export_peft, load_report, load_trained, save_adapter, save_merged
from lora_llm.cli import main as cli
from lora_llm.config import LLMTrainConfig, load_llm_config
from lora_llm.models import classifier_from_lm, gpt2_tokenizer, make_tiny_model, resolve_lora
from lora_llm.prefix_cache import cached_model
from lora_llm.preflight import preflight
from lora_llm.train import train_from_config

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "llm"
N = 16   # the tiny fused layer: c_attn 16 -> 3 x 16
TYPES = {"loha": dict(type="loha", r=2, alpha=3.0),
         "lokr": dict(type="lokr", r=2, alpha=3.0),
         "lokr_split": dict(type="lokr", r=1, alpha=2.0, decompose_both=True),
         "oft": dict(type="oft", oft_block_size=4),
         "oft_exact_coft": dict(type="oft", oft_block_size=8, use_cayley_neumann=False, coft=True, coft_eps=0.3)}


class Fused(nn.Module):
    """GPT-2's fused attention input: one HF Conv1D computing [q | k | v]."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(3 * N, N)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.c_attn.weight.copy_(torch.randn(N, 3 * N, generator=g) * 0.3)
            self.c_attn.bias.copy_(torch.randn(3 * N, generator=g) * 0.1)

    def forward(self, x):
        return self.c_attn(x)


class Split(nn.Module):
    """The same layer as three nn.Linear q, k, v: what PEFT can adapt (it has no fused slices)."""

    def __init__(self, fused: Fused):
        super().__init__()
        w, b = fused.c_attn.weight.detach().T, fused.c_attn.bias.detach()
        for i, name in enumerate("qkv"):
            lin = nn.Linear(N, N)
            with torch.no_grad():
                lin.weight.copy_(w[i * N:(i + 1) * N])
                lin.bias.copy_(b[i * N:(i + 1) * N])
            setattr(self, name, lin)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


def peft_config(cfg: LoraConfig, targets):
    if cfg.type == "oft":
        return peft.OFTConfig(r=0, oft_block_size=cfg.oft_block_size, coft=cfg.coft, eps=cfg.coft_eps,
                              use_cayley_neumann=cfg.use_cayley_neumann, target_modules=targets)
    if cfg.type == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, decompose_both=cfg.decompose_both,
                               decompose_factor=cfg.decompose_factor, target_modules=targets)
    return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, target_modules=targets)


def peft_param(layer, key: str):
    """PEFT's parameter of adapter "default" for a file key (`hada_w1_a`, `oft_R.weight`)."""
    head, *rest = key.split(".")
    obj = getattr(layer, head)["default"]
    for part in rest:
        obj = getattr(obj, part)
    return obj


def sliced_twins(fields: dict):
    """Ours (the type on c_attn's q and v slices) and PEFT's (the type on q and v), same random adapter weights;
    with the pairs of (our parameter, PEFT's parameter)."""
    ours = Fused()
    ref = Split(ours)
    cfg = LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}, **fields)
    lc.add_lora(ours, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(ref, peft_config(cfg, ["q", "v"]))
    v = ours.c_attn.lycoris["default"]
    assert set(v.named_tensors()) == {f"slice{i}.{k}" for i in (0, 2) for k in v.parts[0].named_tensors()}
    g, pairs = torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for i, part in zip((0, 2), v.parts):
            for key, p in part.named_tensors().items():
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if v.rotates else 0.4))
                theirs = peft_param(getattr(ref.base_model.model, "qkv"[i]), key)
                theirs.copy_(p)
                pairs.append((p, theirs))
    return ours, ref, pairs


def _run(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    y = model(x)
    (y ** 2).sum().backward()
    return y.detach(), x.grad.detach()


@pytest.mark.parametrize("name", list(TYPES))
def test_types_on_fused_slices_equal_peft_on_separate_projections(name):
    """Forward, input and adapter gradients equal PEFT's type on separate q and v (k untouched); merge equals the
    forward and PEFT's merged q / k / v; unmerge gives the base weight back."""
    ours, ref, pairs = sliced_twins(TYPES[name])
    x = torch.randn(3, 5, N, generator=torch.Generator().manual_seed(2))
    base_y = ours.c_attn.base_layer(x)
    y, gx = _run(ours, x)
    y_ref, gx_ref = _run(ref, x)
    assert (y - base_y)[..., :N].abs().max() > 1e-3 and (y - base_y)[..., 2 * N:].abs().max() > 1e-3
    torch.testing.assert_close(y[..., N:2 * N], base_y[..., N:2 * N], rtol=0, atol=0)   # k: no adapter
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    for p, theirs in pairs:
        torch.testing.assert_close(p.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    if not ours.c_attn.lycoris["default"].rotates:   # a user scale (PEFT has none for OFT)
        lc.set_scale(ours, "default", 0.5)
        for name in "qv":
            getattr(ref.base_model.model, name).set_scale("default", 0.5)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(ours(x), y, atol=1e-4)
        lc.set_scale(ours, "default", 1.0)
        for name in "qv":
            getattr(ref.base_model.model, name).set_scale("default", 1.0)
    w0 = ours.c_attn.base_layer.weight.detach().clone()
    with torch.no_grad():
        lc.merge_lora(ours)
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
        merged = ref.merge_and_unload()
        ref_w = torch.cat([merged.q.weight, merged.k.weight, merged.v.weight]).T
        torch.testing.assert_close(ours.c_attn.base_layer.weight, ref_w, rtol=1e-5, atol=1e-5)
        lc.unmerge_lora(ours)
        torch.testing.assert_close(ours.c_attn.base_layer.weight, w0, rtol=1e-5, atol=1e-5)


def test_sliced_adapter_saves_loads_and_refuses_a_peft_folder(tmp_path, tiny_lm):
    """Our file holds `slice<i>.` keys and reloads exactly; a PEFT export is refused in one line."""
    model, _ = tiny_lm()
    lc.add_lora(model, resolve_lora(LoraConfig(type="loha", r=2), model, classification=False))
    with torch.no_grad():
        for p in lc.lora_parameters(model):
            p.normal_(0, 0.3)
    save_adapter(tmp_path, model, {"task": "wikitext2", "num_labels": 0, "model": {}, "pretrained": "tiny"})
    assert not (tmp_path / "peft").exists()
    keys = set(lc.lora_state_dict(model))
    assert "transformer.h.0.attn.c_attn.slice0.hada_w1_a" in keys and "transformer.h.1.attn.c_attn.slice2.hada_w2_b" \
        in keys and not any(".slice1." in k for k in keys)
    with pytest.raises(ValueError, match=r"PEFT has no loha on slices of a fused layer") as e:
        export_peft(tmp_path / "peft", model)
    assert "(transformer.h.0.attn.c_attn, ...: lora.fused_slices" in str(e.value) and "\n" not in str(e.value)
    again, _ = tiny_lm()
    lc.load_lora(tmp_path / "adapter.safetensors", again)
    ids = torch.arange(1, 9)[None]
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------ through lora-llm train
def _cfg(run, *extra):
    return load_llm_config(None, [f'run_dir="{run}"', "train.log_every=1", "eval.prompts=[]", "eval.enabled=false",
                                  "train.batch_size=2", "train.learning_rate=1e-2", *extra])


SST2 = ['data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "data.max_length=16"]
WIKI = ['data.task="wikitext2"', f'data.data_dir="{FIX / "wikitext2"}"', 'data.train_split="valid"',
        "data.block_size=16", "eval.ppl_max_length=64", "eval.ppl_stride=32"]
RUN_TYPES = {"loha": ["lora.type=\"loha\"", "lora.r=2"], "lokr": ["lora.type=\"lokr\"", "lora.r=2"],
             "oft": ["lora.type=\"oft\"", "lora.oft_block_size=16"]}


@pytest.mark.slow
@pytest.mark.parametrize("type_", list(RUN_TYPES))
def test_gpt2_qv_slices_train_resume_exactly_and_merge_to_their_forward(tmp_path, type_):
    common = [*SST2, *RUN_TYPES[type_], "train.checkpoint_every=2"]
    train_from_config(_cfg(tmp_path / "full", *common, "train.max_steps=5"))
    train_from_config(_cfg(tmp_path / "part", *common, "train.max_steps=3"))
    torch.manual_seed(999)
    st = train_from_config(_cfg(tmp_path / "part", *common, "train.max_steps=5"), resume="latest")
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000003")
    a, b = load_trained(tmp_path / "full")[0], load_trained(tmp_path / "part")[0]
    sd_a, sd_b = lc.lora_state_dict(a), lc.lora_state_dict(b)
    assert set(sd_a) == set(sd_b) and any(".slice2." in k for k in sd_a)
    for k, v in sd_a.items():
        torch.testing.assert_close(v, sd_b[k], rtol=0, atol=0)
    assert not (tmp_path / "full" / "peft").exists()
    # lora-llm merge: the folded model's logits are the adapter's forward
    save_merged(tmp_path / "full", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 7]])
    with torch.no_grad():
        y = a(input_ids=ids).logits
        with lc.lora_disabled(a):
            assert not torch.allclose(a(input_ids=ids).logits, y, atol=1e-5)   # the training did something
        torch.testing.assert_close(merged(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA-style causal LM (separate q/k/v/o projections) with the GPT-2 tokenizer, as a folder."""
    tok = gpt2_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("llama") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("type_", list(RUN_TYPES))
def test_llama_run_peft_folder_loads_in_peft_to_the_same_logits(tmp_path, llama_dir, type_):
    run = tmp_path / "run"
    st = train_from_config(_cfg(run, *WIKI, *RUN_TYPES[type_], f'model.pretrained="{llama_dir}"',
                                "train.max_steps=3"))
    assert st["state"] == "done"
    ours, tok, _ = load_trained(run)
    config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == type_.upper()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), run / "peft").eval()
    ids = tok("The history of the city", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        y = ours(ids).logits
        with theirs.disable_adapter():
            assert not torch.allclose(theirs(input_ids=ids).logits, y, atol=1e-5)   # trained away from the base
        torch.testing.assert_close(theirs(input_ids=ids).logits, y, rtol=1e-5, atol=1e-5)
    assert load_report(run / "peft", AutoModelForCausalLM.from_pretrained(llama_dir)).fits


# ------------------------------------------------------------------------------ load report, preflight, sweep
@pytest.mark.parametrize("type_", ["loha", "lokr", "oft"])
def test_load_report_reads_lycoris_tensors(tmp_path, tiny_lm, type_):
    """Each adapted module is matched with its (in, out) read from the factors (no tensor taken for a saved
    head); a model of another width is reported module by module."""
    model, _ = tiny_lm()
    fields = {"oft": dict(oft_block_size=16)}.get(type_, dict(r=2))
    targets = ["q_proj", "v_proj", "o_proj"]
    lc.add_lora(model, resolve_lora(LoraConfig(type=type_, target_modules=targets, **fields), model, False))
    save_adapter(tmp_path, model, {"task": "wikitext2", "num_labels": 0, "model": {}, "pretrained": "tiny"})
    rep = load_report(tmp_path / "adapter.safetensors", tiny_lm()[0])
    assert rep.fits and sorted(rep.matched) == [f"transformer.h.{i}.attn.{m}" for i in (0, 1)
                                                 for m in ("c_attn", "c_proj")], rep.text()
    other, _ = tiny_lm(n_embd=32)
    bad = load_report(tmp_path / "adapter.safetensors", other)
    assert not bad.fits and not bad.unmatched and len(bad.mismatched) == 4, bad.text()
    assert "file (in 64" in bad.mismatched["transformer.h.0.attn.c_attn"]


def _llama(hidden: int, inter: int):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_load_report_of_peft_lycoris_folders(tmp_path):
    for type_, fields in (("loha", dict(r=2)), ("lokr", dict(r=1, decompose_both=True)), ("oft", dict(oft_block_size=8))):
        model = _llama(32, 64)
        lc.add_lora(model, LoraConfig(type=type_, target_modules=["q_proj", "v_proj", "down_proj"], **fields))
        export_peft(tmp_path / type_, model)
        rep = load_report(tmp_path / type_, _llama(32, 64))
        assert rep.fits and len(rep.matched) == 3, rep.text()
        wide = load_report(tmp_path / type_, _llama(64, 128))
        assert not wide.fits and len(wide.mismatched) == 3, wide.text()


def _per_slice(type_: str, n: int = 64) -> int:
    """Trainable parameters of one slice adapter on the tiny GPT-2's c_attn (in 64, slice out 64), by hand."""
    if type_ == "lora":
        return 2 * 4 * n                  # A (4, 64) + B (64, 4)
    if type_ == "loha":
        return 4 * 4 * n                  # w1_a, w2_a (64, 4); w1_b, w2_b (4, 64)
    if type_ == "lokr":
        return 8 * 8 + 8 * 8              # 64 = 8 x 8: w1 (8, 8) and w2 (8, 8) both full (r = 4 is not below 8 / 2)
    return 4 * (16 * 15 // 2)             # OFT: 4 blocks of 16, each 120 generator entries


@pytest.mark.parametrize("type_", ["lora", "loha", "lokr", "oft"])
def test_preflight_counts_each_types_parameters(tmp_path, type_):
    extra = ["lora.oft_block_size=16"] if type_ == "oft" else ["lora.r=4", "lora.alpha=8.0"]
    cfg = _cfg(tmp_path / "run", *WIKI, f'lora.type="{type_}"', *extra)
    rep = preflight(cfg=cfg, device="cpu", steps=0)
    assert rep.ok and rep.parameters["type"] == type_, print_report(rep)
    assert rep.parameters["trainable"] == 2 * 2 * _per_slice(type_)   # q and v of 2 layers
    assert f"parameters ({type_}): {rep.parameters['trainable']:,} trainable" in print_report(rep)
    assert ("rotation blocks of 16" if type_ == "oft" else "scale alpha/r = 8.0/4 = 2") in print_report(rep)
    assert rep.memory["parts"]["adapter"] == 4 * rep.parameters["trainable"]   # fp32 adapter weights


def test_sweep_over_adapter_types(tmp_path):
    cfg = tmp_path / "base.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "runs"}"\n')
    sw = expand(LLMTrainConfig, str(cfg), ["lora.type=lora,loha,lokr"], sweep_id="t")
    assert [r.params for r in sw.runs] == [{"lora.type": t} for t in ("lora", "loha", "lokr")]
    assert [load_llm_config(str(cfg), r.overrides).lora.type for r in sw.runs] == ["lora", "loha", "lokr"]


@pytest.mark.slow
def test_cli_sweep_trains_each_type(tmp_path, capsys):
    rc = cli(["sweep", "--config", str(ROOT / "configs" / "llm_sst2_tiny.toml"), "--vary", "lora.type=lora,loha,lokr",
               "--set", f'run_dir="{tmp_path}"', "--set", "train.max_steps=2", "--set", "train.batch_size=2",
               "--set", "train.lr_warmup_steps=0", "--set", "train.checkpoint_every=0",
               "--set", f'data.data_dir="{FIX / "sst2"}"', "--set", "data.max_eval_examples=4", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert rc == 0 and [(r["lora.type"], r["state"]) for r in rows] == [(t, "done") for t in ("lora", "loha", "lokr")]
    runs = next(tmp_path.glob("sweep_*"))
    sizes = [json.loads((runs / r["run"] / "status.json").read_text())["eval"]["trainable_params"] for r in rows]
    assert len(set(sizes)) == 3   # three different adapters


def test_mindspore_backend_refuses_the_lycoris_types_in_one_line():
    with pytest.raises(ConfigError, match=r"lora.type = 'loha': the MindSpore backend trains LoRA only") as e:
        load_llm_config(None, ['backend="mindspore"', 'lora.type="loha"'])
    assert "\n" not in str(e.value)


def test_prefix_cache_with_loha_on_the_top_layer(tmp_path):
    """lora.layers = "top:1" with LoHa on the q,v slices: the cached model's logits and adapter gradients equal
    the uncached model's."""
    lm, tok = make_tiny_model(n_layer=3)
    model = classifier_from_lm(lm, 2, tok.eos_token_id)
    lcfg = resolve_lora(LoraConfig(type="loha", r=2, layers="top:1"), model, classification=True)
    lc.add_lora(model, lcfg)
    assert {n.split(".")[2] for n, _ in lc.lora_layers(model)} == {"2"}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lc.lora_parameters(model):
            p.normal_(0, 0.2, generator=g)
    pad = tok.eos_token_id
    ids = torch.tensor([[5, 17, 300, 42, 9], [8, 1000, 7, pad, pad]])
    batch = {"input_ids": ids, "attention_mask": (torch.arange(5) < torch.tensor([[5], [3]])).long(),
             "labels": torch.tensor([0, 1])}
    model.train()
    ref = model(**batch)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    section = SimpleNamespace(prefix_cache="auto", prefix_cache_dir=str(tmp_path), prefix_cache_dtype="float32")
    cached = cached_model(model, lcfg, section, max_length=16)
    assert cached is not None and cached.s == 2
    cached.train()
    out = cached(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(grads) and any(n.endswith("c_attn.lycoris.default.parts.1.hada_w2_b") for n in got)
    for n, g in got.items():
        torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_with_loha_on_the_top_layer_uses_the_prefix_cache(tmp_path):
    """Through lora-llm train: LoHa with lora.layers = "top:1" fills the frozen-prefix cache and trains to the same
    losses as without it."""
    common = [*SST2, 'lora.type="loha"', "lora.r=2", 'lora.layers="top:1"', "train.max_steps=3",
              'model.prefix_cache_dtype="float32"']
    train_from_config(_cfg(tmp_path / "on", *common, f'model.prefix_cache_dir="{tmp_path / "cache"}"'))
    train_from_config(_cfg(tmp_path / "off", *common, 'model.prefix_cache="off"'))
    assert list((tmp_path / "cache").glob("*/shard_*.json"))
    on, off = ([r["loss"] for r in RunDir(tmp_path / run).read_metrics()] for run in ("on", "off"))
    assert len(on) == 3 and on == pytest.approx(off, rel=1e-4, abs=1e-5)
    a, b = lc.lora_state_dict(load_trained(tmp_path / "on")[0]), lc.lora_state_dict(load_trained(tmp_path / "off")[0])
    assert {k.split(".")[2] for k in a if "hada_" in k} == {"1"}   # only the top layer of the tiny GPT-2
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-4, atol=1e-5)


def test_kohya_writer_refuses_sliced_adapters_in_one_line():
    """lora.fused_slices now takes every type; the SD writers (kohya/LyCORIS names) cannot hold slices and say so."""
    from lora_sd.formats import lycoris_module   # lazy: lora_sd loads diffusers (seconds); only this test needs it
    net = Fused()
    lc.add_lora(net, LoraConfig(type="loha", target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}))
    with pytest.raises(ValueError, match=r"^c_attn: fused-slice adapters have no kohya/diffusers form$"):
        lycoris_module(net.c_attn, "default", "c_attn")
