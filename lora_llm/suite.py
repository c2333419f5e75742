"""`lora-llm eval-suite`: train (or load) and evaluate one adapter per task, then write one table.

Suite file (TOML):
    tasks = ["wikitext2", "sst2", "cola", "imdb", "ag_news"]
    [base]                       # an LLMTrainConfig shared by every task ([base.model], [base.lora], ...)
    [overrides]                  # per task: a list of `section.key=value` overrides
    sst2 = ["train.max_steps=300", "data.max_length=64"]
    [adapters]                   # per task: an existing run folder / adapter.safetensors to evaluate
    imdb = "runs/imdb"           #   instead of training one
Each task runs in OUT/<task>/ (a normal run folder); the table goes to OUT/results.md + results.json.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lora_core.configfile import apply_overrides, from_dict, load_config, to_dict
from lora_core.fields import Checked, option
from lora_core.files import atomic_write_json, atomic_write_text

from .adapter_formats import ADAPTER_FILE, check_trained_task
from .config import TASKS, LLMTrainConfig, Task
from .errors import SuiteStopped
from .metrics import BASELINE_LABEL, BASELINE_LABEL_LM

log = logging.getLogger("lora.llm")
RESULT_FILES = ("results.json", "results.md")   # in OUT, rewritten after each task


@dataclass
class SuiteConfig(Checked):
    """The `lora-llm eval-suite` job."""
    tasks: list[Task] = option(list(TASKS), "the tasks to run, in order")
    base: LLMTrainConfig = option(help="the job shared by every task (an LLMTrainConfig: [base.model], "
                                  "[base.lora], ...)", factory=LLMTrainConfig)
    overrides: dict[Task, list[str]] = option({}, "per task: a list of `section.key=value` overrides of base")
    adapters: dict[Task, str] = option({}, "per task: an existing run folder or adapter file to evaluate "
                                       "instead of training one")
    note: str = option("", "printed under the table (budgets, subsets, hardware)")

    def __post_init__(self):
        super().__post_init__()
        idle = [t for t in self.adapters if t not in self.tasks]   # ([overrides] may cover tasks left out of a run)
        if idle:
            raise ValueError(f"adapters.{idle[0]}: task {idle[0]!r} is not in tasks {list(self.tasks)}, so this "
                             "adapter would not be scored; add the task to tasks or remove the entry")

    def task_config(self, task: str, out: Path) -> LLMTrainConfig:
        data = to_dict(self.base)
        data["data"] = {**data.get("data", {}), "task": task}
        data["run_dir"] = str(out / task)
        apply_overrides(data, self.overrides.get(task, []))
        return from_dict(LLMTrainConfig, data, f"suite task {task}")


def check_adapters(suite: SuiteConfig) -> list[str]:
    """Each [adapters] entry holds an adapter trained on its own task (read from its header, torch-free):
    an SST-2 adapter is never scored as CoLA's. Returns a note for each adapter that does not say its task."""
    notes = []
    for task, path in suite.adapters.items():
        file = Path(path) / ADAPTER_FILE if Path(path).is_dir() else Path(path)
        notes.append(check_trained_task(file, task, f"adapters.{task} = {path}",
                                        f"give a {task} adapter, or remove the entry to train one"))
    return [n for n in notes if n]


def load_suite(path: Optional[str | Path], overrides: Sequence[str] = ()) -> SuiteConfig:
    return load_config(SuiteConfig, path, overrides)


def result_rows(task: str, res: dict, cfg: LLMTrainConfig, wall: float, source: str) -> list[dict]:
    """The table rows of one task's evaluation result (the baseline rows first, when scored)."""
    common = {"task": task, "split": res.get("split"), "trainable_params": res.get("trainable_params"),
              "steps": res.get("steps"), "wall_s": round(wall, 1), "n": res.get("n") or res.get("tokens"),
              "subset": bool(res.get("subset")),
              "source": source}
    if cfg.data.is_lm:
        rows = [{**common, "metric": "perplexity", "value": res["perplexity"]}]
        if "baseline_perplexity" in res:
            rows.insert(0, {**common, "metric": f"perplexity ({BASELINE_LABEL_LM})", "value": res["baseline_perplexity"],
                            "steps": 0, "trainable_params": 0})
        return rows
    rows = [{**common, "metric": "accuracy", "value": res["accuracy"]},
            {**common, "metric": "macro_f1", "value": res["macro_f1"]}]
    if task == "cola":
        rows.append({**common, "metric": "mcc", "value": res["mcc"]})
    if "baseline_accuracy" in res:   # the base model with its original, untrained head, and the majority rate
        base = {**common, "steps": 0, "trainable_params": 0}
        rows.insert(0, {**base, "metric": f"accuracy ({BASELINE_LABEL})", "value": res["baseline_accuracy"]})
        if "majority_accuracy" in res:
            rows.insert(1, {**base, "metric": "majority-class rate", "value": res["majority_accuracy"]})
    return rows


