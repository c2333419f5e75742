"""Sweeps: a base config x a grid of values, one run per combination, and their summary table. Torch-free.

    sweep = expand(SDTrainConfig, "base.toml", ["lora.r=4,8,16", "train.learning_rate=1e-4,5e-4"])
    run_sweep(sweep, load=load_train_config, train=run_training)      # in order; a failed run does not stop it
    print(markdown_table(summary(sweep.root)))

Each value is read as its config field declares it (type, choices, range), so a typo fails before any run
starts. Every combination gets its own run folder `<run_dir>/sweep_<id>/<NN>_<key><value>...`; the sweep's
`sweep.json` (in that folder) lists the runs and their parameters, and each run's `status.json` carries the
sweep id and its parameters (written through the run folder's one status writer, RunDir.write_status).
A GUI queue entry can hold the same `Sweep` (its `overrides` per run) and queue one run per combination.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import json
import logging
import math
import re
import secrets
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .configdoc import HelpConfig, arg_type
from .configfile import read_toml
from .errors import ConfigError
from .files import atomic_write_json
from .run import LIVE_STATES, RunDir, StopFlag, mark_queued, settle

log = logging.getLogger("lora")
SWEEP_FILE = "sweep.json"
METRIC_KEYS = ("accuracy", "f1", "macro_f1", "mcc", "perplexity", "baseline_accuracy", "baseline_perplexity")


@dataclass
class SweepRun:
    name: str                   # folder name inside the sweep folder
    params: dict[str, Any]      # dotted key -> value of this combination
    run_dir: str

    @property
    def overrides(self) -> list[str]:
        """The combination as `key=value` overrides (TOML values), plus its run folder."""
        return [f"{k}={toml_value(v)}" for k, v in self.params.items()] + [f"run_dir={toml_value(self.run_dir)}"]


@dataclass
class Sweep:
    id: str
    root: Path                  # the sweep folder
    config: Optional[str]       # the base config file
    base_overrides: list[str]
    axes: dict[str, list]       # dotted key -> values
    runs: list[SweepRun] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "config": self.config, "base_overrides": self.base_overrides, "axes": self.axes,
                "axis_order": list(self.axes),
                "runs": [dataclasses.asdict(r) for r in self.runs]}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def _owner(cls: type, key: str) -> tuple[type, str]:
    """(the dataclass that declares the last part of dotted `key`, that part); a wrong key raises ConfigError."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(f"--vary {key}: unknown key {'.'.join(parts[:i + 1])!r}; known here: {sorted(names)}")
        if i == len(parts) - 1:
            return cls, part
        tp = typing.get_type_hints(cls)[part]
        tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--vary {key}: {'.'.join(parts[:i + 1])!r} is not a table")
        cls = tp
    raise ConfigError(f"--vary {key}: empty key")


def parse_values(cls: type, key: str, text: str) -> list:
    """'4,8,16' read as the field `key` of config class `cls` declares it (type, choices, range)."""
    owner, name = _owner(cls, key)
    tp = typing.get_type_hints(owner)[name]
    out = []
    for raw in (t.strip() for t in text.split(",")):
        if tp is bool:
            if raw.lower() not in ("true", "false"):
                raise ConfigError(f"--vary {key}: expected true or false, got {raw!r}")
            out.append(raw.lower() == "true")
            continue
        try:
            out.append(arg_type(owner, name)(raw))
        except Exception as e:  # argparse.ArgumentTypeError: one line saying what is wrong
            raise ConfigError(f"--vary {key}: {e}") from None
    if not out or len(set(map(repr, out))) != len(out):
        raise ConfigError(f"--vary {key}={text}: give distinct values separated by commas")
    return out


def parse_vary(cls: type, items: Sequence[str]) -> dict[str, list]:
    """['lora.r=4,8', 'train.learning_rate=1e-4,5e-4'] -> {"lora.r": [4, 8], "train.learning_rate": [...]}."""
    axes: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise ConfigError(f"--vary {item!r} must look like section.key=v1,v2,...")
        if key.strip() in axes:
            raise ConfigError(f"--vary {key.strip()} is given twice")
        axes[key.strip()] = parse_values(cls, key.strip(), text)
    if not axes:
        raise ConfigError("a sweep needs at least one --vary section.key=v1,v2,...")
    return axes


