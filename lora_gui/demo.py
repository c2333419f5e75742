"""The offline default: a small captioned dataset written into a fresh workspace, so that the tiny
pretrained SD model ("tiny") learns a new concept with one click on a machine with no model hub and no
../shared data: 20 images of the held-out colour "purple" from the synthetic shapes world
(lora_sd.synth, numpy + PIL only: the GUI process stays torch-free)."""
from __future__ import annotations

from pathlib import Path

from .workspace import Workspace

DEMO_CONCEPT, DEMO_IMAGES, DEMO_SEED = "purple", 20, 100   # = configs/sd_synth_purple.toml's data


def ensure_demo_dataset(ws: Workspace, size: int = 64) -> Path:
    """datasets/demo: 20 purple shapes with kohya-style .txt captions (kept if it already has images)."""
    from lora_sd import synth
    folder = ws.datasets / "demo"
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    if folder.is_dir():   # the user's folder without images: add them, delete nothing
        return synth.write_folder(folder, DEMO_IMAGES, DEMO_SEED, DEMO_CONCEPT, size)
    tmp = ws.datasets / ".demo.tmp"   # written beside, renamed into place when complete
    synth.write_folder(tmp, DEMO_IMAGES, DEMO_SEED, DEMO_CONCEPT, size)
    tmp.rename(folder)
    return folder
