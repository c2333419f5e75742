"""Captioning a dataset with a model installed in the workspace's models/ (lora_sd.captioners finds the ones
`lora-sd caption` runs, from their files; nothing is downloaded): the caption CLI runs as a subprocess and its
progress lines (`caption N/TOTAL: ...`) are followed while it runs."""
from __future__ import annotations

import re
import time
from typing import Callable, Optional

from lora_sd.captioners import INSTALL_HINT, find_captioners

from .. import clirun, runview
from ..errors import CliError, UserError
from ..workspace import Workspace

PROGRESS = re.compile(r"^caption (\d+)/(\d+): (.*)$", re.M)
MODES = {"images without a caption": "--missing-only",                  # shown choice -> the CLI's flag
         "every image (old captions moved aside)": "--overwrite"}


class CaptionService:
    def __init__(self, ws: Workspace, poll_s: float = 0.5):
        self.ws, self.poll_s = ws, poll_s

    def models(self) -> list[str]:
        """The captioning models under models/ (workspace-relative folders)."""
        return [self.ws.rel(p) for p in find_captioners(self.ws.models)]

    def hint(self) -> str:
        """What the Dataset tab says about captioning with a model: the models found, or what to install where."""
        found = self.models()
        if found:
            return f"Captioning models found in models/: {', '.join(found)} (BLIP; captions are written as `<image>.txt`)."
        return "No captioning model in `models/` of the workspace: " + INSTALL_HINT.format(where=self.ws.models) + "."

    def caption(self, folder: str, model: str, mode: str, prefix: str = "",
                on_progress: Optional[Callable[[int, int, str], None]] = None) -> str:
        """Run `lora-sd caption` on a workspace folder with a workspace model (log in outputs/caption/<time>/);
        `on_progress(done, total, line)` while it runs; returns its summary line, or raises its one-line error."""
        path = self.ws.resolve(folder, must_exist=True)
        model_path = self.ws.resolve(model, must_exist=True) if (model or "").strip() else None
        if model_path is None:
            raise UserError("Captioning model: choose one (" + INSTALL_HINT.format(where=self.ws.models) + ")")
        if mode not in MODES:
            raise UserError(f"Caption: one of {', '.join(MODES)}")
        args = ["caption", str(path), "--model", str(model_path), MODES[mode]]
        args += ["--prefix", prefix.strip()] if (prefix or "").strip() else []
        out = self.ws.fresh_dir(self.ws.outputs / "caption")
        out.mkdir(parents=True)
        log = out / "console.log"
        proc = clirun.start_cli("lora_sd.cli", args, self.ws.root, log)
        while proc.poll() is None:
            time.sleep(self.poll_s)
            _report(log, on_progress)
        _report(log, on_progress)
        if proc.returncode != 0:
            raise CliError(runview.last_line(log) or f"lora-sd caption exited with code {proc.returncode}")
        return runview.last_line(log).replace(str(path), self.ws.rel(path))   # the folder as the page names it


def progress(text: str) -> Optional[tuple[int, int, str]]:
    """(done, total, line) of the newest progress line of the caption CLI's output, or None."""
    found = PROGRESS.findall(text)
    return (int(found[-1][0]), int(found[-1][1]), found[-1][2]) if found else None


def _report(log, on_progress) -> None:
    if on_progress is not None and log.is_file():
        now = progress(log.read_text(encoding="utf-8", errors="replace"))
        if now is not None:
            on_progress(*now)
