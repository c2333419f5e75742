"""Compare: comparison grids (`lora-sd grid`), LLM runs on their eval metrics, text generations side by
side, sweeps (table + overlaid loss curves, and queueing one from a form), the preflight check
(`lora-sd check` / `lora-llm check`) and the adapter fit badge (`inspect --base`). No Gradio, no torch:
every model operation is a CLI subprocess; every display is read from the files the CLIs write.

A grid runs in the background (`python -m lora_sd.cli grid ... --out outputs/grid/<name>`); the CLI
writes `cells/r<row>_c<col>.png` as each cell is done (its generation parameters in the PNG's text) and
`grid.png` + `index.json` at the end, so the page shows the grid filling in by polling the folder.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Optional

from lora_core.configfile import save_config, to_dict
from lora_core.files import atomic_write_json
from lora_core.run import RunDir, mark_queued, settle

from .. import adapters, clirun, configs, kinds, runview
from ..errors import UserError
from ..workspace import Workspace, check_name
from .evals import read_json

try:  # the sweep library (issue 12); without it the sweep panels say so
    from lora_core import sweep as sweeplib
except ImportError:  # pragma: no cover
    sweeplib = None

AXIS_ORDER = ("step", "adapter", "scale", "seed", "prompt")   # the first varying one is the columns
REQUEST, INDEX, GRID_PNG, PENDING = "request.json", "index.json", "grid.png", "pending.png"
METRICS = ("accuracy", "macro_f1", "f1", "mcc", "perplexity", "loss", "val_loss")
FINAL = "final"
CKPT_EVAL = "eval.json"   # a checkpoint's cached `lora-llm eval` result


def step_label(step) -> str:
    return "0 (base)" if step == 0 else FINAL if step in (FINAL, -1, None) else f"step {step}"


def parse_step(label: str):
    text = str(label).strip()
    if text.startswith("0"):
        return 0
    if text == FINAL:
        return FINAL
    try:
        return int(text.removeprefix("step").strip())
    except ValueError:
        raise UserError(f"checkpoint {label!r}: expected '0 (base)', 'step N' or 'final'") from None


def _numbers(text: str, kind: type, what: str) -> list:
    try:
        vals = [kind(t) for t in str(text or "").replace(";", ",").split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    return vals


class CompareService:
    def __init__(self, ws: Workspace, queue=None, configs_=None):
        self.ws, self.queue, self.configs = ws, queue, configs_
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ SD sources and their checkpoints
    def sd_sources(self) -> list[str]:
        """SD run folders (runs/<name>) and SD adapter files of the workspace."""
        runs = [self.ws.rel(p) for p in self.ws.run_dirs() if kinds.run_kind(p) == "sd-train"]
        files = [self.ws.rel(p) for p in adapters.find_adapters(self.ws)
                 if adapters.inspect(p).get("cli") == "lora_sd.cli"]
        return runs + files

    def steps(self, sources: list[str]) -> list[str]:
        """The checkpoints the run folders among `sources` hold: 0 (the base), each kept step, final."""
        found: set[int] = set()
        for s in sources or []:
            p = self.ws.resolve(s, must_exist=True)
            if p.is_dir():
                found.update(int(c.name[5:]) for c in RunDir(p).checkpoints()
                             if c.name[5:].isdigit() and any(adapters.is_adapter(f) for f in c.glob("*.safetensors")))
        return [step_label(0)] + [step_label(s) for s in sorted(found)] + [FINAL]

    # ------------------------------------------------------------ the grid
    def grid_args(self, sources: list[str], steps: list[str], scales: str, prompts: str, seeds: str,
                  model: str = "tiny", size: int = 64, sample_steps: int = 4, guidance: float = 7.5,
                  scheduler: str = "ddim") -> tuple[list[str], dict]:
        """`lora-sd grid` arguments for the chosen values (at most two of them may vary: they become the
        columns and rows) and the request {x, y, x_labels, y_labels, rows, cols} the page shows."""
        srcs = [str(self.ws.resolve(s, must_exist=True)) for s in (sources or [])]
        dims = {"step": [parse_step(s) for s in (steps or [])] or [FINAL], "adapter": srcs or [""],
                "scale": _numbers(scales, float, "Scales") or [1.0], "seed": _numbers(seeds, int, "Seeds") or [0],
                "prompt": [p.strip() for p in str(prompts or "").splitlines() if p.strip()]}
        if not dims["prompt"]:
            raise UserError("Prompts: write at least one prompt (one per line)")
        if any("|" in p for p in dims["prompt"]) or any("," in s for s in srcs):
            raise UserError("a prompt may not hold '|' and a path no ',' (they separate the grid's values)")
        vary = [a for a in AXIS_ORDER if len(dims[a]) > 1]
        if len(vary) > 2:
            raise UserError(f"a grid has two axes, but {', '.join(vary)} each have several values: keep one value "
                            "for all but two of them")
        x = vary[0] if vary else "scale"
        y = vary[1] if len(vary) > 1 else ""
        if "step" in (x, y) and not (len(srcs) == 1 and Path(srcs[0]).is_dir()):
            raise UserError("comparing checkpoints needs exactly one run folder (runs/<name>)")
        args = ["grid", "--x", _axis(x, dims[x])] + (["--y", _axis(y, dims[y])] if y else [])
        fixed = {a: dims[a][0] for a in AXIS_ORDER if a not in (x, y)}
        source = fixed.get("adapter", "")
        if source:
            args += ["--run" if Path(source).is_dir() else "--adapter", source]
        if "step" in fixed and fixed["step"] != FINAL:
            args += ["--step", str(fixed["step"])]
        args += ["--scale", str(fixed.get("scale", 1.0)), "--seed", str(fixed.get("seed", 0)),
                 "--prompt", str(fixed.get("prompt", dims["prompt"][0])),
                 "--model", configs.resolve_model_ref(self.ws, model, "Base model"),
                 "--width", str(int(size)), "--height", str(int(size)), "--steps", str(int(sample_steps)),
                 "--guidance", str(float(guidance)), "--scheduler", scheduler or "ddim"]
        request = {"x": x, "y": y, "x_labels": [_label(x, v, self.ws) for v in dims[x]],
                   "y_labels": [_label(y, v, self.ws) for v in dims[y]] if y else [""],
                   "cols": len(dims[x]), "rows": len(dims[y]) if y else 1}
        return args, request

    def start_grid(self, name: str, *values) -> str:
        """Start `lora-sd grid` in the background into outputs/grid/<name>; returns the grid's name."""
        args, request = self.grid_args(*values)
        out = self.ws.fresh_dir(self.ws.outputs / "grid", name)
        out.mkdir(parents=True)
        atomic_write_json(out / REQUEST, {**request, "args": args, "started": time.time()})
        _pending_png(out / PENDING)
        self._procs[out.name] = clirun.start_cli("lora_sd.cli", [*args, "--out", str(out)], self.ws.root,
                                                 out / "console.log")
        return out.name

    def grid_names(self) -> list[str]:
        folder = self.ws.outputs / "grid"
        found = [p for p in folder.iterdir() if (p / REQUEST).is_file()] if folder.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def grid_dir(self, name: str) -> Path:
        return self.ws.resolve(Path("outputs") / "grid" / check_name(name, "grid name"), must_exist=True)

    def grid_state(self, name: str) -> runview.RunSnapshot:
        """Progress of a grid: cells done of rows x cols, and its state (running, done, failed, stopped)."""
        out = self.grid_dir(name)
        req = read_json(out / REQUEST)
        total = int(req.get("rows", 1)) * int(req.get("cols", 1))
        done = len(list((out / "cells").glob("r*_c*.png"))) if (out / "cells").is_dir() else 0
        snap = runview.RunSnapshot(path=out, step=done, max_steps=total)
        proc = self._procs.get(name)
        if (out / INDEX).is_file():
            snap.state = "done"
        elif proc is not None and proc.poll() is None:
            snap.state = "running"
        else:
            snap.state = "failed" if proc is not None else "stopped"
            snap.error = runview.last_line(out / "console.log") or "the grid did not finish"
        snap.log_tail = runview.tail(out / "console.log")
        return snap

    def grid_cells(self, name: str) -> list[tuple[str, str]]:
        """(png, caption) of every cell in row-major order; a cell not done yet shows a grey placeholder."""
        out, req = self.grid_dir(name), read_json(self.grid_dir(name) / REQUEST)
        items = []
        for r, ylab in enumerate(req.get("y_labels", [""])):
            for c, xlab in enumerate(req.get("x_labels", [])):
                png = out / "cells" / f"r{r}_c{c}.png"
                cap = " / ".join(x for x in (ylab, xlab) if x)
                items.append((str(png if png.is_file() else out / PENDING), cap if png.is_file() else cap + " ..."))
        return items

    def cell_params(self, name: str, index: int) -> dict:
        """The parameters of cell `index` (row-major): its index.json entry, else its PNG's parameters."""
        out, req = self.grid_dir(name), read_json(self.grid_dir(name) / REQUEST)
        row, col = divmod(int(index), max(1, int(req.get("cols", 1))))
        entry = next((c for c in read_json(out / INDEX).get("cells", []) if (c["row"], c["col"]) == (row, col)),
                     None)
        if entry is not None:
            return {"row": row, "col": col, **entry}
        png = out / "cells" / f"r{row}_c{col}.png"
        if not png.is_file():
            return {"row": row, "col": col, "state": "not generated yet"}
        return {"row": row, "col": col, "png": self.ws.rel(png), **png_parameters(png)}

    def grid_concept_score(self, name: str) -> str:
        """A markdown line per grid column whose cells' prompts name colours / shapes / backgrounds of the
        synthetic shapes world (lora_sd.synth): how often the generated cells show them
        (lora_sd.concept_score, numpy only); "" when no prompt names any."""
        from PIL import Image
        from lora_sd import concept_score
        out, req = self.grid_dir(name), read_json(self.grid_dir(name) / REQUEST)
        per_col: dict[int, list] = {}
        for png in sorted((out / "cells").glob("r*_c*.png")) if (out / "cells").is_dir() else []:
            col = int(png.stem.split("_c")[1])
            meta = png_parameters(png).get("lora_sd")   # the generation parameters lora-sd writes as JSON
            prompt = str(meta.get("prompt", "")) if isinstance(meta, dict) else ""
            with Image.open(png) as im:
                ok = concept_score.check(im, prompt)
            if any(v is not None for v in ok.values()):
                per_col.setdefault(col, []).append(ok)
        if not per_col:
            return ""
        labels = req.get("x_labels", [])
        lines = ["**Concept score** (cells showing the prompted colour / shape / background):"]
        for col, checks in sorted(per_col.items()):
            f = concept_score.fractions(checks)
            parts = [f"{a} {100 * f[a]:.0f} %" for a in concept_score.ATTRIBUTES if f[a] is not None]
            label = labels[col] if col < len(labels) else f"column {col + 1}"
            lines.append(f"- {label or 'all'}: {', '.join(parts)} (of {f['n']} cells)")
        return "\n".join(lines)

    # ------------------------------------------------------------ LLM runs
    def llm_runs(self) -> list[str]:
        return [p.name for p in self.ws.run_dirs() if kinds.run_kind(p) == "llm-train"]

    def llm_metrics(self, names: list[str]) -> list[dict]:
        """One row per run and evaluated checkpoint: run, step, state and the eval metrics (eval.json /
        status.json `eval` for the final one, metrics.jsonl records holding a metric for the others)."""
        rows = []
        for n in names or []:
            run = RunDir(self.ws.resolve(Path("runs") / check_name(n, "run name"), must_exist=True))
            st = run.read_status()
            for rec in run.read_metrics():
                found = {k: rec[k] for k in METRICS if k != "loss" and _num(rec.get(k))}
                if found:
                    rows.append({"run": n, "step": rec.get("step"), **found})
            ev = read_json(run.path / "eval.json") or st.get("eval") or {}
            final = {k: ev[k] for k in METRICS if _num(ev.get(k))}
            losses = [r["loss"] for r in run.read_metrics() if _num(r.get("loss"))]
            rows.append({"run": n, "step": st.get("step") if final else f"{st.get('step', 0)} (no eval)",
                         "state": st.get("state", ""), **final, **({"final_loss": losses[-1]} if losses else {})})
        return rows

    def checkpoint_metrics(self, names: list[str], progress=None) -> list[dict]:
        """One row per kept checkpoint (checkpoints/step_N holding an adapter) of each run: its eval metrics
        from `lora-llm eval --adapter CKPT --config RUN/config.toml`, cached as CKPT/eval.json (reused
        while newer than the checkpoint's adapter). `progress(done, total, label)` is told before each."""
        todo = []
        for n in names or []:
            run = RunDir(self.ws.resolve(Path("runs") / check_name(n, "run name"), must_exist=True))
            todo += [(n, run, c) for c in run.checkpoints() if (c / "adapter.safetensors").is_file()
                     and c.name[5:].isdigit()]
        rows = []
        for i, (n, run, ckpt) in enumerate(todo):
            if progress is not None:
                progress(i, len(todo), f"{n} {ckpt.name}")
            ev = self._checkpoint_eval(run, ckpt)
            rows.append({"run": n, "step": int(ckpt.name[5:]), "source": self.ws.rel(ckpt),
                         **{k: ev[k] for k in METRICS if _num(ev.get(k))}})
        return rows

    def _checkpoint_eval(self, run: RunDir, ckpt: Path) -> dict:
        cache = ckpt / CKPT_EVAL
        if cache.is_file() and cache.stat().st_mtime >= (ckpt / "adapter.safetensors").stat().st_mtime:
            return read_json(cache)
        args = ["eval", "--adapter", str(ckpt), "--json"]
        if (run.path / "config.toml").is_file():
            args += ["--config", str(run.path / "config.toml")]
        ev = clirun.parse_json(clirun.run_cli("lora_llm.cli", args, self.ws.root, 1800), "lora-llm eval")
        atomic_write_json(cache, {**ev, "step": int(ckpt.name[5:])})
        return ev

    def generations(self, names: list[str], prompt: str, max_new_tokens: int, model: str = "tiny") -> list[list]:
        """[source, text] for the bare base model and each run, one `lora-llm generate` call each (greedy)."""
        if not (prompt or "").strip():
            raise UserError("write a prompt first")
        out = []
        sources = [("base: " + model, ["--model", configs.resolve_model_ref(self.ws, model, "Base model")])]
        sources += [(n, ["--adapter", str(self.ws.resolve(Path("runs") / check_name(n, "run name"),
                                                          must_exist=True))]) for n in names or []]
        for label, src in sources:
            text = clirun.run_cli("lora_llm.cli", ["generate", *src, "--prompt", prompt,
                                                   "--max-new-tokens", str(int(max_new_tokens))], self.ws.root, 900)
            out.append([label, text.strip()])
        return out

    # ------------------------------------------------------------ sweeps
    def sweeps(self) -> list[str]:
        """Sweep folders (holding sweep.json) under runs/ and outputs/sweeps/, relative to the workspace."""
        found = []
        for base in (self.ws.runs, self.ws.outputs / "sweeps"):
            if base.is_dir():
                found += [p.parent for p in base.glob("**/sweep.json") if len(p.relative_to(base).parts) <= 3]
        return [self.ws.rel(p) for p in sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)]

    def sweep_table(self, folder: str) -> tuple[list[str], list[list], list[tuple[str, list, list]]]:
        """(headers, rows, loss curves [(run, steps, losses)]) of a sweep: parameters, state, final loss,
        validation loss, eval metrics, wall time (from the sweep's records, else the queue's job times)."""
        if sweeplib is None:
            raise UserError("sweeps need lora_core.sweep, which this installation lacks")
        root = self.ws.resolve(folder, must_exist=True)
        rows = sweeplib.summary(root)
        sw = read_json(root / sweeplib.SWEEP_FILE)
        dirs = {r["name"]: r["run_dir"] for r in sw.get("runs", [])}
        times = self._job_times()
        curves = []
        for row in rows:
            path = str(Path(dirs.get(row["run"], "")).resolve())
            if row.get("wall_s") is None and path in times:
                row["wall_s"] = times[path]
            snap = runview.snapshot(Path(path))
            curves.append((row["run"], snap.steps, snap.losses))
        cols = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) not in (None, "") for r in rows)]
        return cols, [[_cell(r.get(c)) for c in cols] for r in rows], curves

    def sweep_runs(self, folder: str) -> list[str]:
        """The run folders of a sweep (workspace-relative), e.g. for a grid across them."""
        root = self.ws.resolve(folder, must_exist=True)
        return [self.ws.rel(r["run_dir"]) for r in read_json(root / "sweep.json").get("runs", [])]

    def _job_times(self) -> dict[str, float]:
        if self.queue is None:
            return {}
        return {j.run_dir: round(j.ended - j.started, 1) for j in self.queue.jobs() if j.started and j.ended}

    def queue_sweep(self, kind: str, base: dict, values: list, vary: str, name: str,
                    launcher: str = "python") -> tuple[list[str], str]:
        """Queue one run per combination of the `section.key = v1, v2` lines in `vary` over the form's
        config: run folders runs/<name>-<NN>_<params>, a shared sweep id in each status.json and
        outputs/sweeps/<id>/sweep.json (what the sweep table reads). A combination the config refuses is
        marked failed; the others are queued."""
        if sweeplib is None:
            raise UserError("sweeps need lora_core.sweep, which this installation lacks")
        spec = kinds.get(kind)
        data = to_dict(self.configs.build(kind, base, values))
        lines = [ln.replace(" ", "") for ln in str(vary or "").splitlines() if ln.strip()]
        try:
            sweep = sweeplib.expand(spec.config_class(), None, lines)
        except ValueError as e:
            raise UserError(f"Sweep values: {e}") from None
        prefix = check_name(name or f"sweep-{sweep.id}", "sweep name")
        root = self.ws.fresh_dir(self.ws.outputs / "sweeps", prefix)
        queued, failed = [], []
        for r in sweep.runs:
            run_dir = self.ws.fresh_dir(self.ws.runs, check_name(f"{prefix}-{r.name}"[:64].rstrip("-.")))
            r.run_dir = str(run_dir)
            cfg = json.loads(json.dumps(data))
            for k, v in r.params.items():
                configs.set_key(cfg, k, v)
            cfg["run_dir"] = str(run_dir)
            run_dir.mkdir(parents=True)
            try:
                typed = configs.validate(kind, cfg, r.name)
            except ValueError as e:
                mark_queued(run_dir, kind=kind, sweep=sweep.id, sweep_params=r.params)
                settle(run_dir, str(e))
                failed.append(run_dir.name)
                continue
            save_config(run_dir / "config.toml", typed)
            self.queue.add(kind, run_dir, launcher=launcher, label=run_dir.name)
            mark_queued(run_dir, sweep=sweep.id, sweep_params=r.params)
            queued.append(run_dir.name)
        sweep.root = root
        sweeplib.write_sweep(sweep)
        self.queue.tick()
        msg = f"sweep {sweep.id}: {len(queued)} runs queued" + (f", {len(failed)} refused ({', '.join(failed)})"
                                                                if failed else "") + f"; table: {self.ws.rel(root)}"
        return queued, msg

    # ------------------------------------------------------------ preflight and fit
    def check(self, kind: str, base: dict, values: list, steps: bool = True) -> tuple[bool, str]:
        """`lora-sd check` / `lora-llm check --json` on the form's config (written to outputs/check/<time>/);
        (nothing blocks a run, the report as markdown)."""
        cfg = self.configs.build(kind, base, values)
        out = self.ws.fresh_dir(self.ws.outputs / "check")
        out.mkdir(parents=True)
        save_config(out / "config.toml", cfg)
        args = ["check", "--config", str(out / "config.toml"), "--json"] + ([] if steps else ["--no-steps"])
        rc, stdout, stderr = clirun.run_cli_rc(kinds.get(kind).cli, args, self.ws.root, 900)
        rep = _report(stdout, stderr, rc, "check")
        atomic_write_json(out / "report.json", rep)
        return bool(rep.get("ok")) and rc == 0, report_markdown(rep)

    def fit(self, file: str, base: str) -> tuple[bool, dict]:
        """Whether an adapter file fits base model `base`: `lora-sd inspect FILE --base MODEL --json`
        (or lora-llm's, as the file's format says); (fits, the load report)."""
        path = self.ws.resolve(file, must_exist=True)
        if path not in adapters.find_adapters(self.ws):
            raise UserError(f"{file} is not an adapter file of this workspace")
        model = configs.resolve_model_ref(self.ws, base, "Base model")
        cli = adapters.inspect(path).get("cli") or "lora_sd.cli"
        rc, stdout, stderr = clirun.run_cli_rc(cli, ["inspect", str(path), "--base", model, "--json"], self.ws.root, 600)
        rep = _report(stdout, stderr, rc, "inspect")
        return bool(rep.get("fits")) and rc == 0, rep