def markdown_table(rows: list[dict], note: str = "") -> str:
    head = "| task | split | metric | value | trainable params | steps | wall time (s) | examples/tokens |\n" \
           "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        v = r["value"]
        val = f"{v:.2f}" if r["metric"].startswith("perplexity") else f"{v:.4f}"
        if v != v:  # NaN: a failed task
            val = "-"
        n = f"{r['n']}" + (" (subset)" if r.get("subset") else "") if r.get("n") is not None else ""
        lines.append(f"| {r['task']} | {r['split']} | {r['metric']} | {val} | {r.get('trainable_params') or 0:,} | "
                     f"{r.get('steps') or 0} | {r['wall_s']} | {n} |")
    return head + "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def run_suite(suite: SuiteConfig, out: str | Path, resume: Optional[str] = None) -> list[dict]:
    """Train/evaluate every task, writing OUT/results.{md,json} after each task (partial tables survive;
    a failed task gets a FAILED row and the others still run)."""
    for note in check_adapters(suite):
        log.warning("suite: %s", note)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed = []
    for task in suite.tasks:
        cfg = suite.task_config(task, out)
        t0 = time.time()
        try:
            res, source = _run_task(suite, task, cfg, resume)
        except SuiteStopped:
            log.warning("suite: stopped during %s; `--resume latest` continues it", task)
            raise
        except Exception as e:  # one broken task must not lose the others' results
            log.exception("suite: task %s failed", task)
            failed.append(task)
            rows.append({"task": task, "split": "", "metric": f"FAILED: {type(e).__name__}: {e}"[:200], "value": float("nan"),
                         "trainable_params": 0, "steps": 0, "wall_s": round(time.time() - t0, 1), "n": None,
                         "source": cfg.run_dir})
        else:
            rows.extend(result_rows(task, res, cfg, time.time() - t0, source))
        atomic_write_json(out / RESULT_FILES[0], {"rows": rows, "note": suite.note})
        atomic_write_text(out / RESULT_FILES[1], markdown_table(rows, suite.note))
        log.info("suite: %s finished in %.0f s", task, time.time() - t0)
    if failed:
        raise RuntimeError(f"eval-suite: task(s) {failed} failed (see the log and {out / RESULT_FILES[1]})")
    return rows


def _run_task(suite: SuiteConfig, task: str, cfg: LLMTrainConfig, resume: Optional[str]) -> tuple[dict, str]:
    """(evaluation result, where the adapter is): load suite.adapters[task], or train one."""
    from .adapter_io import load_trained   # lazy: torch; the GUI imports SuiteConfig from this torch-free module
    from .evaluate import evaluate_job     # lazy: as above
    from .train import train_from_config   # lazy: as above
    if task in suite.adapters:
        model, tok, info = load_trained(suite.adapters[task], model_section=cfg.model)
        res = evaluate_job(cfg, model, tok, baseline=cfg.eval.baseline)
        res.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                   steps=info.get("steps"))
        return res, suite.adapters[task]
    status = train_from_config(cfg, resume="auto" if resume else None)   # tasks not started yet start fresh
    if status.get("state") == "stopped":
        raise SuiteStopped(f"task {task}: training was stopped at step {status.get('step')}")
    if status.get("state") != "done":
        raise RuntimeError(f"task {task}: training ended in state {status.get('state')!r}: {status.get('error')}")
    return json.loads((Path(cfg.run_dir) / "eval.json").read_text()), cfg.run_dir
