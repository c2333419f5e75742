"""Adapter files in the workspace: find them, read their metadata from the safetensors header
(no tensor is loaded). The CLI calls on them are lora_gui.clirun."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Optional

from .workspace import Workspace

SKIP_NAMES = re.compile(r"^(trainable|rng_rank\d+)\.safetensors$")
SCAN_DIRS = ("runs", "outputs", "adapters")
MAX_HEADER = 100 * 1024 * 1024


class AdapterError(ValueError):
    pass


def read_header(path: Path) -> tuple[dict, dict]:
    """(tensor entries {name: {"dtype", "shape"}}, metadata) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise AdapterError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise AdapterError(f"{path.name}: not a safetensors file (header size {n})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path.name}: not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    return header, meta


def detect_format(keys: list[str], meta: dict) -> str:
    if meta.get("format") == "lora_core":
        return "lora_core"
    if any(".lora_down." in k for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if any(".lora_A." in k for k in keys):
        return "peft"
    return "unknown"


def _targets(keys: list[str]) -> list[str]:
    out = set()
    for k in keys:
        m = re.match(r"(.+?)\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)(\.[^.]+)*\.weight$", k)
        if m:
            out.add(m.group(1))
    return sorted(out)


def describe(path: Path, ws: Workspace) -> dict:
    """Metadata of one adapter file: format, base model, rank, alpha, targets, steps, size."""
    header, meta = read_header(path)
    keys = list(header)
    fmt = detect_format(keys, meta)
    ranks = {v["shape"][0] for k, v in header.items() if (".lora_A." in k or ".lora_down." in k or ".lora.down." in k)
             and v.get("shape")}
    alpha = meta.get("alpha") or meta.get("ss_network_alpha")
    if alpha is None:
        alphas = [k for k in keys if k.endswith(".alpha")]
        alpha = "per-module" if alphas else ""
    lc = {}
    if "lora_config" in meta:
        try:
            lc = json.loads(meta["lora_config"])
        except json.JSONDecodeError:
            lc = {}
    return {
        "file": ws.rel(path),
        "format": fmt,
        "base_model": meta.get("base_model") or meta.get("ss_sd_model_name") or meta.get("modelspec.architecture", ""),
        "rank": meta.get("r") or meta.get("ss_network_dim") or (",".join(map(str, sorted(ranks))) if ranks else ""),
        "alpha": str(alpha if alpha is not None else lc.get("alpha", "")),
        "targets": len(_targets(keys)),
        "steps": meta.get("steps") or meta.get("ss_steps") or meta.get("global_step", ""),
        "size_kb": round(path.stat().st_size / 1024, 1),
    }


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
    """A LoRA file (not a model's weights, e.g. of a merged model under outputs/)."""
    try:
        header, meta = read_header(path)
    except AdapterError:
        return False
    return detect_format(list(header), meta) != "unknown"


def adapter_table(ws: Workspace) -> list[dict]:
    return [describe(p, ws) for p in find_adapters(ws)]


def cli_for(desc: dict) -> str:
    """lora_llm.cli for LLM adapters (lora_core format from lora-llm), lora_sd.cli otherwise."""
    return "lora_llm.cli" if desc.get("format") in ("lora_core", "peft") else "lora_sd.cli"


def safe_delete(path: Path, ws: Workspace) -> Optional[str]:
    """Delete one adapter file that lives in the workspace (and a sibling peft/ export stays)."""
    p = ws.resolve(path, must_exist=True)
    if p not in find_adapters(ws):
        raise AdapterError(f"{ws.rel(p)} is not an adapter file of this workspace")
    p.unlink()
    return ws.rel(p)
