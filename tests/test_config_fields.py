"""Config fields declared once (type, Literal choices, range, help) drive validation at load, the CLIs'
--help-config, docs/config-reference.md and field_specs (the GUI's choices); every shipped config loads."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import tomli_w

from lora_core.config import LoraConfig
from lora_core.configdoc import TITLE, markdown
from lora_core.configfile import dumps, load_config
from lora_core.errors import ConfigError
from lora_core.fields import Checked, field_specs, option
from lora_core.settings import LRScheduler, TrainSettings
from lora_llm.config import TASKS, LLMTrainConfig, load_llm_config
from lora_llm.suite import SuiteConfig, load_suite
from lora_sd.config import CROSS_ATTN, SAMPLERS, SDTrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
JOBS = [SDTrainConfig, LLMTrainConfig, SuiteConfig]


def _nested(key: str, value) -> dict:
    data: dict = {}
    node = data
    parts = key.split(".")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = value
    return data


def _write(tmp_path, data: dict, name="job.toml") -> Path:
    p = tmp_path / name
    p.write_text(tomli_w.dumps(data), encoding="utf-8")
    return p


# ---------------------------------------------------------------- torch-free
def test_config_modules_import_without_torch():
    code = ("import sys, lora_core.configfile, lora_core.fields, lora_core.configdoc, lora_core.settings, "
            "lora_sd.config, lora_llm.config, lora_llm.suite\n"
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'mindspore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- every shipped config
def _loader(path: Path):
    if path.name.startswith("llm_suite_"):
        return load_suite
    if path.name.startswith("llm_"):
        return load_llm_config
    if path.name.startswith(("sd", "flux")):
        return load_train_config
    raise AssertionError(f"{path.name}: no config class for this file name (llm_suite_*, llm_*, sd*, flux*)")


SHIPPED = sorted(CONFIGS.glob("*.toml"))


def test_configs_folder_is_found():
    assert len(SHIPPED) >= 11 and {p.name for p in SHIPPED} >= {"sd_tiny_demo.toml", "llm_suite_tiny.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path, tmp_path):
    cfg = _loader(path)(path)
    if isinstance(cfg, SuiteConfig):   # each task's resolved job (base + its overrides) must load too
        for task in cfg.tasks:
            assert cfg.task_config(task, tmp_path).data.task == task
    # what the trainer writes as RUN/config.toml loads back to the same object
    again = tmp_path / "again.toml"
    again.write_text(dumps(cfg), encoding="utf-8")
    assert load_config(type(cfg), again) == cfg


# ---------------------------------------------------------------- the declaration drives validation
def _bad_values(spec):
    """Values that break the declared choices or range (with the item that the message must quote)."""
    if spec.choices:
        if spec.type.startswith("list"):
            return [(["nope"], "nope")]
        if spec.type.startswith("table"):
            return [({"nope": [] if "lists" in spec.type else "x"}, "nope")]
        return [("nope", "nope")]
    integer = spec.type.startswith("integer")
    out = []
    if spec.min is not None:
        v = spec.min if spec.min_open else spec.min - (1 if integer else 0.5)
        out.append((v, v))
    if spec.max is not None:
        v = spec.max if spec.max_open else spec.max + (1 if integer else 0.5)
        out.append((v, v))
    if spec.multiple_of:
        v = (spec.min or 0) + spec.multiple_of + 1
        out.append((v, v))
    return out


CASES = [(cls, spec, bad, item) for cls in JOBS for spec in field_specs(cls) for bad, item in _bad_values(spec)]


def test_every_declared_rule_has_a_case():
    keys = {(c.__name__, s.path) for c, s, _, _ in CASES}
    assert {("SDTrainConfig", "sample.scheduler"), ("SDTrainConfig", "train.lr_scheduler"),
            ("LLMTrainConfig", "eval.top_p"), ("SuiteConfig", "base.eval.batch_size"),
            ("SuiteConfig", "tasks"), ("SuiteConfig", "overrides")} <= keys
    assert len(CASES) > 100


@pytest.mark.parametrize("cls,spec,bad,item", CASES, ids=[f"{c.__name__}:{s.path}={b!r}" for c, s, b, _ in CASES])
def test_a_value_outside_its_declaration_is_refused_naming_file_key_value_and_rule(tmp_path, cls, spec, bad, item):
    p = _write(tmp_path, _nested(spec.path, bad))
    with pytest.raises(ConfigError) as e:
        load_config(cls, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {spec.path} ") and repr(item) in msg and "\n" not in msg
    if spec.choices:
        assert all(repr(c) in msg for c in spec.choices)
    else:
        assert f"must be {spec.allowed}; got {bad!r}" in msg
    assert e.value.key == spec.path
    # the declared default passes the same check
    if spec.type != "table" and spec.default is not None:
        assert load_config(cls, _write(tmp_path, _nested(spec.path, spec.default), "ok.toml")) is not None


@pytest.mark.parametrize("key,value,expected", [
    ("train.batch_size", 0, "train.batch_size must be a positive integer; got 0"),
    ("train.gradient_accumulation_steps", 0, "train.gradient_accumulation_steps must be a positive integer; got 0"),
    ("train.max_steps", -3, "train.max_steps must be a positive integer; got -3"),
    ("train.learning_rate", 0, "train.learning_rate must be a positive number; got 0.0"),
    ("train.lr_scheduler", "cosine_annealing", "train.lr_scheduler must be one of 'constant', 'constant_with_warmup', "
     "'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'inverse_sqrt'; got 'cosine_annealing'"),
    ("train.optimizer", "sgd", "train.optimizer must be one of 'adamw', 'adamw8bit', 'prodigy', 'adafactor'; "
         "got 'sgd'"),
    ("train.mixed_precision", "fp8", "train.mixed_precision must be one of 'no', 'fp16', 'bf16'; got 'fp8'"),
    ("lora.r", 0, "lora.r must be a positive integer; got 0"),
    ("lora.dropout", 1.0, "lora.dropout must be a number in [0, 1); got 1.0"),
    ("sample.scheduler", "dpm2", "sample.scheduler must be one of 'ddim', 'ddpm', 'pndm', 'euler', 'euler_a', 'dpm++', "
     "'unipc', 'lms', 'flow_euler', 'auto'; got 'dpm2'"),
    ("sample.steps", -1, "sample.steps must be a positive integer; got -1"),
    ("sample.guidance_scale", -2.0, "sample.guidance_scale must be a number >= 0; got -2.0"),
    ("sample.width", 100, "sample.width must be an integer >= 0, a multiple of 8; got 100"),
    ("data.resolution", 0, "data.resolution must be an integer >= 8, a multiple of 8; got 0"),
    ("output.save_dtype", "fp8", "output.save_dtype must be one of 'fp32', 'fp16', 'bf16'; got 'fp8'"),
    ("flow.single_layers", "top:0", "flow.single_layers must be a list of layer indices or 'top:K' (K >= 1); got 'top:0'"),
    ("flow.single_layers", [-1, 2], "flow.single_layers has negative layer indices [-1]"),
])
def test_sd_config_messages(tmp_path, key, value, expected):
    p = _write(tmp_path, {"data": {"path": "x"}, **_nested(key, value)} if not key.startswith("data.") else
               _nested(key, value))
    with pytest.raises(ConfigError) as e:
        load_train_config(p)
    assert str(e.value) == f"{p}: {expected}"


@pytest.mark.parametrize("key,value,expected", [
    ("eval.batch_size", 0, "eval.batch_size must be a positive integer; got 0"),
    ("eval.top_p", 1.5, "eval.top_p must be a number in (0, 1]; got 1.5"),
    ("eval.top_p", 0, "eval.top_p must be a number in (0, 1]; got 0.0"),
    ("eval.temperature", -1, "eval.temperature must be a positive number; got -1.0"),
    ("eval.top_k", -1, "eval.top_k must be an integer >= 0; got -1"),
    ("data.task", "mnli", "data.task must be one of 'wikitext2', 'sst2', 'cola', 'imdb', 'ag_news'; got 'mnli'"),
    ("backend", "jax", "backend must be one of 'torch', 'mindspore'; got 'jax'"),
    ("mindspore.mode", "eager", "mindspore.mode must be one of 'graph', 'pynative'; got 'eager'"),
    ("eval.ppl_stride", 2048, "eval.ppl_stride must be in 1..ppl_max_length (1024), got 2048"),  # a cross-field rule
])
def test_llm_config_messages(tmp_path, key, value, expected):
    p = _write(tmp_path, _nested(key, value))
    with pytest.raises(ConfigError) as e:
        load_llm_config(p)
    assert str(e.value) == f"{p}: {expected}"


def test_a_rule_spanning_fields_names_the_file_and_the_overrides(tmp_path):
    p = _write(tmp_path, {"eval": {"ppl_stride": 512}})
    assert load_llm_config(p).eval.ppl_stride == 512
    with pytest.raises(ConfigError) as e:
        load_llm_config(p, ["eval.ppl_max_length=256"])
    assert str(e.value) == f"{p} with --set: eval.ppl_stride must be in 1..ppl_max_length (256), got 512"


def test_single_field_rules_beyond_ranges_name_the_real_table(tmp_path):
    p = _write(tmp_path, {"data": {"path": "x"}, "text_encoder_lora": {"target_modules": "(("}})
    with pytest.raises(ConfigError, match=rf"^{p}: text_encoder_lora\.target_modules is not a valid regex: missing \)"):
        load_train_config(p)
    p = _write(tmp_path, {"base": {"lora": {"fused_slices": {"c_attn": [False, False, False]}}}})
    with pytest.raises(ConfigError, match=r"base\.lora\.fused_slices must enable at least one slice of 'c_attn'$"):
        load_suite(p)
    with pytest.raises(ValueError, match=r"^lora\.target_modules is empty"):
        LoraConfig(target_modules=[])


def test_suite_messages_name_the_nested_key(tmp_path):
    p = _write(tmp_path, {"tasks": ["sst2", "mnli"]})
    with pytest.raises(ConfigError, match=r"tasks has unknown value\(s\) 'mnli'; allowed: 'wikitext2'"):
        load_suite(p)
    p = _write(tmp_path, {"base": {"train": {"batch_size": 0}}})
    with pytest.raises(ConfigError, match=r"job\.toml: base\.train\.batch_size must be a positive integer; got 0$"):
        load_suite(p)
    p = _write(tmp_path, {"overrides": {"sst2": ["train.batch_size=0"]}})
    with pytest.raises(ConfigError, match=r"^suite task sst2: train\.batch_size must be a positive integer"):
        load_suite(p).task_config("sst2", tmp_path)


def test_overrides_are_named_as_the_culprit(tmp_path):
    p = _write(tmp_path, {"train": {"batch_size": 2}})
    with pytest.raises(ConfigError) as e:
        load_llm_config(p, ["train.batch_size=0"])
    assert str(e.value) == "--set: train.batch_size must be a positive integer; got 0"
    with pytest.raises(ConfigError, match=r"^--set: train: unknown key\(s\) \['batch_sise'\]"):
        load_llm_config(p, ["train.batch_sise=3"])
    p.write_text("[train]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=rf"^{p}: train\.batch_size"):      # the file, though --set touched another key
        load_llm_config(p, ["train.max_steps=3"])
    assert load_llm_config(p, ["train.batch_size=3"]).train.batch_size == 3   # an override may fix the file


def test_types_and_non_finite_numbers(tmp_path):
    for text, match in [("[train]\nlearning_rate = nan\n", "train.learning_rate: expected a finite number, got nan"),
                        ("[sample]\nguidance_scale = inf\n", "sample.guidance_scale: expected a finite number, got inf"),
                        ("[train]\nbatch_size = 2.5\n", "train.batch_size: expected an integer, got 2.5"),
                        ("[train]\nbatch_size = true\n", "train.batch_size: expected an integer, got True"),
                        ("[data]\nbuckets = 1\n", "data.buckets: expected true or false, got 1"),
                        ("[sample]\nscheduler = 3\n", "sample.scheduler must be one of 'ddim'")]:
        p = tmp_path / "t.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=f"^{p}: " + match.replace("(", r"\(").replace(".", r"\.")):
            load_config(SDTrainConfig, p)


def test_unreadable_config_files_give_one_line(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('[data]\npath = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_llm_config(p)
    assert str(e.value) == f"{p}: not UTF-8 text (line 2, byte 18); save the config as UTF-8"
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_llm_config(tmp_path)
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_train_config(tmp_path / "bad.toml")


def test_configs_built_in_code_are_checked_the_same_way():
    with pytest.raises(ValueError, match=r"^train\.batch_size must be a positive integer; got 0$"):
        TrainSettings(batch_size=0)
    with pytest.raises(ValueError, match=r"^train\.lr_scheduler must be one of"):
        TrainSettings(lr_scheduler="cosine_annealing")
    with pytest.raises(ValueError, match=r"^lora\.init must be one of 'kaiming', 'gaussian'; got 'xavier'$"):
        LoraConfig(init="xavier")
    with pytest.raises(ValueError, match=r"^lora\.r must be a positive integer; got 2\.5$"):
        LoraConfig(r=2.5)
    with pytest.raises(ValueError, match=r"^tasks has unknown value\(s\) 'mnli'"):
        SuiteConfig(tasks=["mnli"])
    assert LoraConfig(fused_slices={"c_attn": [1, 0, 1]}).fused_slices == {"c_attn": [1, 0, 1]}


def test_a_loaded_value_is_checked_once_and_a_value_set_in_code_once():
    seen = []

    @dataclasses.dataclass
    class Job(Checked, section="job"):
        rank: int = option(8, "a rank", ge=1, check=lambda v: seen.append(v))
        inner: LoraConfig = option(help="an adapter", factory=LoraConfig)

    load_config(Job, overrides=["rank=3"])
    assert seen == [3]
    Job(rank=5)
    assert seen == [3, 5]
    with pytest.raises(ConfigError, match=r"--set: inner\.r must be a positive integer; got 0"):
        load_config(Job, overrides=["inner.r=0"])   # the nested table's key, checked by the loader
    with pytest.raises(ValueError, match=r"^job\.rank must be a positive integer; got 0$"):
        Job(rank=0)


# ---------------------------------------------------------------- the declared names are the real ones
def test_lr_scheduler_names_are_transformers_schedulers_that_need_no_extra_arguments():
    import torch
    from transformers import get_scheduler
    for name in typing.get_args(LRScheduler):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10)
        lrs = []
        for _ in range(10):
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        assert all(math.isfinite(x) and x >= 0 for x in lrs), name
        assert lrs[0] < 1.0 or name == "constant", name   # the warm-up is honoured


def test_sampler_names_are_diffusers_schedulers_and_generate_uses_them():
    import diffusers
    from lora_sd import generate
    assert (*SAMPLERS, "auto") == field_specs(SDTrainConfig)[[s.path for s in field_specs(SDTrainConfig)].index(
        "sample.scheduler")].choices
    for cls_name in SAMPLERS.values():
        assert issubclass(getattr(diffusers, cls_name), diffusers.SchedulerMixin)

    class Pipe:   # an SD 1.x pipeline, as lora_sd.models.arch_of reads one
        scheduler = diffusers.DDIMScheduler()
        unet = types.SimpleNamespace(config=types.SimpleNamespace())
    pipe = Pipe()
    generate.set_scheduler(pipe, "euler_a")
    assert type(pipe.scheduler).__name__ == SAMPLERS["euler_a"]
    with pytest.raises(ValueError, match="unknown scheduler 'dpm2'"):
        generate.set_scheduler(pipe, "dpm2")


# ---------------------------------------------------------------- field_specs, docs, --help-config
def test_field_specs_list_the_jobs_own_defaults_and_choices():
    sd = {s.path: s for s in field_specs(SDTrainConfig)}
    llm = {s.path: s for s in field_specs(LLMTrainConfig)}
    assert sd["lora.target_modules"].default == CROSS_ATTN and llm["lora.target_modules"].default == ["q_proj", "v_proj"]
    assert sd["train.lr_scheduler"].choices == typing.get_args(LRScheduler) and sd["train.lr_scheduler"].default == "constant"
    assert sd["train.lr_scheduler"].help and all(s.help for s in sd.values())
    assert llm["data.task"].choices == TASKS and llm["data.task"].type == "string"
    s = llm["eval.top_p"]
    assert (s.min, s.max, s.min_open, s.max_open, s.type, s.allowed) == (0, 1, True, False, "number", "a number in (0, 1]")
    assert sd["text_encoder_lora"].type == "table (optional)" and "text_encoder_lora.r" not in sd
    suite = {s.path for s in field_specs(SuiteConfig, stop_at=(LLMTrainConfig,))}
    assert "base" in suite and "base.train.batch_size" not in suite


def test_generated_reference_is_up_to_date():
    doc = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    header = doc.splitlines()[2]
    refs = header.split("python -m lora_core.configdoc ")[1].split("`")[0].split()
    assert refs == ["lora_sd.config:SDTrainConfig", "lora_llm.config:LLMTrainConfig", "lora_llm.suite:SuiteConfig"]
    assert doc.startswith(TITLE) and doc == markdown(refs), \
        "docs/config-reference.md is stale: python -m lora_core.configdoc " + " ".join(refs) + " > docs/config-reference.md"
    assert "| `lr_scheduler` | string | `\"constant\"` | one of 'constant', " in doc


@pytest.mark.parametrize("cli,argv,expect", [
    ("lora_sd.cli", ["train", "--help-config"], ["sample.scheduler = \"auto\"  (string; one of 'ddim', 'ddpm'",
                                                  "train.batch_size = 1  (integer; a positive integer)"]),
    ("lora_llm.cli", ["train", "--help-config"], ["eval.top_p = 1.0  (number; a number in (0, 1])",
                                                   "data.task = \"sst2\"  (string; one of 'wikitext2'"]),
    ("lora_llm.cli", ["eval-suite", "--help-config"], ["base.train.lr_scheduler = \"constant\"",
                                                        "tasks = [\"wikitext2\""]),
])
def test_help_config_prints_the_declaration(capsys, cli, argv, expect):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(cli).main(argv)   # --config is required, yet --help-config needs none
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(x in out for x in expect), out


def test_cli_refuses_a_bad_sampler_before_training(tmp_path, capsys):
    from lora_sd.cli import main
    p = _write(tmp_path, {"run_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path)},
                          "sample": {"scheduler": "dpm2"}})
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lora-sd train: error: {p}: sample.scheduler must be one of 'ddim'") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_arg_type_reads_a_command_line_value_as_its_field_declares(capsys):
    import argparse
    from lora_core.configdoc import arg_type
    from lora_llm.config import EvalSection
    from lora_sd.config import SampleSettings
    p = argparse.ArgumentParser(prog="gen")
    p.add_argument("--steps", type=arg_type(SampleSettings, "steps"))
    p.add_argument("--scheduler", type=arg_type(SampleSettings, "scheduler"))
    p.add_argument("--top-p", type=arg_type(EvalSection, "top_p"))
    assert vars(p.parse_args(["--steps", "3", "--scheduler", "euler", "--top-p", "0.9"])) == \
        {"steps": 3, "scheduler": "euler", "top_p": 0.9}
    for argv, msg in [(["--steps", "-1"], "argument --steps: must be a positive integer; got -1"),
                      (["--steps", "x"], "argument --steps: expected integer, got 'x'"),
                      (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]; got 1.5"),
                      (["--top-p", "nan"], "argument --top-p: must be a number in (0, 1]; got nan"),
                      (["--scheduler", "dpm2"], "argument --scheduler: must be one of 'ddim'")]:
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert msg in capsys.readouterr().err
