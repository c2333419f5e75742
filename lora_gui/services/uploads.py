"""Datasets: check a folder with `lora-sd check-dataset`, upload images and captions into datasets/<name>."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..clirun import run_cli_json
from ..errors import UserError
from ..workspace import Workspace, check_name

MAX_UPLOAD_BYTES = 20 * 1024 * 1024      # per file
MAX_UPLOAD_FILES = 2000
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".txt", ".caption", ".jsonl")


class UploadService:
    def __init__(self, ws: Workspace, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.ws = ws
        self.max_upload_bytes = max_upload_bytes

    def check(self, path: str) -> str:
        folder = self.ws.resolve(path, must_exist=True)
        if not folder.is_dir():
            raise UserError(f"{path}: not a folder")
        rep = run_cli_json("lora_sd.cli", ["check-dataset", str(folder), "--json"], self.ws.root, timeout=120)
        return dataset_report_markdown(self.ws.rel(folder), rep)

    def upload(self, files: list[str], name: str) -> str:
        """Copy uploaded images/captions into datasets/<name> (size- and type-limited)."""
        name = check_name(name, "dataset name")
        if not files:
            raise UserError("choose some files to upload first")
        if len(files) > MAX_UPLOAD_FILES:
            raise UserError(f"at most {MAX_UPLOAD_FILES} files per upload")
        dest = self.ws.datasets / name
        names = [check_name(Path(f).name, "file name") for f in files]   # every refusal before anything is written
        for f in files:
            src = Path(f)
            if src.suffix.lower() not in UPLOAD_SUFFIXES:
                raise UserError(f"{src.name}: only {', '.join(UPLOAD_SUFFIXES)} files can be uploaded")
            if src.stat().st_size > self.max_upload_bytes:
                raise UserError(f"{src.name}: larger than {self.max_upload_bytes // (1024 * 1024)} MB")
        taken = sorted(Path(f).name for f in files if (dest / Path(f).name).exists())
        if taken:
            raise UserError(f"{self.ws.rel(dest)} holds {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''} "
                            "already: rename the files or upload into another dataset name")
        fresh = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            for f, n in zip(files, names):
                shutil.copyfile(f, dest / n)
                written.append(dest / n)
        except BaseException:   # a failed copy (disk full, a file gone): the upload leaves nothing behind
            for p in written:
                p.unlink(missing_ok=True)
            if fresh:
                shutil.rmtree(dest, ignore_errors=True)
            raise
        return self.ws.rel(dest)


def dataset_report_markdown(name: str, rep: dict) -> str:
    lines = [f"**{name}**: {rep.get('images', '?')} images, {rep.get('captions', '?')} captions"]
    problems = rep.get("problems") or []
    if problems:
        lines.append(f"\n{len(problems)} problem(s):")
        lines += [f"- {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"- ... and {len(problems) - 20} more")
    else:
        lines.append("\nno problems found")
    return "\n".join(lines)
