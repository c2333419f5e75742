"""The offline default: a small captioned dataset written into a fresh workspace, so that the tiny
SD model trains with one click on a machine with no model hub and no ../shared data."""
from __future__ import annotations

from pathlib import Path

from .workspace import Workspace

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square")


def ensure_demo_dataset(ws: Workspace, size: int = 64) -> Path:
    """datasets/demo: 8 images (a coloured shape on a grey ground) with kohya-style .txt captions."""
    from PIL import Image, ImageDraw
    folder = ws.datasets / "demo"
    if folder.is_dir() and any(folder.glob("*.png")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            img = Image.new("RGB", (size, size), (128, 128, 128))
            d = ImageDraw.Draw(img)
            box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=rgb)
            stem = f"{color}_{shape}"
            img.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"a {color} {shape} on a grey background\n", encoding="utf-8")
    return folder
