"""lora-llm training on tiny GPT-2 models: LM loss goes down, a classifier learns, exact resume,
the run folder holds the adapter + PEFT export, eval-suite writes its table, the CLI works end to end."""
import json
import random
from pathlib import Path

import pytest
import torch

from lora_core.model import lora_state_dict
from lora_core.training import RunDir
from lora_llm.cli import main as cli
from lora_llm.config import load_llm_config
from lora_llm.adapter_io import load_trained
from lora_llm.train import train_from_config

FIX = Path(__file__).parent / "fixtures" / "llm"
CONFIGS = Path(__file__).parent.parent / "configs"


def _cfg(tmp, *overrides):
    return load_llm_config(None, [f'run_dir="{tmp}"', "train.log_every=1", "eval.prompts=[]", *overrides])


def test_lm_finetuning_lowers_loss_and_perplexity(tmp_path):
    cfg = _cfg(tmp_path, 'data.task="wikitext2"', f'data.data_dir="{FIX / "wikitext2"}"', 'data.train_split="valid"',
               'data.eval_split="valid"', "data.block_size=32", "train.max_steps=30", "train.batch_size=2",
               "train.learning_rate=1e-2", "eval.baseline=true", "eval.ppl_max_length=64", "eval.ppl_stride=32",
               'eval.prompts=["The game"]', "eval.max_new_tokens=5")
    status = train_from_config(cfg)
    assert status["state"] == "done"
    losses = [r["loss"] for r in RunDir(tmp_path).read_metrics()]
    # a random tiny GPT-2 starts near ln(50257) = 10.8 and its small tied embeddings move slowly
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["perplexity"] < 0.95 * ev["baseline_perplexity"]
    assert ev["generations"][0]["prompt"] == "The game" and (tmp_path / "samples" / "step_000030.txt").is_file()
    assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()


def _synthetic_sst2(folder: Path, n_train=256, n_dev=64):
    """Label 1 iff the sentence contains 'excellent' (at a random position) instead of 'terrible'."""
    rng = random.Random(0)
    words = "the a film story plot actor scene music time long short new old very quite".split()

    def rows(n):
        out = []
        for _ in range(n):
            y = rng.randint(0, 1)
            w = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            w.insert(rng.randint(0, len(w)), "excellent" if y else "terrible")
            out.append(f"{' '.join(w)}\t{y}")
        return out
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_train)) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_dev)) + "\n")
    return folder


def test_classifier_learns_synthetic_task_and_reloads(tmp_path):
    data = _synthetic_sst2(tmp_path / "data")
    run = tmp_path / "run"
    cfg = _cfg(run, 'data.task="sst2"', f'data.data_dir="{data}"', "train.max_steps=60", "train.batch_size=16",
               "train.learning_rate=5e-3", "lora.r=4", "lora.alpha=8.0")
    status = train_from_config(cfg)
    assert status["eval"]["accuracy"] >= 0.9, status["eval"]
    # the adapter (LoRA + head) reloads into a fresh model and gives the same metric
    model, tok, info = load_trained(run)
    assert info["task"] == "sst2" and info["num_labels"] == 2
    from lora_llm.evaluate import evaluate_job
    assert evaluate_job(cfg, model, tok, progress=False)["accuracy"] == status["eval"]["accuracy"]


def test_resume_equals_uninterrupted(tmp_path):
    common = ['data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"', "train.batch_size=2", "lora.dropout=0.1",
              "train.learning_rate=1e-2", "eval.enabled=false", "train.checkpoint_every=2"]
    full = _cfg(tmp_path / "full", *common, "train.max_steps=7")
    train_from_config(full)
    part = _cfg(tmp_path / "part", *common, "train.max_steps=3")
    train_from_config(part)
    torch.manual_seed(999)   # resume must restore the RNG (dropout) and the data position
    resumed = _cfg(tmp_path / "part", *common, "train.max_steps=7")
    st = train_from_config(resumed, resume="latest")
    assert st["state"] == "done" and st["resumed_from"].endswith("step_00000003")
    a, b = load_trained(tmp_path / "full")[0], load_trained(tmp_path / "part")[0]
    for k, v in lora_state_dict(a).items():
        torch.testing.assert_close(v, lora_state_dict(b)[k], rtol=0, atol=0)


