"""The adapter files of the workspace: find them under runs/, outputs/ and adapters/ and describe each
from its safetensors header alone (lora_core.adapter_files.inspect, the description `lora-sd inspect` and
`lora-llm inspect` print; no torch in the GUI process)."""
from __future__ import annotations

import re
from pathlib import Path

from lora_core import adapter_files
from lora_core.errors import LoraLoadError

from .workspace import Workspace

SKIP_NAMES = re.compile(r"^(trainable|rng_rank\d+)\.safetensors$")
SCAN_DIRS = ("runs", "outputs", "adapters")


def describe(path: Path, ws: Workspace) -> dict:
    """One table row: file, format, base model, rank(s), alpha(s), number of targets, steps, size, and the
    adapter type(s) ("lora", "loha", "lokr", "oft", "full": weight differences; "loha+lokr" for a file that mixes them)."""
    d = adapter_files.inspect(path)
    return {**d, "file": ws.rel(path), "rank": ",".join(map(str, d["ranks"])),
            "alpha": ",".join(map(str, d["alphas"])), "type": adapter_type(d)}


def adapter_type(description: dict) -> str:
    """The adapter type(s) of an inspect description (its `adapter_types`; lora when it names none)."""
    return "+".join(t for t, n in sorted((description.get("adapter_types") or {"lora": 1}).items()) if n) or "lora"


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