def _slug(key: str, value: Any) -> str:
    text = f"{key.rpartition('.')[2]}{value:g}" if isinstance(value, float) else f"{key.rpartition('.')[2]}{value}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")[:40]


def new_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def expand(cls: type, config: Optional[str], vary: Sequence[str], overrides: Sequence[str] = (),
           sweep_id: Optional[str] = None) -> Sweep:
    """The sweep of base config file `config` (with `overrides`) over the `--vary` axes: one SweepRun per
    combination, in order (the last axis varies fastest)."""
    axes = parse_vary(cls, vary)
    data = read_toml(config) if config else {}
    base_dir = next((o.split("=", 1)[1].strip().strip('"') for o in reversed(list(overrides))
                     if o.split("=", 1)[0].strip() == "run_dir"), None)
    base_dir = base_dir or data.get("run_dir") or getattr(cls(), "run_dir", "runs")
    sid = sweep_id or new_id()
    root = Path(base_dir) / f"sweep_{sid}"
    sweep = Sweep(sid, root, str(config) if config else None, list(overrides), axes)
    width = len(str(math.prod(len(v) for v in axes.values()) - 1))
    for i, combo in enumerate(itertools.product(*axes.values())):
        params = dict(zip(axes, combo))
        name = f"{i:0{width}d}_" + "_".join(_slug(k, v) for k, v in params.items())
        sweep.runs.append(SweepRun(name, params, str(root / name)))
    return sweep


def write_sweep(sweep: Sweep, records: Optional[dict] = None) -> None:
    atomic_write_json(sweep.root / SWEEP_FILE, {**sweep.to_dict(), "records": records or {}})


class SweepStop(StopFlag):
    """A stop signal between two runs of a sweep (a run's own signal handler stops the run itself): no
    further run starts."""

    def _handle(self, signum, frame):
        if not self.stop:
            log.warning("signal %s received: the sweep starts no further run", signum)
        self.stop = True


def run_sweep(sweep: Sweep, load: Callable[[Optional[str], list[str]], Any], train: Callable[[Any], dict],
              on_run: Optional[Callable[[SweepRun, dict], None]] = None) -> dict[str, dict]:
    """Run every combination in order through `load(config, overrides)` (the job's config loader) and
    `train(cfg)` (its normal train path, returning the final status). A run that fails (bad combination,
    an exception, a failed status) is recorded as failed and the sweep goes on. A stop signal (SIGTERM,
    Ctrl-C) stops the sweep: the running run ends `stopped` with its checkpoint, the runs not started stay
    `queued` (no record). Returns name -> record {state, error, started, finished, wall_s}; `on_run(run,
    record)` is called after each."""
    sweep.root.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    for r in sweep.runs:
        mark_queued(r.run_dir, sweep=sweep.id, sweep_params=r.params)
    write_sweep(sweep, records)
    with SweepStop() as flag:
        for r in sweep.runs:
            if flag.stop:
                break
            records[r.name] = _one_run(sweep, r, load, train)
            write_sweep(sweep, records)
            if on_run is not None:
                on_run(r, records[r.name])
            flag.stop = flag.stop or records[r.name]["state"] == "stopped"
    return records


def _one_run(sweep: Sweep, r: SweepRun, load: Callable, train: Callable) -> dict:
    t0 = time.time()
    try:
        status = train(load(sweep.config, [*sweep.base_overrides, *r.overrides])) or {}
        state, error = status.get("state", "failed"), status.get("error")
    except Exception as e:  # one failed run does not stop the sweep
        state, error = "failed", f"{type(e).__name__}: {e}"
    if state == "failed" or RunDir(r.run_dir).read_status().get("state") in LIVE_STATES:
        settle(r.run_dir, error or "the run ended without a final status")
        state = "failed"
    return {"state": state, "error": error, "started": t0, "finished": time.time(), "wall_s": round(time.time() - t0, 3)}