def test_bf16_mixed_precision_keeps_lora_fp32(tmp_path, monkeypatch):
    import math
    import lora_llm.train as T
    calls = []   # (output dtype, autocast dtype) of the frozen c_attn in training forwards
    build = T.build_model

    def build_with_probe(*a, **k):
        model, lcfg = build(*a, **k)
        model.transformer.h[0].attn.c_attn.base_layer.register_forward_hook(lambda m, i, o: calls.append(
            (o.dtype, torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
            if torch.is_grad_enabled() else None)
        return model, lcfg
    monkeypatch.setattr(T, "build_model", build_with_probe)
    cfg = _cfg(tmp_path, 'data.task="cola"', f'data.data_dir="{FIX / "cola"}"', "train.max_steps=2",
               "train.batch_size=2", 'train.mixed_precision="bf16"', "eval.enabled=false")
    assert train_from_config(cfg)["state"] == "done"
    from lora_core.io import read_safetensors
    saved, _ = read_safetensors(tmp_path / "adapter.safetensors")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    assert all(r["loss"] == r["loss"] for r in RunDir(tmp_path).read_metrics())
    assert all(math.isfinite(r["loss"]) for r in RunDir(tmp_path).read_metrics())
    assert len(calls) == 2 and set(calls) == {(torch.bfloat16, torch.bfloat16)}   # bf16 autocast really ran


@pytest.mark.slow
def test_eval_suite_tiny_writes_table(tmp_path):
    overrides = []
    for t in ("sst2", "cola", "ag_news", "imdb"):
        overrides.append(f'overrides.{t}=["data.data_dir=\'{FIX / t}\'", "data.train_split=\'train\'"]')
    overrides.append(f'overrides.wikitext2=["data.data_dir=\'{FIX / "wikitext2"}\'", "data.train_split=\'valid\'", '
                     f'"data.block_size=16", "eval.ppl_max_length=32", "eval.ppl_stride=16", "eval.baseline=true"]')
    rc = cli(["eval-suite", "--config", str(CONFIGS / "llm_suite_tiny.toml"), "--out", str(tmp_path),
              "--set", "base.train.max_steps=2", *sum((["--set", o] for o in overrides), [])])
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["task"] for r in rows} == {"wikitext2", "sst2", "cola", "imdb", "ag_news"}
    assert {"task", "split", "metric", "value", "trainable_params", "steps", "wall_s"} <= set(rows[0])
    assert any(r["task"] == "cola" and r["metric"] == "mcc" for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("| task | split | metric | value |") and "| ag_news | dev | accuracy |" in md


@pytest.mark.slow
def test_cli_tiny_model_train_inspect_generate(tmp_path, capsys):
    assert cli(["tiny-model", str(tmp_path / "tiny")]) == 0
    assert cli(["train", "--config", str(CONFIGS / "llm_wikitext2_tiny.toml"), "--run-dir", str(tmp_path / "run"),
                "--set", f'model.pretrained="{tmp_path / "tiny"}"', "--set", f'data.data_dir="{FIX / "wikitext2"}"',
                "--set", 'data.eval_split="valid"', "--set", "train.max_steps=2", "--set", "data.block_size=32",
                "--set", "eval.max_new_tokens=3"]) == 0
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "run" / "adapter.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "lora_core" and info["info"]["task"] == "wikitext2" and info["targets"] == 2
    assert cli(["eval", "--adapter", str(tmp_path / "run"), "--json", "--set", "eval.max_eval_tokens=100",
                "--set", "eval.prompts=[]"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["task"] == "wikitext2" and ev["split"] == "valid" and ev["tokens"] == 99
    assert cli(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "3",
                "--sample", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello")
    # merge: a plain transformers folder with the same logits as base + adapter
    from transformers import AutoModelForCausalLM
    assert cli(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    lora_model, tok, _ = load_trained(str(tmp_path / "run"), "cpu")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = tok("The history of", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora_model(ids).logits, rtol=1e-4, atol=1e-5)
    # a bad override names the key
    assert cli(["train", "--config", str(CONFIGS / "llm_sst2_tiny.toml"), "--set", "train.max_steps=0"]) == 2
    assert "max_steps" in capsys.readouterr().err
