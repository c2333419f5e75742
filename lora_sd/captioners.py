"""Captioning models installed locally, recognised from their files (torch-free: the GUI lists them; the
captioning itself is `lora-sd caption`, lora_sd.caption).

A BLIP captioning model is a folder holding transformers' BlipForConditionalGeneration (config.json with
model_type "blip"), its weights as .safetensors and its processor's files, as `save_pretrained` writes them or
`huggingface-cli download Salesforce/blip-image-captioning-base --local-dir DIR` fetches them. Nothing is ever
downloaded here. A WD14-style tagger folder (model.onnx + selected_tags.csv) is recognised and refused with what
to use instead (it needs onnxruntime, which this project does not install).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CaptionError

BLIP_EXAMPLE = "Salesforce/blip-image-captioning-base"
INSTALL_HINT = (f"put a BLIP captioning model folder there, e.g. `huggingface-cli download {BLIP_EXAMPLE} "
                "--local-dir {where}/blip-base` (nothing is downloaded for you)")


def check_captioner(folder) -> Path:
    """`folder` when it holds a BLIP captioning model lora-sd caption can run; else CaptionError saying why."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CaptionError(f"--model {folder}: not a folder; give a local BLIP captioning model folder "
                           f"(e.g. {BLIP_EXAMPLE}, downloaded yourself)")
    if (path / "model.onnx").is_file() and (path / "selected_tags.csv").is_file():
        raise CaptionError(f"--model {folder}: a WD14-style ONNX tagger, which lora-sd caption does not run; "
                           f"use a BLIP captioning model folder (e.g. {BLIP_EXAMPLE})")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CaptionError(f"--model {folder}: no readable config.json; give a transformers BLIP captioning model "
                           "folder") from None
    archs = config.get("architectures") or ["BlipForConditionalGeneration"]
    if config.get("model_type") != "blip" or "BlipForConditionalGeneration" not in archs:
        raise CaptionError(f"--model {folder}: a {config.get('model_type') or 'unknown'} model "
                           f"({', '.join(archs)}), not a BLIP captioning model (BlipForConditionalGeneration)")
    if not any(path.glob("*.safetensors")):
        raise CaptionError(f"--model {folder}: no .safetensors weights (pickled .bin weights are never loaded); "
                           "save or download the safetensors version")
    return path


def find_captioners(root) -> list[Path]:
    """The captioning model folders lora-sd caption can run among `root`'s folders and their subfolders."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for config in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        try:
            found.append(check_captioner(config.parent))
        except CaptionError:
            continue
    return found
