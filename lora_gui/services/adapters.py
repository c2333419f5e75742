"""Adapter files of the workspace: list, inspect, convert, merge, delete. Listing and inspecting
read headers only (lora_gui.adapters); every operation on weights runs in a CLI subprocess."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

from lora_core.adapter_files import block_names, build_report, open_view
from lora_core.errors import LoraLoadError
from lora_core.config import LoraConfig
from lora_core.files import atomic_write_json

from .. import adapters, clirun, configs
from ..clirun import run_cli
from ..errors import UserError
from ..workspace import Workspace, check_name

COLUMNS = ("file", "format", "base_model", "rank", "alpha", "targets", "steps", "size_kb")
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_(A|B|down|up)(?:\.default)?\.weight")
_KOHYA = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}


class AdapterService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def rows(self, base: str = "tiny", compute: bool = False) -> list[list]:
        """One row per adapter file: its description, then whether it fits `base` (header shapes against the
        base's cached module list; '?' while that list is not cached and not `compute`)."""
        return [[r.get(c, "") for c in COLUMNS] + [self.fit_label(r["file"], base, compute)]
                for r in adapters.adapter_table(self.ws)]

    def fit_label(self, file: str, base: str, compute: bool = False) -> str:
        try:
            fits, rep = quick_fit(self.ws, self.ws.resolve(file, must_exist=True), base, compute)
        except ValueError:   # the base's module list could not be made (e.g. a model of the other kind)
            return "?"
        return "?" if fits is None else "fits" if fits else "does not fit: " + ", ".join(rep.get("bad_blocks", [])[:3])

    def fit(self, file: str, base: str) -> tuple[Optional[bool], dict]:
        """The fit badge's answer for one adapter file (computing the base's module list once if needed)."""
        return quick_fit(self.ws, self.resolve(file), base)

    def files(self) -> list[str]:
        return [self.ws.rel(p) for p in adapters.find_adapters(self.ws)]

    def resolve(self, file: str) -> Path:
        """The adapter file of this workspace named `file` (UserError otherwise)."""
        if not (file or "").strip():
            raise UserError("choose an adapter file first")
        path = self.ws.resolve(file, must_exist=True)
        if path not in adapters.find_adapters(self.ws):
            raise UserError(f"{file} is not an adapter file of this workspace")
        return path

    def inspect(self, file: str) -> dict:
        """What `lora-sd inspect --json` / `lora-llm inspect --json` print (the same header-only function)."""
        return adapters.inspect(self.resolve(file))

    def convert(self, file: str, to: str, out_name: str) -> str:
        path = self.resolve(file)
        if to not in ("kohya", "diffusers"):
            raise UserError(f"convert to kohya or diffusers, not {to!r}")
        name = check_name(out_name or f"{path.stem}_{to}.safetensors", "output file name")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        dst = self.ws.outputs / "adapters" / name
        if dst.exists():
            raise UserError(f"{self.ws.rel(dst)} exists already: choose another name")
        run_cli("lora_sd.cli", ["convert", str(path), str(dst), "--to", to], self.ws.root, 600)
        return f"wrote {self.ws.rel(dst)}"

    def merge(self, file: str, base: str, out_name: str) -> str:
        path = self.resolve(file)
        model = configs.resolve_model_ref(self.ws, base, "Base model")
        name = check_name(out_name, "output folder name")
        dst = self.ws.outputs / "merged" / name
        if dst.exists():
            raise UserError(f"{self.ws.rel(dst)} exists already: choose another name")
        cli = adapters.cli_for(adapters.describe(path, self.ws))
        args = (["merge", str(path), "--out", str(dst)] if cli == "lora_llm.cli"
                else ["merge", "--model", model, "--lora", str(path), "--out", str(dst)])
        run_cli(cli, args, self.ws.root, 1800)
        return f"merged into {self.ws.rel(dst)}"

    def delete(self, file: str) -> str:
        return f"deleted {adapters.safe_delete(self.resolve(file), self.ws)}"


# ---------------------------------------------------------------- the fit badge, without loading the base
def base_modules(ws: Workspace, cli: str, base: str, compute: bool = True) -> Optional[dict]:
    """{module: [in, out]} of the adaptable modules of base model `base` (`<cli> inspect --base MODEL`, one
    model load), cached in outputs/base-modules/ by CLI and model reference; None when not cached and not
    `compute`."""
    model = configs.resolve_model_ref(ws, base or "tiny", "Base model")
    cache = ws.outputs / "base-modules" / (hashlib.sha1(f"{cli} {model}".encode()).hexdigest()[:16] + ".json")
    if cache.is_file():
        return json.loads(cache.read_text())["modules"]
    if not compute:
        return None
    out = clirun.parse_json(run_cli(cli, ["inspect", "--base", model, "--json"], ws.root, 900), "inspect --base")
    atomic_write_json(cache, {**out, "cli": cli})
    return out["modules"]


def _aliases(module: str) -> list[str]:
    """The names a file may give a base module: kohya's (lora_unet_down_blocks_0_...), and for text encoders
    also with transformers' `text_model` level, which our files and kohya's write even where the loaded
    CLIPTextModel has none."""
    comp, _, rest = module.partition(".")
    rests = [rest] + ([f"text_model.{rest}"] if comp.startswith("text_encoder") and
                      not rest.startswith("text_model.") else [])
    return [f"{comp}.{r}" for r in rests[1:]] + [pre + r.replace(".", "_") for r in rests
                                                  for pre in _KOHYA.get(comp, ())]


def adapter_shapes(path: Path, modules: dict) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of an adapter file from its header alone (A / lora_down: [r, in, ...], B / lora_up:
    [out, r, ...]); kohya names (lora_unet_down_blocks_0_...) are mapped onto the base's module names."""
    kohya = {alias: k for k in modules for alias in _aliases(k)}
    h = open_view(path).header
    own: dict[str, list[int]] = {}
    for key in h.tensors:
        m = _LORA_KEY.fullmatch(key)
        if m:
            name, down = kohya.get(m.group(1), m.group(1)), m.group(2) in ("A", "down")
            own.setdefault(name, [0, 0])[0 if down else 1] = h.shape(key)[1 if down else 0]
    return {k: (v[0], v[1]) for k, v in own.items()}


def quick_fit(ws: Workspace, path: Path, base: str, compute: bool = True) -> tuple[Optional[bool], dict]:
    """(fits, load report) of an adapter file against `base`, comparing header shapes with the cached module
    list of the base (no model load here); (None, {...why}) when the base is not described yet."""
    try:
        desc = adapters.inspect(path)
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
