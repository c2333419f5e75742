"""Perplexity protocol, generation and the tiny-model builders."""
import math

import pytest
import torch

from lora_llm.evaluate import generate, perplexity
from lora_llm.models import make_tiny_model


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_model(n_positions=64)
    return model, tok


def _full_nll(model, ids):
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()


def test_perplexity_single_window_equals_full_pass(tiny):
    model, _ = tiny
    ids = list(range(100, 140))
    r = perplexity(model, ids, max_length=64, stride=32)
    assert r["tokens"] == len(ids) - 1 and r["windows"] == 1
    assert r["perplexity"] == pytest.approx(math.exp(_full_nll(model, ids) / (len(ids) - 1)), rel=1e-5)


def test_perplexity_sliding_window_counts_each_token_once(tiny):
    model, _ = tiny
    ids = [int(i) for i in torch.randint(0, 1000, (150,), generator=torch.Generator().manual_seed(0))]
    r = perplexity(model, ids, max_length=40, stride=16)
    assert r["tokens"] == len(ids) - 1
    # the overlapping windows against Hugging Face's documented loop (labels -100 on the context,
    # the model's own shifted loss): same tokens, same mean NLL
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), 16):
            end = min(begin + 40, len(ids))
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[:, :-(end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            nll_sum += model(input_ids=x, labels=labels).loss.item() * n
            n_tokens, prev_end = n_tokens + n, end
            if end == len(ids):
                break
    assert n_tokens == r["tokens"] and r["nll"] == pytest.approx(nll_sum / n_tokens, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-5)
    # stride == max_length: disjoint windows, each scored from its own start
    d = perplexity(model, ids, max_length=50, stride=50)
    nll = sum(_full_nll(model, ids[b:b + 50]) for b in range(0, 150, 50))
    # (the first token of each disjoint window has no context: 150 - 3 tokens are scored)
    assert d["tokens"] == 147 and d["nll"] == pytest.approx(nll / 147, rel=1e-5)
    # capped at the model's context (n_positions=64)
    assert perplexity(model, ids, max_length=1024, stride=512)["max_length"] == 64


def test_generate_greedy_matches_argmax_and_sampling_is_seeded(tiny):
    model, tok = tiny
    prompt = "The history of"
    ids = tok(prompt)["input_ids"]
    x = torch.tensor([ids])
    for _ in range(4):   # greedy by hand
        x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(model, tok, [prompt], max_new_tokens=4)[0] == tok.decode(x[0, len(ids):])
    state = torch.get_rng_state()
    a = generate(model, tok, [prompt], 8, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    b = generate(model, tok, [prompt], 8, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    assert a == b and torch.equal(state, torch.get_rng_state())   # global RNG untouched (exact resume)


def test_tiny_model_folder_loads_like_any_local_model(tmp_path):
    from lora_llm.config import ModelSection
    from lora_llm.models import load_model, load_tokenizer
    model, tok = make_tiny_model(tmp_path)
    ms = ModelSection(pretrained=str(tmp_path))
    again, tok2 = load_model(ms), load_tokenizer(ms)
    ids = torch.tensor([tok("hello world")["input_ids"]])
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    clf = load_model(ms, num_labels=4, pad_token_id=tok2.pad_token_id)
    assert clf.score.out_features == 4 and clf.config.pad_token_id == tok.eos_token_id


def test_fallback_tokenizer_without_shared_files():
    """A fresh machine without ../shared still gets a byte-level BPE tokenizer for tiny models."""
    from lora_llm.models import _train_small_bpe
    tok = _train_small_bpe()
    text = "The tokenizer loads examples, pads batches and counts tokens."
    ids = tok(text)["input_ids"]
    assert 1 < len(ids) < len(text) and tok.decode(ids) == text and tok.eos_token_id is not None
