"""Adapter files in the workspace: find them, describe them from the safetensors header alone
(lora_core.adapter_files: one detector, one `inspect`, no torch in the GUI process). The CLI calls
on them (convert, merge) are lora_gui.clirun."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from lora_core import adapter_files
from lora_core.errors import LoraLoadError

from .workspace import Workspace

SKIP_NAMES = re.compile(r"^(trainable|rng_rank\d+)\.safetensors$")
SCAN_DIRS = ("runs", "outputs", "adapters")


class AdapterError(ValueError):
    pass


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file."""
    h = adapter_files.read_header(path)
    return h.tensors, h.metadata


def inspect(path: Path) -> dict:
    """The description `lora-sd inspect --json` / `lora-llm inspect --json` print (the same function)."""
    return adapter_files.inspect(path)


def describe(path: Path, ws: Workspace) -> dict:
    """One table row: file, format, base model, rank(s), alpha(s), number of targets, steps, size."""
    d = inspect(path)
    return {**d, "file": ws.rel(path), "rank": ",".join(map(str, d["ranks"])),
            "alpha": ",".join(map(str, d["alphas"]))}


def find_adapters(ws: Workspace) -> list[Path]:
    """Every adapter file under runs/, outputs/ and adapters/ (not the trainer's checkpoint state)."""
    found = []
    for sub in SCAN_DIRS:
        base = ws.root / sub
        if not base.is_dir():
            continue
        for p in base.rglob("*.safetensors"):
            rel = p.relative_to(base).parts
            if SKIP_NAMES.match(p.name) or "checkpoints" in rel or any(x.startswith(".") for x in rel):
                continue
            if p.is_symlink() or not p.is_file() or not is_adapter(p):
                continue
            found.append(p)
    return sorted(found)


def is_adapter(path: Path) -> bool:
    """A LoRA file of a registered format (not a model's weights, e.g. of a merged model under outputs/)."""
    try:
        return adapter_files.detect(path).known
    except LoraLoadError:
        return False


def adapter_table(ws: Workspace) -> list[dict]:
    return [describe(p, ws) for p in find_adapters(ws)]


def cli_for(desc: dict) -> str:
    """The CLI module that reads this adapter, as its format's registration says."""
    return desc["cli"]


def safe_delete(path: Path, ws: Workspace) -> Optional[str]:
    """Delete one adapter file that lives in the workspace (and a sibling peft/ export stays)."""
    p = ws.resolve(path, must_exist=True)
    if p not in find_adapters(ws):
        raise AdapterError(f"{ws.rel(p)} is not an adapter file of this workspace")
    p.unlink()
    return ws.rel(p)
