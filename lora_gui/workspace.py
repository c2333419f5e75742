"""The workspace: one folder that holds everything the GUI reads or writes.

    <root>/runs/<name>/     run folders (the trainer's contract: config.toml, status.json, ...)
    <root>/configs/         saved job configs (the same TOML format as the repository's configs/)
    <root>/models/          base models (the offline tiny SD / LLM models are built here)
    <root>/datasets/        uploaded datasets
    <root>/outputs/         generated images, evaluation results, merged models
    <root>/queue.json       the job queue

Every path a user types or a request sends goes through `Workspace.resolve`: the one place
that confines paths to the workspace root.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .errors import PathError

SUBDIRS = ("runs", "configs", "models", "datasets", "outputs")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def confine(root: Path, user_path: str | os.PathLike, *, must_exist: bool = False) -> Path:
    """Resolve `user_path` (relative to `root`, or absolute) and return it only if it stays inside `root`.

    Refused: empty paths, any `..` component, NUL bytes, absolute paths outside the root and paths
    that leave the root through a symlink (the check is made on the fully resolved path, so a
    link inside the workspace pointing outside is refused too)."""
    root = Path(root).resolve()
    text = os.fspath(user_path).strip()
    if not text:
        raise PathError("empty path")
    if "\x00" in text:
        raise PathError("path contains a NUL byte")
    p = Path(text).expanduser() if text.startswith("~") else Path(text)
    if ".." in p.parts:
        raise PathError(f"{text!r}: '..' is not allowed in a path")
    candidate = p if p.is_absolute() else root / p
    resolved = candidate.resolve()  # follows every symlink that exists
    if not _inside(resolved, root):
        if _inside(Path(os.path.abspath(candidate)), root):
            raise PathError(f"{text!r} leads outside the workspace {root} (through a symlink)")
        raise PathError(f"{text!r} is outside the workspace {root}")
    if must_exist and not resolved.exists():
        raise PathError(f"{text!r} does not exist in the workspace")
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_name(name: str, what: str = "name") -> str:
    """A run / config / dataset name: letters, digits, '.', '_' and '-', no path separators."""
    name = (name or "").strip()
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise PathError(f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/' or spaces)")
    return name


class _Under:
    """A path under the workspace root, as a read-only attribute."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, ws, owner=None) -> Path:
        return ws.root / self.name


class Workspace:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def create(self) -> "Workspace":
        for d in SUBDIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        return self

    def resolve(self, user_path: str | os.PathLike, *, must_exist: bool = False) -> Path:
        return confine(self.root, user_path, must_exist=must_exist)

    def rel(self, path: str | os.PathLike) -> str:
        """The path as shown to the user: relative to the root when inside it."""
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.root)) or "."
        except ValueError:
            return str(p)

    runs = _Under("runs")
    configs = _Under("configs")
    models = _Under("models")
    datasets = _Under("datasets")
    outputs = _Under("outputs")
    queue_file = _Under("queue.json")

    def fresh_dir(self, parent: Path, name: str = "") -> Path:
        """parent/<name> that does not exist yet (a taken name gets a numeric suffix; no name: a timestamp)."""
        base = check_name(name) if (name or "").strip() else time.strftime("%Y%m%d-%H%M%S")
        path, i = parent / base, 1
        while path.exists():
            i += 1
            path = parent / f"{base}-{i}"
        return path

    def new_run_dir(self, name: str = "") -> Path:
        return self.fresh_dir(self.runs, name)

    def run_dirs(self) -> list[Path]:
        """Run folders (those with a config.toml), newest first."""
        if not self.runs.is_dir():
            return []
        found = [p for p in self.runs.iterdir() if p.is_dir() and (p / "config.toml").is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
