"""Sweeps (lora_core.sweep): a 2 x 2 sweep expands to 4 runs with typed values and their own folders, survives
a failing combination, and its summary table holds the right parameters; `lora-llm sweep` end to end."""
import json
from pathlib import Path

import pytest

from lora_core.errors import ConfigError
from lora_core.run import RunDir
from lora_core.sweep import SWEEP_FILE, expand, markdown_table, parse_vary, run_sweep, summary
from lora_llm.config import LLMTrainConfig, load_llm_config
from lora_sd.config import SDTrainConfig

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "llm"


def test_values_read_as_their_fields_declare():
    axes = parse_vary(SDTrainConfig, ["lora.r=4,8", "train.learning_rate=1e-4,5e-4", "data.buckets=true,false",
                                      "sample.scheduler=ddim,euler"])
    assert axes == {"lora.r": [4, 8], "train.learning_rate": [1e-4, 5e-4], "data.buckets": [True, False],
                    "sample.scheduler": ["ddim", "euler"]}
    assert type(axes["lora.r"][0]) is int and type(axes["train.learning_rate"][0]) is float
    for bad, words in (("lora.r=4,x", "expected integer"), ("lora.r=0,4", "positive integer"),
                       ("lora.rank=4", "unknown key 'lora.rank'"), ("sample.scheduler=ddim,dpm2", "one of"),
                       ("lora.r=4,4", "distinct"), ("lora.r", "section.key=v1,v2")):
        with pytest.raises(ConfigError, match=words):
            parse_vary(SDTrainConfig, [bad])


def test_two_by_two_expands_to_four_runs(tmp_path):
    cfg = tmp_path / "base.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "runs"}"\n[data]\npath = "x"\n')
    sw = expand(SDTrainConfig, str(cfg), ["lora.r=4,8", "train.learning_rate=1e-4,5e-4"], sweep_id="s1")
    assert sw.root == tmp_path / "runs" / "sweep_s1"
    assert [r.params for r in sw.runs] == [{"lora.r": 4, "train.learning_rate": 1e-4},
                                           {"lora.r": 4, "train.learning_rate": 5e-4},
                                           {"lora.r": 8, "train.learning_rate": 1e-4},
                                           {"lora.r": 8, "train.learning_rate": 5e-4}]
    assert len({r.run_dir for r in sw.runs}) == 4 and sw.runs[1].name == "1_r4_learning_rate0.0005"
    from lora_sd.config import load_train_config
    loaded = load_train_config(str(cfg), sw.runs[3].overrides)
    assert loaded.lora.r == 8 and loaded.train.learning_rate == 5e-4 and loaded.run_dir == sw.runs[3].run_dir


def _fake_train(cfg):
    """Stands in for the train path: a run folder with metrics, eval.json and a final status."""
    run = RunDir(cfg.run_dir).create()
    run.write_status("running", step=0)
    if cfg.lora.r == 8 and cfg.train.learning_rate > 1e-4:
        raise RuntimeError("boom")
    run.append_metrics({"step": 1, "loss": 1.0 / cfg.lora.r})
    (run.path / "eval.json").write_text(json.dumps({"accuracy": cfg.lora.r / 10}))
    return run.write_status("done", step=1)