def metric_curves(rows: list[dict], names: list[str]) -> tuple[Optional[str], list[tuple[str, list, list]]]:
    """(the metric to plot, [(run, steps, values)]) of metric rows: the first of accuracy, macro F1, MCC,
    perplexity present; one point per run and step (the first row for a step), in step order."""
    cols = {k for r in rows for k in r}
    metric = next((m for m in ("accuracy", "macro_f1", "mcc", "perplexity") if m in cols), None)
    curves = []
    for n in names or []:
        points: dict[int, float] = {}
        for r in rows:
            if r["run"] == n and isinstance(r.get("step"), int) and _num(r.get(metric)):
                points.setdefault(r["step"], r[metric])
        curves.append((n, sorted(points), [points[k] for k in sorted(points)]))
    return metric, curves


def badge(fits: Optional[bool], rep: Optional[dict] = None) -> str:
    """The fit badge: green 'fits', red 'does not fit' (with the bad blocks), grey when not checked."""
    if fits is None:
        return '<span class="fit-badge" data-fits="unknown" style="color:#6b7280">fit: not checked</span>'
    if fits:
        return (f'<span class="fit-badge" data-fits="yes" style="background:#16a34a;color:white;padding:2px 8px;'
                f'border-radius:8px">fits ({(rep or {}).get("matched", "?")} modules)</span>')
    bad = ", ".join((rep or {}).get("bad_blocks", [])[:4])
    return ('<span class="fit-badge" data-fits="no" style="background:#dc2626;color:white;padding:2px 8px;'
            f'border-radius:8px">does not fit{": " + bad if bad else ""}</span>')


