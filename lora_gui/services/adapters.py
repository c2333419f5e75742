"""Adapter files of the workspace: list, inspect, convert, merge, delete. Listing and inspecting
read headers only (lora_gui.adapters); every operation on weights runs in a CLI subprocess."""
from __future__ import annotations

from pathlib import Path

from .. import adapters, configs
from ..clirun import run_cli
from ..errors import UserError
from ..workspace import Workspace, check_name

COLUMNS = ("file", "format", "base_model", "rank", "alpha", "targets", "steps", "size_kb")


class AdapterService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def rows(self) -> list[list]:
        return [[r.get(c, "") for c in COLUMNS] for r in adapters.adapter_table(self.ws)]

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
