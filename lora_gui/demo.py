"""The offline default: a small captioned dataset written into a fresh workspace, so that the tiny
pretrained SD model ("tiny") learns a new concept with one click on a machine with no model hub and no
../shared data: 20 images of the held-out colour "purple" from the synthetic shapes world
(lora_sd.synth, numpy + PIL only: the GUI process stays torch-free)."""
from __future__ import annotations

from pathlib import Path

from lora_sd import synth

from .workspace import Workspace

DEMO_CONCEPT, DEMO_IMAGES, DEMO_SEED = "purple", 20, 100   # = configs/sd_synth_purple.toml's data
REG_IMAGES, REG_SEED = 40, 101   # its data.reg_path: the known concepts' prior-preservation images


def ensure_demo_dataset(ws: Workspace, size: int = 64) -> Path:
    """datasets/demo: 20 purple shapes with kohya-style .txt captions, and beside it datasets/demo_base (see
    demo_reg_folder): 40 images of the known colours and shapes; each kept if it already has images."""
    _ensure(demo_reg_folder(ws.datasets / "demo"), REG_IMAGES, REG_SEED, "base", size)
    return _ensure(ws.datasets / "demo", DEMO_IMAGES, DEMO_SEED, DEMO_CONCEPT, size)


def demo_reg_folder(demo: Path) -> Path:
    return demo.with_name("demo_base")


def _ensure(folder: Path, n: int, seed: int, concept: str, size: int) -> Path:
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    if folder.is_dir():   # the user's folder without images: add them, delete nothing
        return synth.write_folder(folder, n, seed, concept, size)
    tmp = folder.with_name(f".{folder.name}.tmp")   # written beside, renamed into place when complete
    synth.write_folder(tmp, n, seed, concept, size)
    tmp.rename(folder)
    return folder