def report_markdown(rep: dict) -> str:
    """The preflight report (PreflightReport.to_dict) as markdown: verdict, problems, data, parameters,
    memory, the two steps."""
    head = "**Check passed: nothing blocks this run.**" if rep.get("ok") else "**Check failed: this run would not work.**"
    lines = [head, ""]
    for f in rep.get("findings") or []:
        key = f" `{f['key']}`" if f.get("key") else ""
        lines.append(f"- **{f.get('level', '')}**{key}: {f.get('message', '')}")
    for what in ("data", "parameters", "memory", "steps"):
        value = rep.get(what)
        if value:
            lines += ["", f"**{what}**: " + _flat(value)]
            lines += [f"- {k}: {_flat(v)}" for k, v in value.items() if isinstance(v, dict) and v]
    return "\n".join(lines)


def _flat(d: dict) -> str:
    """`key value, ...` of a dict's plain entries (numbers shortened)."""
    return ", ".join(f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v:,}" if isinstance(v, int) and
                     not isinstance(v, bool) else f"{k} {v}" for k, v in d.items() if not isinstance(v, (dict, list)))


def png_parameters(path: Path) -> dict:
    """The generation parameters `lora-sd generate` / `grid` store in a PNG's text chunks."""
    from PIL import Image
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def _report(stdout: str, stderr: str, rc: int, what: str) -> dict:
    """The JSON report a CLI printed; without one, its one-line error."""
    try:
        return clirun.parse_json(stdout, what)
    except clirun.CliError:
        if rc:
            raise clirun.CliError(clirun.error_line(stderr, rc)) from None
        raise


def _pending_png(path: Path) -> None:
    from PIL import Image
    Image.new("RGB", (32, 32), (229, 231, 235)).save(path)


def _axis(axis: str, values: list) -> str:
    if axis == "prompt":
        return "prompt=" + "|".join(values)
    return f"{axis}=" + ",".join(str(v) for v in values)


def _label(axis: str, value, ws: Workspace) -> str:
    if axis == "step":
        return step_label(value)
    if axis == "adapter":
        return ws.rel(value) if value else "base"
    return f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}" if axis == "seed" else str(value)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v):
    if isinstance(v, float):
        return round(v, 4)
    return "" if v is None else v if isinstance(v, (int, str)) else json.dumps(v)
