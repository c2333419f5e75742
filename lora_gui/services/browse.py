"""The workspace's file browsers (Train's base model and dataset, Generate's and the Adapters tab's adapter):
what a path chosen in a browser rooted in the workspace stands for, confined to the workspace
(lora_gui.workspace.confine refuses anything outside it); typed model references (hub ids) stay the text
inputs' business (lora_gui.model_refs)."""
from __future__ import annotations

from ..adapter_scan import is_adapter
from ..errors import UserError
from ..workspace import Workspace

MODEL_FILES = (".safetensors", ".ckpt")   # a single-file checkpoint (the base-model input reads it)
MODEL_INDEX = "model_index.json"          # a diffusers pipeline folder


class BrowseService:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def dataset(self, chosen: str) -> str:
        """The dataset folder of a chosen path (a folder, or an image's folder), relative to the workspace."""
        path = self.ws.resolve(chosen, must_exist=True)
        return self.ws.rel(path if path.is_dir() else path.parent)

    def model(self, chosen: str) -> str:
        """The base model a chosen path belongs to: the diffusers folder (with model_index.json) holding it, else a
        single-file checkpoint (.safetensors / .ckpt that is not an adapter), relative to the workspace."""
        path = self.ws.resolve(chosen, must_exist=True)
        for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
            if folder != self.ws.root and self.ws.root not in folder.parents:
                break
            if (folder / MODEL_INDEX).is_file():
                return self.ws.rel(folder)
        if path.is_file() and path.suffix.lower() in MODEL_FILES and not is_adapter(path):
            return self.ws.rel(path)
        raise UserError(f"{self.ws.rel(path)}: not a base model; choose a diffusers folder (with {MODEL_INDEX}) or "
                        "a file inside it, or a single-file checkpoint (.safetensors / .ckpt)")

    def adapter(self, chosen: str) -> str:
        """A chosen adapter file (a LoRA of a registered format), relative to the workspace."""
        path = self.ws.resolve(chosen, must_exist=True)
        if not (path.is_file() and is_adapter(path)):
            raise UserError(f"{self.ws.rel(path)}: not an adapter file; choose a LoRA .safetensors (kohya, diffusers, "
                            "PEFT or lora_core)")
        return self.ws.rel(path)
