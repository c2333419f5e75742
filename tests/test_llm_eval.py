"""Perplexity protocol, generation and the tiny-model builders."""
import json
import math
from pathlib import Path

import pytest
import torch

from lora_llm.evaluate import generate, perplexity
from lora_llm.models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    model, tok = tiny_lm(n_positions=64)
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
    from lora_llm.models import train_small_bpe
    tok = train_small_bpe()
    text = "The tokenizer loads examples, pads batches and counts tokens."
    ids = tok(text)["input_ids"]
    assert 1 < len(ids) < len(text) and tok.decode(ids) == text and tok.eos_token_id is not None


def _unbalanced_sst2(folder, n_dev=40):
    """A dev set with 30 of 40 labels 1: majority-class rate 0.75."""
    folder.mkdir(parents=True)
    words = "the a film story plot actor scene music time long short new old very quite".split()
    rows = [f"{' '.join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5))}\t{int(i % 4 != 0)}"
            for i in range(n_dev)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:8]) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def test_baseline_is_the_base_model_with_its_untrained_head(tmp_path):
    """--baseline scores the base model with the ORIGINAL head (not the adapter's trained copy without
    LoRA), labelled so, with the majority-class rate beside it; the suite row says the same."""
    from lora_core.model import lora_layers
    from lora_llm import data as D
    from lora_llm.config import load_llm_config
    from lora_llm.evaluate import evaluate_classifier
    from lora_llm.models import load_model, load_tokenizer
    from lora_llm.evaluate import evaluate_job
    from lora_llm.metrics import BASELINE_LABEL
    from lora_llm.suite import result_rows
    from lora_llm.train import build_model
    cfg = load_llm_config(None, [f'run_dir="{tmp_path / "run"}"', 'data.task="sst2"',
                                 f'data.data_dir="{_unbalanced_sst2(tmp_path / "data")}"', "eval.prompts=[]"])
    tok = load_tokenizer(cfg.model)
    model, _ = build_model(cfg, tok)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # a "trained" adapter: non-zero LoRA and a head copy far from the original
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (5.0 if "modules_to_save" in n else 0.05))
    res = evaluate_job(cfg, model.eval(), tok, progress=False, baseline=True)
    # independent reference: a freshly loaded base classifier (its own, untrained head), no LoRA at all
    ex = D.load_examples("sst2", "dev", cfg.data.data_dir)
    seqs, labels = D.tokenize_examples(ex, tok, cfg.data.max_length)
    ref = evaluate_classifier(load_model(cfg.model, 2, tok.pad_token_id), seqs, labels, 2, tok.pad_token_id)
    # what the old, wrong baseline measured: LoRA off but the trained head left in place
    for _, layer in lora_layers(model):
        layer.disabled = True
    wrong = evaluate_classifier(model, seqs, labels, 2, tok.pad_token_id)
    for _, layer in lora_layers(model):
        layer.disabled = False
    assert (wrong["accuracy"], wrong["mcc"]) != (ref["accuracy"], ref["mcc"])   # the test can tell them apart
    b = res["baseline"]
    assert b["label"] == BASELINE_LABEL == "base model + untrained head"
    assert (b["accuracy"], b["macro_f1"], b["mcc"]) == (ref["accuracy"], ref["macro_f1"], ref["mcc"])
    assert res["baseline_accuracy"] == ref["accuracy"]
    assert b["majority_accuracy"] == res["majority_accuracy"] == 0.75
    rows = result_rows("sst2", res, cfg, 1.0, "x")
    assert [r["metric"] for r in rows[:3]] == ["accuracy (base model + untrained head)", "majority-class rate",
                                               "accuracy"]
    assert rows[0]["value"] == ref["accuracy"] and rows[1]["value"] == 0.75


def test_cli_eval_baseline_prints_the_label(tmp_path, capsys):
    from lora_llm.cli import main as cli
    data = _unbalanced_sst2(tmp_path / "data")
    run = tmp_path / "run"
    assert cli(["train", "--config", str(Path(__file__).parent.parent / "configs" / "llm_sst2_tiny.toml"),
                "--run-dir", str(run), "--set", f'data.data_dir="{data}"', "--set", "train.max_steps=1",
                "--set", "eval.enabled=false"]) == 0
    capsys.readouterr()
    assert cli(["eval", "--adapter", str(run), "--baseline", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["baseline"]["label"] == "base model + untrained head" and res["baseline"]["majority_accuracy"] == 0.75
    assert cli(["eval", "--adapter", str(run), "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "baseline: base model + untrained head: accuracy" in out and "majority-class rate 0.75" in out
