"""A comparison grid's folder as `lora-sd grid` writes it, read as it fills in: request.json (what the
page asked for), cells/r<row>_c<col>.png as each cell is done (its generation parameters in the PNG's text),
grid.png and index.json at the end."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ..workspace import Workspace
from .evals import read_json

REQUEST, INDEX, GRID_PNG, PENDING = "request.json", "index.json", "grid.png", "pending.png"


def png_parameters(path: Path) -> dict:
    """The generation parameters `lora-sd generate` / `grid` store in a PNG's text chunks."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    out = {}
    for k, v in text.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    return out


def write_pending_png(path: Path) -> None:
    """The grey placeholder shown for a cell not done yet."""
    Image.new("RGB", (32, 32), (229, 231, 235)).save(path)


class GridFolder:
    def __init__(self, path: Path, ws: Workspace):
        self.path, self.ws = path, ws
        self.request = read_json(path / REQUEST)

    @property
    def cols(self) -> int:
        return max(1, int(self.request.get("cols", 1)))

    @property
    def total(self) -> int:
        return int(self.request.get("rows", 1)) * int(self.request.get("cols", 1))

    def cell_pngs(self) -> list[Path]:
        """The cells done so far."""
        cells = self.path / "cells"
        return sorted(cells.glob("r*_c*.png")) if cells.is_dir() else []

    def cells(self) -> list[tuple[str, str]]:
        """(png, caption) of every cell in row-major order; a cell not done yet shows a grey placeholder."""
        items = []
        for r, ylab in enumerate(self.request.get("y_labels", [""])):
            for c, xlab in enumerate(self.request.get("x_labels", [])):
                png = self.path / "cells" / f"r{r}_c{c}.png"
                cap = " / ".join(x for x in (ylab, xlab) if x)
                items.append((str(png if png.is_file() else self.path / PENDING), cap if png.is_file() else cap + " ..."))
        return items

    def cell_params(self, index: int) -> dict:
        """The parameters of cell `index` (row-major): its index.json entry, else its PNG's parameters."""
        row, col = divmod(int(index), self.cols)
        entry = next((c for c in read_json(self.path / INDEX).get("cells", []) if (c["row"], c["col"]) == (row, col)),
                     None)
        if entry is not None:
            return {"row": row, "col": col, **entry}
        png = self.path / "cells" / f"r{row}_c{col}.png"
        if not png.is_file():
            return {"row": row, "col": col, "state": "not generated yet"}
        return {"row": row, "col": col, "png": self.ws.rel(png), **png_parameters(png)}
