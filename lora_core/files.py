"""Atomic file writes: no torch, usable by the GUI process and every backend.

A file is written to a temporary name beside its target and renamed into place, so a reader sees
the old or the new content, never half a file. The result keeps the user's umask (mkstemp's 0600
is widened to what a plain open() would have created).

Outputs never replace what exists: `check_output` refuses an output that is one of the inputs, or that
holds earlier results (unless --overwrite), before any work; `room_for` then moves the earlier results
aside (`move_aside`: NAME.old-<time>, the one name for everything --overwrite replaces, run folders too).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional, Union

from .errors import OutputExistsError

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: PathLike):
    """Yield a temporary path next to `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------ outputs that never replace what exists
def move_aside(path: PathLike) -> Path:
    """Rename `path` (a file or a folder) to PATH.old-<YYYYmmdd-HHMMSS>[-n] beside it, the one name every
    command gives what --overwrite replaces (nothing is deleted); returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    os.rename(path, aside)
    return aside


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when a and b name the same file or folder (same resolved path, or the same file through a link)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    return same_path(inner, outer) or outer.expanduser().resolve() in inner.expanduser().resolve().parents


def existing_results(out: PathLike, results: Optional[Iterable[str]] = None) -> list[Path]:
    """What a command writing `out` would replace: `out` itself when it is a file or a folder holding
    anything (results None), else the entries named `results` inside the folder `out`."""
    out = Path(out)
    if results is None:
        held = out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))
        return [out] if held else []
    return [out / r for r in results if (out / r).exists() or (out / r).is_symlink()] if out.is_dir() else []


def check_output(out: PathLike, *, inputs: Iterable[PathLike] = (), overwrite: bool = False,
                 results: Optional[Iterable[str]] = None, flag: str = "output") -> list[Path]:
    """Read-only check of a command's output before any work: an output (a result inside it, when
    `results` names them) that is or holds one of the inputs is refused even with overwrite; earlier
    results there (see existing_results) are refused unless overwrite. Returns the earlier results (what
    `room_for` moves aside). Raises OutputExistsError."""
    out, results = Path(out), None if results is None else list(results)
    targets = [out] if results is None else [out / r for r in results]
    for src in inputs:
        if src and Path(src).expanduser().exists() and any(_inside(Path(src), t) for t in targets):
            raise OutputExistsError(f"{flag} {out}: is the input {src} (or holds it); write to another path, "
                                    "the input is never replaced")
    if results is not None and (out.is_file() or out.is_symlink() and not out.is_dir()):
        raise OutputExistsError(f"{flag} {out}: is a file, and the results need a folder there; choose another path")
    found = existing_results(out, results)
    if found and not overwrite:
        shown = "" if results is None else " (" + ", ".join(p.name for p in found[:3]) + (
            ", ..." if len(found) > 3 else "") + ")"
        what = "exists already" if results is None else "holds earlier results"
        raise OutputExistsError(f"{flag} {out}: {what}{shown}; choose another path, or add --overwrite "
                                "(the old one is moved aside to NAME.old-<time>, not deleted)")
    return found


@contextmanager
def room_for(found: Iterable[PathLike]):
    """Around the writing of an output: move the earlier results that check_output found aside, and yield
    the (old path, where it is now) pairs; when the writing fails, the old ones come back (where nothing new
    took their place)."""
    moved = [(Path(p), move_aside(p)) for p in found if Path(p).exists() or Path(p).is_symlink()]
    try:
        yield moved
    except BaseException:
        for old, aside in moved:
            if not (old.exists() or old.is_symlink()):
                os.rename(aside, old)
        raise
