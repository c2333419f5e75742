"""The training data's fingerprint: what a run trained on, so that `--resume` refuses data that changed since
(torch-free; the run protocol, lora_core.run.run_job, records and compares it).

Each trainer names its data files (`DataFile`: a kind for messages such as "image" or "caption", a name relative
to its data folder, and the path; a data source with no local file, a hub dataset split, has no path and is
compared by its name). `fingerprint` records each file's size, mtime_ns and sha256 in the run folder
(`FINGERPRINT_FILE`, copied into each checkpoint). A resume takes the fingerprint again with the recorded one
as `known`: a file whose size and mtime_ns are unchanged keeps its recorded hash without being read, so a
resume over 10,000 untouched images costs 10,000 stat calls; any other file is read and hashed, so a file
that was only touched or copied (new mtime, same bytes) counts as unchanged and a caption edited to another
text of the same length does not. `change_line` names what differs.

Why a content hash, and not size + mtime_ns alone: mtime alone would refuse a resume after a plain copy,
a `git checkout` or a `touch` of untouched data, while the hash costs one sequential read of each file
once, at the start, where the trainers read every file anyway (lora_sd.data.scan decodes every image in
full; the latent cache hashes each one). What a stat-only resume could miss is a content change that keeps
both the size and the mtime to the nanosecond, which takes a deliberate `touch -d`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional


FINGERPRINT_FILE = "data_fingerprint.json"
VERSION = 1
SHOWN_NAMES = 6   # names listed in a change line before "..."
HOW = ("changed", "added", "removed")


@dataclass(frozen=True)
class DataFile:
    kind: str                # what a message calls it: "image", "caption", "mask", "reg image", "file", ...
    name: str                # its key: a path relative to the data folder ("10_dog/a.png"), unique in the list
    path: Optional[Path]     # None: a source with no local file (compared by name only)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(f: DataFile, known: dict) -> dict:
    if f.path is None:
        return {"kind": f.kind}
    st = os.stat(f.path)
    old = known.get(f.name) or {}
    same = old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256")
    return {"kind": f.kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": old["sha256"] if same else file_digest(f.path)}


def fingerprint(files: Iterable[DataFile], known: Optional[dict] = None) -> dict:
    """{"version", "files": {name: {kind, size, mtime_ns, sha256}}}; a file whose size and mtime_ns match its
    entry in `known` (an earlier fingerprint) keeps that entry's hash unread."""
    old = (known or {}).get("files", {})
    return {"version": VERSION, "files": {f.name: _entry(f, old) for f in sorted(files, key=lambda f: f.name)}}


def _plural(n: int, kind: str) -> str:
    return f"{n} {kind}" + ("" if n == 1 else "s")


def change_line(old: dict, new: dict) -> str:
    """What differs between two fingerprints, as one line ("" when nothing does): "2 images changed, 1 caption
    added (a.png, b.png, a.txt)"; a file whose bytes are the same counts as unchanged, whatever its mtime."""
    a, b = old.get("files", {}), new.get("files", {})
    found: dict[tuple[str, str], list[str]] = {}   # (kind, how) -> names
    for name in sorted(set(a) | set(b)):
        if name not in a:
            found.setdefault((b[name]["kind"], "added"), []).append(name)
        elif name not in b:
            found.setdefault((a[name]["kind"], "removed"), []).append(name)
        elif a[name].get("sha256") != b[name].get("sha256") or a[name]["kind"] != b[name]["kind"]:
            found.setdefault((b[name]["kind"], "changed"), []).append(name)
    if not found:
        return ""
    keys = sorted(found, key=lambda k: (HOW.index(k[1]), k[0]))
    counts = ", ".join(f"{_plural(len(found[k]), k[0])} {k[1]}" for k in keys)
    names = [n for k in keys for n in found[k]]
    shown = ", ".join(names[:SHOWN_NAMES]) + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES
                                               else "")
    return f"{counts} ({shown})"


def read_fingerprint(path: Path) -> Optional[dict]:
    """The fingerprint saved at `path`; None when there is none (a run made before fingerprints) or it
    cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


__all__ = ["FINGERPRINT_FILE", "DataFile", "file_digest", "fingerprint", "change_line", "read_fingerprint"]
