"""Text runs compared: their eval metrics per run and per checkpoint (`lora-llm eval`, cached in the
checkpoint), the metric curves to plot, and generations side by side (`lora-llm generate`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lora_core.files import atomic_write_json
from lora_core.run import RunDir

from .. import clirun, job_kinds
from ..errors import UserError
from ..model_refs import resolve_model_ref
from ..workspace import Workspace, check_name
from .evals import read_json

METRICS = ("accuracy", "macro_f1", "f1", "mcc", "perplexity", "loss", "val_loss")
CKPT_EVAL = "eval.json"   # a checkpoint's cached `lora-llm eval` result


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TextCompareService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def runs(self) -> list[str]:
        return [p.name for p in self.ws.run_dirs() if job_kinds.run_kind(p) == "llm-train"]

    def _run(self, name: str) -> RunDir:
        return RunDir(self.ws.resolve(Path("runs") / check_name(name, "run name"), must_exist=True))

    def metrics_line(self, run_dir: Path) -> str:
        """The run's evaluation metrics, rounded, for the run panel beside the loss ("" when it has none):
        the final evaluation, else the newest metrics.jsonl record holding one."""
        run = RunDir(run_dir)
        st, records = run.read_status(), run.read_metrics()
        ev = read_json(run.path / "eval.json") or st.get("eval") or {}
        step, found = st.get("step"), {k: ev[k] for k in METRICS if k != "loss" and _num(ev.get(k))}
        for rec in reversed(records if not found else []):
            found = {k: rec[k] for k in METRICS if k not in ("loss", "val_loss") and _num(rec.get(k))}
            if found:
                step = rec.get("step")
                break
        shown = " · ".join(f"{k} **{v:.4g}**" for k, v in found.items())
        return f"Evaluation (step {step}): {shown}" if found else ""

    def metrics(self, names: list[str]) -> list[dict]:
        """One row per run and evaluated checkpoint: run, step, state and the eval metrics (eval.json /
        status.json `eval` for the final one, metrics.jsonl records holding a metric for the others)."""
        rows = []
        for n in names or []:
            run = self._run(n)
            st, records = run.read_status(), run.read_metrics()
            for rec in records:
                found = {k: rec[k] for k in METRICS if k != "loss" and _num(rec.get(k))}
                if found:
                    rows.append({"run": n, "step": rec.get("step"), **found})
            ev = read_json(run.path / "eval.json") or st.get("eval") or {}
            final = {k: ev[k] for k in METRICS if _num(ev.get(k))}
            losses = [r["loss"] for r in records if _num(r.get("loss"))]
            rows.append({"run": n, "step": st.get("step") if final else f"{st.get('step', 0)} (no eval)",
                         "state": st.get("state", ""), **final, **({"final_loss": losses[-1]} if losses else {})})
        return rows

    def checkpoint_metrics(self, names: list[str], progress=None) -> list[dict]:
        """One row per kept checkpoint (checkpoints/step_N holding an adapter) of each run: its eval metrics
        from `lora-llm eval --adapter CKPT --config RUN/config.toml`, cached as CKPT/eval.json (reused
        while newer than the checkpoint's adapter). `progress(done, total, label)` is told before each."""
        todo = []
        for n in names or []:
            run = self._run(n)
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
        sources = [("base: " + model, ["--model", resolve_model_ref(self.ws, model, "Base model")])]
        sources += [(n, ["--adapter", str(self._run(n).path)]) for n in names or []]
        out = []
        for label, src in sources:
            text = clirun.run_cli("lora_llm.cli", ["generate", *src, "--prompt", prompt,
                                                   "--max-new-tokens", str(int(max_new_tokens))], self.ws.root, 900)
            out.append([label, text.strip()])
        return out


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
