"""Whether an adapter file fits a base model, without loading either: the header's shapes against the
base's module list (made once per base by `<cli> inspect --base MODEL` and cached under
outputs/base-modules/); and the fit badge the pages show for an answer (this one or the CLI's full check,
lora_gui.services.preflight)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from lora_core import adapter_files
from lora_core.adapter_files import block_names, build_report, open_view
from lora_core.config import LoraConfig
from lora_core.errors import LoraLoadError
from lora_core.files import atomic_write_json
from lora_sd.adapter_formats import KOHYA_PREFIXES, file_arch, native_split
from lora_sd.mmdit_names import MMDIT_ARCHS

from .. import clirun
from ..clirun import run_cli
from ..model_refs import resolve_model_ref
from ..workspace import Workspace

LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_(A|B|down|up)(?:\.default)?\.weight")


def base_modules(ws: Workspace, cli: str, base: str, compute: bool = True) -> Optional[dict]:
    """{module: [in, out]} of the adaptable modules of base model `base` (`<cli> inspect --base MODEL`, one
    model load), cached in outputs/base-modules/ by CLI and model reference; None when not cached and not
    `compute`."""
    model = resolve_model_ref(ws, base or "tiny", "Base model")
    cache = ws.outputs / "base-modules" / (hashlib.sha1(f"{cli} {model}".encode()).hexdigest()[:16] + ".json")
    if cache.is_file():
        return json.loads(cache.read_text())["modules"]
    if not compute:
        return None
    out = clirun.parse_json(run_cli(cli, ["inspect", "--base", model, "--json"], ws.root, 900), "inspect --base")
    atomic_write_json(cache, {**out, "cli": cli})
    return out["modules"]


def module_aliases(module: str) -> list[str]:
    """The names a file may give a base module: kohya's (lora_unet_down_blocks_0_...), and for text encoders
    also with transformers' `text_model` level, which our files and kohya's write even where the loaded
    CLIPTextModel has none."""
    comp, _, rest = module.partition(".")
    rests = [rest] + ([f"text_model.{rest}"] if comp.startswith("text_encoder") and
                      not rest.startswith("text_model.") else [])
    return [f"{comp}.{r}" for r in rests[1:]] + [pre + r.replace(".", "_") for r in rests
                                                  for pre, c in KOHYA_PREFIXES if c == comp]


def adapter_shapes(path: Path, modules: dict) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of an adapter file from its header alone (A / lora_down: [r, in, ...], B / lora_up:
    [out, r, ...]); kohya names (lora_unet_down_blocks_0_...) are mapped onto the base's module names, SD 3.x /
    Flux native ones (a fused qkv: its parts) by lora_sd.adapter_formats' native reader."""
    view = open_view(path)
    own: dict[str, list[int]] = {}
    for key in view.header.tensors:
        m = LORA_KEY.fullmatch(key)
        if m:
            down = m.group(2) in ("A", "down")
            own.setdefault(m.group(1), [0, 0])[0 if down else 1] = view.header.shape(key)[1 if down else 0]
    arch = file_arch(view.metadata, {name: shape[0] for name, shape in own.items()})
    if arch in MMDIT_ARCHS:
        own = dict(kv for name, (i, o) in own.items() for kv in _native_shapes(arch, name, i, o))
    kohya = {alias: k for k in modules for alias in module_aliases(k)}
    return {kohya.get(name, name): (i, o) for name, (i, o) in own.items()}


def _native_shapes(arch: str, name: str, in_features: int, out_features: int) -> list[tuple[str, tuple[int, int]]]:
    """[(base module, (in, out))] of one module of an SD 3.x / Flux file: a kohya name's parts, else the name
    itself (diffusers' names; a name or shape the architecture does not have stays as the file spells it, and
    the report shows it unmatched)."""
    if not name.startswith("lora_"):
        return [(name, (in_features, out_features))]
    try:
        parts = native_split(arch, name, in_features, out_features)
    except (KeyError, ValueError):
        return [(name, (in_features, out_features))]
    return [(module, (in_features, width)) for module, width in parts.items()]


def header_fit(ws: Workspace, path: Path, base: str, compute: bool = True) -> tuple[Optional[bool], dict]:
    """(fits, load report) of an adapter file against `base`, comparing header shapes with the cached module
    list of the base (no model load here); (None, {...why}) when the base is not described yet."""
    try:
        desc = adapter_files.inspect(path)
    except (LoraLoadError, OSError) as e:
        return False, {"file": ws.rel(path), "error": str(e)}
    modules = base_modules(ws, desc.get("cli") or "lora_sd.cli", base, compute)
    if modules is None:
        return None, {"file": ws.rel(path), "base": base, "note": "the base model is not described yet"}
    lcfg = LoraConfig(fused_slices=(desc.get("metadata", {}) and _json(desc["metadata"].get("lora_config"))
                                    ).get("fused_slices") or {})
    rep = build_report(ws.rel(path), desc.get("base_model", ""), adapter_shapes(path, modules),
                       {k: tuple(v) for k, v in modules.items()}, lambda k: block_names([k])[0], base,
                       slices=lcfg.slices_for)
    return rep.fits, {**rep.to_dict(), "check": "header shapes vs the base's module list (no model load)"}


def _json(text) -> dict:
    try:
        return json.loads(text or "{}")
    except (TypeError, json.JSONDecodeError):
        return {}


def badge(fits: Optional[bool], rep: Optional[dict] = None) -> str:
    """The fit badge: green 'fits', red 'does not fit' (with the bad blocks), grey when not checked."""
    if fits is None:
        return '<span class="fit-badge" data-fits="unknown" style="color:#6b7280">fit: not checked</span>'
    if fits:
        return (f'<span class="fit-badge" data-fits="yes" style="background:#16a34a;color:white;padding:2px 8px;'
                f'border-radius:8px">fits ({(rep or {}).get("matched", "?")} modules)</span>')
    bad = ", ".join((rep or {}).get("bad_blocks", [])[:4])
    return ('<span class="fit-badge" data-fits="no" style="background:#dc2626;color:white;padding:2px 8px;'
            f'border-radius:8px">does not fit{": " + bad if bad else ""}</span>')
