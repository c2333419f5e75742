"""Frozen-prefix caching (lora_llm.prefix_cache) and lora.layers (PEFT's layers_to_transform):
logits and LoRA gradients with the cache equal those without it, for right-padded batches of tiny GPT-2
and tiny LLaMA classifiers; training with the cache resumes exactly, reuses the cache on a second run and
recomputes when the max length or the frozen weights change."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_core import LoraConfig, add_lora, lora_layers
from lora_llm.config import load_llm_config
from lora_llm.models import classifier_from_lm, make_tiny_model, resolve_lora
from lora_llm.prefix_cache import cached_model, fingerprint
from lora_llm.train import train_from_config

FIX = Path(__file__).parent / "fixtures" / "llm"


def _tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      num_labels=3, pad_token_id=0, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(cfg).eval()


def _tiny_gpt2(seed: int = 0):
    lm, tok = make_tiny_model(seed=seed, n_layer=4)
    return classifier_from_lm(lm, 3, tok.eos_token_id)


def _with_lora(model, layers):
    lcfg = resolve_lora(LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], layers=layers), model,
                        classification=True)
    add_lora(model, lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-zero B: the adapter changes the output
        for _, layer in lora_layers(model):
            for b in layer.lora_B.values():
                b.weight.normal_(0, 0.1, generator=g)
    return lcfg


def _batch(vocab: int, pad: int):
    g = torch.Generator().manual_seed(2)
    lengths = [7, 3, 11, 1, 9]
    ids = torch.full((len(lengths), max(lengths)), pad)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab - 1, (n,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1, 0])}


def _section(tmp, dtype="float32"):
    return SimpleNamespace(prefix_cache="auto", prefix_cache_dir=str(tmp), prefix_cache_dtype=dtype)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 3e-3), ("bfloat16", 3e-2)])
def test_cached_logits_and_lora_gradients_equal_uncached(tmp_path, arch, dtype, tol):
    model = _tiny_gpt2() if arch == "gpt2" else _tiny_llama(300)
    lcfg = _with_lora(model, "top:2")
    assert sorted({n.split(".")[2] for n, _ in lora_layers(model)}) == ["2", "3"]
    vocab = min(model.config.vocab_size, 300)
    batch = _batch(vocab, model.config.pad_token_id)
    model.train()
    ref = model(**batch)
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    cached = cached_model(model, lcfg, _section(tmp_path, dtype), max_length=64)
    assert cached is not None and cached.s == 2
    # same parameters under the same names: checkpoints and adapter files are unchanged by the wrapper
    assert [n for n, _ in cached.named_parameters()] == [n for n, _ in model.named_parameters()]
    cached.train()
    out = cached(**batch)
    out.loss.backward()
    scale = ref.logits.abs().max().item()
    assert torch.allclose(out.logits, ref.logits, atol=tol * max(scale, 1), rtol=0), (out.logits - ref.logits).abs().max()
    assert abs(out.loss.item() - ref.loss.item()) <= tol * max(1, ref.loss.item())
    grads = _grads(model)
    assert set(grads) == set(ref_grads) and any("lora_A" in n for n in grads) and any("score" in n for n in grads)
    for n, g in grads.items():
        gs = ref_grads[n].abs().max().item()
        assert torch.allclose(g, ref_grads[n], atol=max(tol * 10, 1e-6) * max(gs, 1e-3), rtol=0), (n, (g - ref_grads[n]).abs().max())


def test_layers_match_peft_layers_to_transform():
    import peft
    model = _tiny_gpt2()
    ours = {n for n, _ in model.named_modules() if LoraConfig(target_modules=["c_attn"], layers=[1, 3]).matches(n)}
    theirs = peft.get_peft_model(_tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], layers_to_transform=[1, 3],
                                                              fan_in_fan_out=True))
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")
               and isinstance(m.lora_A, torch.nn.ModuleDict)}
    assert ours == wrapped == {"transformer.h.1.attn.c_attn", "transformer.h.3.attn.c_attn"}
    assert resolve_lora(LoraConfig(layers="top:3"), model, True).layers == [1, 2, 3]
    with pytest.raises(ValueError, match="only 4 layers"):
        resolve_lora(LoraConfig(layers="top:5"), model, True)
    with pytest.raises(ValueError, match="lora.layers"):
        LoraConfig(layers="bottom:2")


def test_no_cache_when_a_lower_layer_is_trained_or_all_layers_adapted(tmp_path):
    model = _tiny_gpt2()
    lcfg = _with_lora(model, [])
    assert cached_model(model, lcfg, _section(tmp_path), 64) is None
    model = _tiny_gpt2()
    lcfg = _with_lora(model, "top:2")
    model.transformer.wte.weight.requires_grad_(True)
    assert cached_model(model, lcfg, _section(tmp_path), 64) is None


def test_fingerprint_follows_frozen_weights_only(tmp_path):
    model = _tiny_gpt2()
    lcfg = _with_lora(model, "top:2")
    before = fingerprint(model, 2, "float16")
    folder = cached_model(model, lcfg, _section(tmp_path, "float16"), 64).store.folder
    with torch.no_grad():
        model.transformer.h[3].mlp.c_fc.weight.add_(1.0)      # above the prefix: same cache
    assert fingerprint(model, 2, "float16") == before
    assert cached_model(model, lcfg, _section(tmp_path, "float16"), 64).store.folder == folder
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.add_(1.0)      # inside the prefix: another cache
    assert fingerprint(model, 2, "float16") != before
    assert cached_model(model, lcfg, _section(tmp_path, "float16"), 64).store.folder != folder
    assert fingerprint(model, 1, "float16") != fingerprint(model, 2, "float16")


# ------------------------------------------------------------------------------ through train_from_config
def _cfg(run, cache, *extra):
    return load_llm_config(None, [f'run_dir="{run}"', 'data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"',
                                  "train.batch_size=2", "lora.dropout=0.1", "train.learning_rate=1e-2",
                                  "train.log_every=1", "eval.prompts=[]", 'lora.layers="top:1"',
                                  f'model.prefix_cache_dir="{cache}"', 'model.prefix_cache_dtype="float32"', *extra])


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/shard_*.json"))


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "adapter.safetensors"))


def test_training_with_cache_resumes_exactly_and_reuses_the_cache(tmp_path):
    cache = tmp_path / "cache"
    common = ["eval.enabled=false", "train.checkpoint_every=2"]
    train_from_config(_cfg(tmp_path / "full", cache, *common, "train.max_steps=7"))
    first = _shards(cache)
    assert len(first) == 1 and len({p.parent for p in first}) == 1
    n_train = len(json.loads(first[0].read_text())["entries"])
    assert n_train > 0
    # only layer 1 of the tiny GPT-2 and the head are trained
    assert {k.split(".")[2] for k in _adapter(tmp_path / "full") if "lora_" in k} == {"1"}

    train_from_config(_cfg(tmp_path / "part", cache, *common, "train.max_steps=3"))
    torch.manual_seed(999)
    train_from_config(_cfg(tmp_path / "part", cache, *common, "train.max_steps=7"), resume="latest")
    assert _shards(cache) == first                                   # second and third runs computed nothing
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    train_from_config(_cfg(tmp_path / "short", cache, *common, "train.max_steps=1", "data.max_length=16"))
    assert len(_shards(cache)) == 2                                  # another max length: recomputed


def test_cached_training_equals_uncached_training(tmp_path):
    common = ["train.max_steps=4", "lora.dropout=0.0", "eval.batch_size=4"]
    s_on = train_from_config(_cfg(tmp_path / "on", tmp_path / "cache", *common))
    s_off = train_from_config(_cfg(tmp_path / "off", tmp_path / "cache2", *common, 'model.prefix_cache="off"'))
    assert not (tmp_path / "cache2").exists()
    from lora_core.training import RunDir
    on = [r["loss"] for r in RunDir(tmp_path / "on").read_metrics()]
    off = [r["loss"] for r in RunDir(tmp_path / "off").read_metrics()]
    assert on == pytest.approx(off, rel=1e-4, abs=1e-5)
    assert s_on["eval"]["n_examples"] == s_off["eval"]["n_examples"] > 0
    assert s_on["eval"]["accuracy"] == s_off["eval"]["accuracy"]
    # the evaluation examples were cached too (a second shard)
    assert len(_shards(tmp_path / "cache")) == 2
