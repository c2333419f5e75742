"""Sweeps (lora_core.sweep): queue one run per combination of values over a form's config, list the sweep
folders, and read a sweep's table (parameters, state, losses, metrics, wall time) and loss curves."""
from __future__ import annotations

import json
from pathlib import Path

from lora_core import sweep as sweeplib
from lora_core.configfile import save_config, to_dict
from lora_core.run import mark_queued, settle

from .. import config_data, job_kinds, runview
from ..errors import UserError
from ..field_kinds import set_key
from ..queue import JobQueue
from ..workspace import Workspace, check_name
from .evals import read_json
from .job_configs import ConfigService


class SweepService:
    def __init__(self, ws: Workspace, queue: JobQueue, configs: ConfigService):
        self.ws, self.queue, self.configs = ws, queue, configs

    def folders(self) -> list[str]:
        """Sweep folders (holding sweep.json) under runs/ and outputs/sweeps/, relative to the workspace."""
        found = []
        for base in (self.ws.runs, self.ws.outputs / "sweeps"):
            if base.is_dir():
                found += [p.parent for p in base.glob(f"**/{sweeplib.SWEEP_FILE}") if len(p.relative_to(base).parts) <= 3]
        return [self.ws.rel(p) for p in sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)]

    def table(self, folder: str) -> tuple[list[str], list[list], list[tuple[str, list, list]]]:
        """(headers, rows, loss curves [(run, steps, losses)]) of a sweep: parameters, state, final loss,
        validation loss, eval metrics, wall time (from the sweep's records, else the queue's job times)."""
        root = self.ws.resolve(folder, must_exist=True)
        rows = sweeplib.summary(root)
        dirs = {r["name"]: r["run_dir"] for r in read_json(root / sweeplib.SWEEP_FILE).get("runs", [])}
        times = {j.run_dir: round(j.ended - j.started, 1) for j in self.queue.jobs() if j.started and j.ended}
        curves = []
        for row in rows:
            path = str(Path(dirs.get(row["run"], "")).resolve())
            if row.get("wall_s") is None and path in times:
                row["wall_s"] = times[path]
            snap = runview.snapshot(Path(path))
            curves.append((row["run"], snap.steps, snap.losses))
        cols = [c for c in dict.fromkeys(k for r in rows for k in r) if any(r.get(c) not in (None, "") for r in rows)]
        return cols, [[_cell(r.get(c)) for c in cols] for r in rows], curves

    def runs(self, folder: str) -> list[str]:
        """The run folders of a sweep (workspace-relative), e.g. for a grid across them."""
        root = self.ws.resolve(folder, must_exist=True)
        return [self.ws.rel(r["run_dir"]) for r in read_json(root / sweeplib.SWEEP_FILE).get("runs", [])]

    def queue_sweep(self, kind: str, base: dict, values: dict, vary: str, name: str,
                    launcher: str = "python") -> tuple[list[str], str]:
        """Queue one run per combination of the `section.key = v1, v2` lines in `vary` over the form's
        config: run folders runs/<name>-<NN>_<params>, a shared sweep id in each status.json and
        outputs/sweeps/<id>/sweep.json (what the sweep table reads). A combination the config refuses is
        marked failed; the others are queued."""
        data = to_dict(self.configs.build(kind, base, values))
        lines = [ln.replace(" ", "") for ln in str(vary or "").splitlines() if ln.strip()]
        try:
            sweep = sweeplib.expand(job_kinds.get(kind).config_class(), None, lines)
        except ValueError as e:
            raise UserError(f"Sweep values: {e}") from None
        prefix = check_name(name or f"sweep-{sweep.id}", "sweep name")
        root = self.ws.fresh_dir(self.ws.outputs / "sweeps", prefix)
        queued, failed = [], []
        for r in sweep.runs:
            run_dir = self.ws.fresh_dir(self.ws.runs, check_name(f"{prefix}-{r.name}"[:64].rstrip("-.")))
            r.run_dir = str(run_dir)
            ok = self._queue_run(kind, data, r, sweep.id, run_dir, launcher)
            (queued if ok else failed).append(run_dir.name)
        sweep.root = root
        sweeplib.write_sweep(sweep)
        self.queue.tick()
        msg = f"sweep {sweep.id}: {len(queued)} runs queued" + (f", {len(failed)} refused ({', '.join(failed)})"
                                                                if failed else "") + f"; table: {self.ws.rel(root)}"
        return queued, msg

    def _queue_run(self, kind: str, data: dict, run, sweep_id: str, run_dir: Path, launcher: str) -> bool:
        """Write one combination's config.toml and queue it; a combination the config refuses is marked
        failed with the config's message (False)."""
        cfg = json.loads(json.dumps(data))
        for k, v in run.params.items():
            set_key(cfg, k, v)
        cfg["run_dir"] = str(run_dir)
        run_dir.mkdir(parents=True)
        try:
            typed = config_data.validate(kind, cfg, run.name)
        except ValueError as e:
            mark_queued(run_dir, kind=kind, sweep=sweep_id, sweep_params=run.params)
            settle(run_dir, str(e))
            return False
        save_config(run_dir / "config.toml", typed)
        self.queue.add(kind, run_dir, launcher=launcher, label=run_dir.name)
        mark_queued(run_dir, sweep=sweep_id, sweep_params=run.params)
        return True


def _cell(v):
    if isinstance(v, float):
        return round(v, 4)
    return "" if v is None else v if isinstance(v, (int, str)) else json.dumps(v)