# ------------------------------------------------------------------ the summary table
def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _last(metrics: list[dict], key: str) -> Optional[float]:
    return next((m[key] for m in reversed(metrics) if isinstance(m.get(key), (int, float))), None)


def summary(root) -> list[dict]:
    """One row per run of the sweep folder `root`: name, state, the varied parameters, final loss,
    validation loss (when logged), eval metrics (LLM runs' eval.json), wall time, error."""
    sw = _json(Path(root) / SWEEP_FILE)
    if not sw:
        raise FileNotFoundError(f"{root}: no {SWEEP_FILE} (not a sweep folder)")
    rows = []
    for r in sw.get("runs", []):
        run = RunDir(r["run_dir"])
        status, rec, metrics = run.read_status(), sw.get("records", {}).get(r["name"], {}), run.read_metrics()
        ev = _json(run.path / "eval.json")
        params = {k: r["params"][k] for k in sw.get("axis_order", r["params"])}
        row = {"run": r["name"], "state": status.get("state", rec.get("state", "")), **params,
               "final_loss": _last(metrics, "loss"),
               "val_loss": _last(metrics, "val_loss") if _last(metrics, "val_loss") is not None else
               _last(metrics, "validation_loss"),
               **{k: ev[k] for k in METRIC_KEYS if isinstance(ev.get(k), (int, float))},
               "wall_s": rec.get("wall_s"), "error": status.get("error") or rec.get("error") or ""}
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")[:80]


def markdown_table(rows: list[dict]) -> str:
    """The summary as a markdown table (columns: the union of the rows' keys; empty columns dropped)."""
    if not rows:
        return "(no runs)"
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ the CLIs' `sweep`
def add_sweep_parser(sub, config_class: str, tool: str):
    """The `sweep` subcommand of a trainer CLI (`config_class`: 'module:Class' of its job config)."""
    s = sub.add_parser("sweep", help="train one run per combination of --vary values (in order; a failed run "
                                     "does not stop the others) and print the summary table")
    s.add_argument("--config", required=True, help="the base TOML config")
    s.add_argument("--vary", action="append", required=True, metavar="SECTION.KEY=V1,V2,...",
                   help="values of one field (read as the field declares them); repeat for more axes")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="fixed overrides")
    s.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    s.add_argument("--json", action="store_true", help="print the summary rows as JSON")
    s.add_argument("--help-config", action=HelpConfig, config_class=config_class)
    s.epilog = f"example: {tool} sweep --config FILE --vary lora.r=4,8,16 --vary train.learning_rate=1e-4,5e-4"
    return s


def cli_sweep(a, cls: type, load: Callable, train: Callable) -> int:
    """Run `sweep` as parsed by add_sweep_parser; exit status 0 only when every run finished."""
    sweep = expand(cls, a.config, a.vary, a.set)
    print(f"sweep {sweep.id}: {len(sweep.runs)} runs in {sweep.root}")
    if a.dry_run:
        for r in sweep.runs:
            print(f"  {r.name}: {' '.join(r.overrides[:-1])}")
        return 0
    records = run_sweep(sweep, load, train, on_run=lambda r, rec: print(
        f"  {r.name}: {rec['state']} in {rec['wall_s']:.1f} s" + (f" ({rec['error']})" if rec["error"] else ""),
        flush=True))
    rows = summary(sweep.root)
    print(json.dumps(rows, indent=2) if a.json else markdown_table(rows))
    if len(records) < len(sweep.runs) or any(r["state"] == "stopped" for r in records.values()):
        print(f"sweep stopped: {len(sweep.runs) - len(records)} run(s) not started (still queued)", file=sys.stderr)
        return 1
    return 0 if all(r["state"] == "done" for r in records.values()) else 1


__all__ = ["Sweep", "SweepRun", "expand", "parse_vary", "parse_values", "run_sweep", "summary", "markdown_table",
           "SWEEP_FILE"]
