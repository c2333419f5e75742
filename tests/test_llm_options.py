"""Options of the text-task recipes: head + tail truncation, balanced class weights, and `lora-llm eval`
on any file in the task's upstream format (reporting how many examples it scored)."""
import json
from pathlib import Path

import pytest
import torch

from lora_core.errors import ConfigError
from lora_llm import data as D
from lora_llm.cli import main as cli
from lora_llm.config import load_llm_config
from lora_llm.models import gpt2_tokenizer, loss_function
from lora_llm.train import train_from_config

FIX = Path(__file__).parent / "fixtures" / "llm"


def test_head_tail_truncation_keeps_first_quarter_and_the_end():
    tok = gpt2_tokenizer()
    text = " ".join(f"w{i}" for i in range(200))
    full = tok(text)["input_ids"]
    assert len(full) > 64
    (ids,), _ = D.tokenize_examples([D.Example(text, 1)], tok, 64, "head_tail")
    assert ids == full[:16] + full[-48:]
    (head,), _ = D.tokenize_examples([D.Example(text, 1)], tok, 64)
    assert head == full[:64]
    (short,), _ = D.tokenize_examples([D.Example("w1 w2", 0)], tok, 64, "head_tail")
    assert short == tok("w1 w2")["input_ids"]
    assert D.head_tail(list(range(10)), 4) == [0, 7, 8, 9]
    with pytest.raises(ConfigError, match="data.truncation"):
        load_llm_config(None, ['data.truncation="middle"'])


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def test_balanced_class_weights_follow_the_training_labels():
    cfg = load_llm_config(None, ['data.task="cola"', 'data.class_weights="balanced"'])
    items = [{"input_ids": [1], "label": y} for y in (1, 1, 1, 0)]
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.1]])
    batch = {"input_ids": torch.zeros(3, 1, dtype=torch.long), "attention_mask": torch.ones(3, 1),
             "labels": torch.tensor([0, 1, 1])}
    loss = loss_function(cfg, items)(_Fixed(logits), batch)
    w = torch.tensor([4 / (2 * 1), 4 / (2 * 3)])             # sklearn's "balanced": n / (classes * n_c)
    ref = torch.nn.functional.cross_entropy(logits, batch["labels"], weight=w)
    assert torch.allclose(loss, ref)
    plain = load_llm_config(None, ['data.task="cola"'])
    assert loss_function(plain, items)(type("M", (), {"__call__": lambda s, **b: type("O", (), {"loss": 7})()})(),
                                       batch) == 7


def test_cola_training_with_class_weights_and_head_tail_runs(tmp_path):
    cfg = load_llm_config(None, [f'run_dir="{tmp_path}"', 'data.task="cola"', f'data.data_dir="{FIX / "cola"}"',
                                 'data.class_weights="balanced"', 'data.truncation="head_tail"', "data.max_length=8",
                                 "train.max_steps=2", "train.batch_size=2", "eval.prompts=[]"])
    status = train_from_config(cfg)
    assert status["state"] == "done" and status["eval"]["n_examples"] == 3


def test_eval_scores_any_file_in_the_upstream_format(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_llm_config(None, [f'run_dir="{run}"', 'data.task="sst2"', f'data.data_dir="{FIX / "sst2"}"',
                                 "train.max_steps=2", "train.batch_size=2", "eval.enabled=false", "eval.prompts=[]"])
    train_from_config(cfg)
    other = tmp_path / "mine.tsv"
    other.write_text("sentence\tlabel\n" + "".join(f"review number {i} .\t{i % 2}\n" for i in range(7)))
    assert cli(["eval", "--adapter", str(run), "--set", f'data.eval_file="{other}"', "--out", str(tmp_path / "e.json"),
                "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_examples"] == 7 and json.loads((tmp_path / "e.json").read_text())["n_examples"] == 7
    assert cli(["eval", "--adapter", str(run), "--set", f'data.eval_file="{other}"']) == 0
    assert any(line.split() == ["n_examples:", "7"] for line in capsys.readouterr().out.splitlines())
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine .\t1\nbroken\t7\n")
    assert cli(["eval", "--adapter", str(run), "--set", f'data.eval_file="{bad}"']) == 2
    assert "bad.tsv:3" in capsys.readouterr().err
