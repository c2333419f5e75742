"""Adapter files of the workspace: list, inspect, convert, merge, delete, and the quick fit against a base
model. Listing and inspecting read headers only (lora_gui.adapter_scan, lora_gui.services.fit); every
operation on weights runs in a CLI subprocess."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lora_core import adapter_files

from ..adapter_scan import adapter_table, find_adapters
from ..clirun import run_cli
from ..errors import UserError
from ..model_refs import resolve_model_ref
from ..workspace import Workspace, check_name
from .fit import header_fit

COLUMNS = ("file", "format", "base_model", "rank", "alpha", "targets", "steps", "size_kb")


class AdapterService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def rows(self, base: str = "tiny", compute: bool = False) -> list[list]:
        """One row per adapter file: its description, then whether it fits `base` (header shapes against the
        base's cached module list; '?' while that list is not cached and not `compute`)."""
        return [[r.get(c, "") for c in COLUMNS] + [self.fit_label(r["file"], base, compute)]
                for r in adapter_table(self.ws)]

    def fit_label(self, file: str, base: str, compute: bool = False) -> str:
        try:
            fits, rep = header_fit(self.ws, self.ws.resolve(file, must_exist=True), base, compute)
        except ValueError:   # the base's module list could not be made (e.g. a model of the other kind)
            return "?"
        return "?" if fits is None else "fits" if fits else "does not fit: " + ", ".join(rep.get("bad_blocks", [])[:3])

    def fit(self, file: str, base: str) -> tuple[Optional[bool], dict]:
        """The fit badge's answer for one adapter file (computing the base's module list once if needed)."""
        return header_fit(self.ws, self.resolve(file), base)

    def files(self) -> list[str]:
        return [self.ws.rel(p) for p in find_adapters(self.ws)]

    def entries(self) -> list[tuple[str, str]]:
        """(label, file) per adapter for the Generate picker: a run folder's final adapter in its formats (the
        kohya `<output.name>.safetensors` and the diffusers `pytorch_lora_weights.safetensors`; an EMA copy is
        its own entry) is one entry labelled with each format, loading the first (kohya first); a file
        outside a run folder is an entry of its own."""
        groups: dict[tuple, list[dict]] = {}
        for d in adapter_table(self.ws):
            path = self.ws.root / d["file"]
            in_run = (path.parent / "config.toml").is_file()
            key = (str(path.parent), path.stem.endswith("_ema")) if in_run else (d["file"],)
            groups.setdefault(key, []).append(d)
        out = []
        for same in groups.values():
            same.sort(key=lambda d: (d["format"] != "kohya", d["file"]))
            also = "; ".join(f"{d['format']}: {Path(d['file']).name}" for d in same[1:])
            out.append((f"{same[0]['file']} ({same[0]['format']}{'; also ' + also if also else ''})", same[0]["file"]))
        return sorted(out, key=lambda e: e[1])

    def resolve(self, file: str) -> Path:
        """The adapter file of this workspace named `file` (UserError otherwise)."""
        if not (file or "").strip():
            raise UserError("choose an adapter file first")
        path = self.ws.resolve(file, must_exist=True)
        if path not in find_adapters(self.ws):
            raise UserError(f"{file} is not an adapter file of this workspace")
        return path

    def inspect(self, file: str) -> dict:
        """What `lora-sd inspect --json` / `lora-llm inspect --json` print (the same header-only function)."""
        return adapter_files.inspect(self.resolve(file))

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
        model = resolve_model_ref(self.ws, base, "Base model")
        name = check_name(out_name, "output folder name")
        dst = self.ws.outputs / "merged" / name
        if dst.exists():
            raise UserError(f"{self.ws.rel(dst)} exists already: choose another name")
        cli = adapter_files.inspect(path)["cli"]
        args = (["merge", str(path), "--out", str(dst)] if cli == "lora_llm.cli"
                else ["merge", "--model", model, "--lora", str(path), "--out", str(dst)])
        run_cli(cli, args, self.ws.root, 1800)
        return f"merged into {self.ws.rel(dst)}"

    def delete(self, file: str) -> str:
        path = self.resolve(file)
        path.unlink()   # a sibling peft/ export stays
        return f"deleted {self.ws.rel(path)}"
