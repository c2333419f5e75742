"""Comparison grids of SD runs, checkpoints, scales, prompts and seeds: the sources to choose from, start
`lora-sd grid` in the background (`--out outputs/grid/<name>`) and follow it by polling its folder
(lora_gui.services.grid_folder). No model is loaded in the GUI process."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from lora_core import adapter_files
from lora_core.files import atomic_write_json
from lora_core.run import RunDir

from .. import clirun, job_kinds, runview
from ..adapter_scan import find_adapters, is_adapter
from ..workspace import Workspace, check_name
from .grid_folder import INDEX, PENDING, REQUEST, GridFolder, write_pending_png
from .grid_request import FINAL, GridRequest, step_label


class GridService:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self._procs: dict[str, subprocess.Popen] = {}

    def sources(self) -> list[str]:
        """SD run folders (runs/<name>) and SD adapter files of the workspace."""
        runs = [self.ws.rel(p) for p in self.ws.run_dirs() if job_kinds.run_kind(p) == "sd-train"]
        files = [self.ws.rel(p) for p in find_adapters(self.ws) if adapter_files.inspect(p).get("cli") == "lora_sd.cli"]
        return runs + files

    def steps(self, sources: list[str]) -> list[str]:
        """The checkpoints the run folders among `sources` hold: 0 (the base), each kept step, final."""
        found: set[int] = set()
        for s in sources or []:
            p = self.ws.resolve(s, must_exist=True)
            if p.is_dir():
                found.update(int(c.name[5:]) for c in RunDir(p).checkpoints()
                             if c.name[5:].isdigit() and any(is_adapter(f) for f in c.glob("*.safetensors")))
        return [step_label(0)] + [step_label(s) for s in sorted(found)] + [FINAL]

    def start(self, name: str, request: GridRequest) -> str:
        """Start `lora-sd grid` in the background into outputs/grid/<name>; returns the grid's name."""
        args, shown = request.cli_args(self.ws)
        out = self.ws.fresh_dir(self.ws.outputs / "grid", name)
        out.mkdir(parents=True)
        atomic_write_json(out / REQUEST, {**shown, "args": args, "started": time.time()})
        write_pending_png(out / PENDING)
        self._procs[out.name] = clirun.start_cli("lora_sd.cli", [*args, "--out", str(out)], self.ws.root,
                                                 out / "console.log")
        return out.name

    def names(self) -> list[str]:
        folder = self.ws.outputs / "grid"
        found = [p for p in folder.iterdir() if (p / REQUEST).is_file()] if folder.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def folder(self, name: str) -> GridFolder:
        path = self.ws.resolve(Path("outputs") / "grid" / check_name(name, "grid name"), must_exist=True)
        return GridFolder(path, self.ws)

    def state(self, name: str) -> runview.RunSnapshot:
        """Progress of a grid: cells done of rows x cols, and its state (running, done, failed, stopped)."""
        grid = self.folder(name)
        snap = runview.RunSnapshot(path=grid.path, step=len(grid.cell_pngs()), max_steps=grid.total)
        proc = self._procs.get(name)
        if (grid.path / INDEX).is_file():
            snap.state = "done"
        elif proc is not None and proc.poll() is None:
            snap.state = "running"
        else:
            snap.state = "failed" if proc is not None else "stopped"
            snap.error = runview.last_line(grid.path / "console.log") or "the grid did not finish"
        snap.log_tail = runview.tail(grid.path / "console.log")
        return snap
