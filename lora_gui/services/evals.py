"""The evaluation suite: queue `lora-llm eval-suite` built from the text-task form, read its table."""
from __future__ import annotations

import json
from pathlib import Path

from lora_core.configfile import from_dict, read_toml, save_config, to_dict

from .. import job_kinds, jobs, runview
from ..errors import UserError
from ..queue import JobQueue
from ..workspace import Workspace, check_name
from .job_configs import ConfigService

KIND = "eval-suite"
# the seed project's numbers the evaluation suite is compared against (accuracy; CoLA: majority class)
SEED_NUMBERS = {"cola": 0.693, "sst2": 0.808, "imdb": 0.834, "ag_news": 0.841}


class EvalService:
    def __init__(self, ws: Workspace, queue: JobQueue, configs_: ConfigService):
        self.ws, self.queue, self.configs = ws, queue, configs_

    @property
    def folder(self) -> Path:
        return self.ws.outputs / "eval"

    def start(self, base: dict, values: dict, tasks: list[str], steps: int, name: str) -> tuple[str, str]:
        """Queue `lora-llm eval-suite`: one adapter per task trained from the Text-tasks form, then evaluated."""
        if not tasks:
            raise UserError("choose at least one task")
        cfg = self.configs.build("llm-train", base, values)
        data = {"tasks": list(tasks), "base": to_dict(cfg),
                "overrides": {t: [f"train.max_steps={int(steps)}"] for t in tasks}}
        suite = from_dict(job_kinds.get(KIND).config_class(), data, "evaluation suite")
        out = self.ws.fresh_dir(self.folder, name)
        out.mkdir(parents=True)
        save_config(out / "config.toml", suite)
        job = self.queue.add(KIND, out, launcher="python", label=f"eval {out.name}")
        self.queue.tick()
        return out.name, f"evaluation {out.name} queued ({jobs.preview(job)})"

    def names(self) -> list[str]:
        found = [p for p in self.folder.iterdir() if (p / "config.toml").is_file()] if self.folder.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def view(self, name: str) -> tuple[runview.RunSnapshot, list[list]]:
        out = self.ws.resolve(Path("outputs") / "eval" / check_name(name, "evaluation name"), must_exist=True)
        rows = eval_rows(read_json(out / "results.json"))
        snap = runview.snapshot(out)
        tasks = read_toml(out / "config.toml").get("tasks") or []
        snap.step, snap.max_steps = len({r[0] for r in rows}), len(tasks)  # progress in tasks
        return snap, rows


def eval_rows(results: dict) -> list[list]:
    """results.json of `lora-llm eval-suite` -> table rows [task, metric, value, seed number, steps, examples]."""
    rows = []
    for r in results.get("rows") or []:
        value = r.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        seed = SEED_NUMBERS.get(r.get("task")) if r.get("metric") == "accuracy" else None
        rows.append([r.get("task", ""), r.get("metric", ""), round(float(value), 4), "" if seed is None else seed,
                     r.get("steps", ""), r.get("n", "")])
    return rows


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