def test_sweep_survives_failures_and_tabulates(tmp_path):
    cfg = tmp_path / "base.toml"
    cfg.write_text(f'run_dir = "{tmp_path}"\n[eval]\nppl_max_length = 1024\n')
    # eval.ppl_stride = 2048 > ppl_max_length: that combination's config is refused when it loads
    sw = expand(LLMTrainConfig, str(cfg), ["lora.r=4,8", "train.learning_rate=1e-4,5e-4", "eval.ppl_stride=256,2048"],
                sweep_id="s2")
    assert len(sw.runs) == 8
    rec = run_sweep(sw, load_llm_config, _fake_train)
    states = {n: r["state"] for n, r in rec.items()}
    assert list(states.values()) == ["done", "failed", "done", "failed", "done", "failed", "failed", "failed"]
    rows = summary(sw.root)
    assert [(r["lora.r"], r["train.learning_rate"], r["eval.ppl_stride"]) for r in rows] == \
        [(4, 1e-4, 256), (4, 1e-4, 2048), (4, 5e-4, 256), (4, 5e-4, 2048), (8, 1e-4, 256), (8, 1e-4, 2048),
         (8, 5e-4, 256), (8, 5e-4, 2048)]
    assert rows[0]["final_loss"] == 0.25 and rows[0]["accuracy"] == 0.4 and rows[4]["accuracy"] == 0.8
    assert "ppl_stride" in rows[1]["error"] and rows[6]["error"] == "RuntimeError: boom"
    assert RunDir(sw.runs[6].run_dir).read_status()["state"] == "failed"
    status = RunDir(sw.runs[0].run_dir).read_status()
    assert status["sweep"] == "s2" and status["sweep_params"]["lora.r"] == 4
    assert json.loads((sw.root / SWEEP_FILE).read_text())["id"] == "s2"
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| run | state | lora.r | train.learning_rate | eval.ppl_stride |")


def test_cli_llm_sweep_end_to_end(tmp_path, capsys):
    from lora_llm.cli import main
    rc = main(["sweep", "--config", str(ROOT / "configs" / "llm_sst2_tiny.toml"), "--vary", "lora.r=2,4",
               "--vary", "train.learning_rate=1e-3,-1", "--set", f'run_dir="{tmp_path}"'])
    assert rc == 2 and "train.learning_rate" in capsys.readouterr().err   # a bad value stops before any run
    # eval.ppl_stride = 2048 > eval.ppl_max_length (1024): those two combinations fail, the others train
    rc = main(["sweep", "--config", str(ROOT / "configs" / "llm_sst2_tiny.toml"), "--vary", "lora.r=2,4",
               "--vary", "eval.ppl_stride=512,2048", "--set", f'run_dir="{tmp_path}"', "--set", "train.max_steps=2",
               "--set", "train.batch_size=2", "--set", "train.lr_warmup_steps=0", "--set", "train.checkpoint_every=0",
               "--set", f'data.data_dir="{FIX / "sst2"}"', "--set", "data.max_eval_examples=4", "--json"])
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert rc == 1 and [(r["lora.r"], r["eval.ppl_stride"], r["state"]) for r in rows] == \
        [(2, 512, "done"), (2, 2048, "failed"), (4, 512, "done"), (4, 2048, "failed")]
    assert all(isinstance(rows[i]["final_loss"], float) and "accuracy" in rows[i] for i in (0, 2))
    assert "ppl_stride" in rows[1]["error"]
    sweep_dir = next(tmp_path.glob("sweep_*"))
    assert (sweep_dir / rows[0]["run"] / "adapter.safetensors").is_file()


def test_a_sweep_over_adapter_types(tmp_path):
    """`--vary lora.type=lora,loha,lokr`: one run per type, each a valid SD config (LoHa / LoKr without the
    diffusers copy their files cannot have)."""
    cfg = tmp_path / "base.toml"
    cfg.write_text(f'run_dir = "{tmp_path / "runs"}"\n[data]\npath = "x"\n[output]\nsave_diffusers = false\n')
    sw = expand(SDTrainConfig, str(cfg), ["lora.type=lora,loha,lokr"], sweep_id="t")
    assert [r.params for r in sw.runs] == [{"lora.type": t} for t in ("lora", "loha", "lokr")]
    from lora_sd.config import load_train_config
    assert [load_train_config(str(cfg), r.overrides).lora.type for r in sw.runs] == ["lora", "loha", "lokr"]
    with pytest.raises(ConfigError, match="one of"):
        parse_vary(SDTrainConfig, ["lora.type=lora,lycoris"])
