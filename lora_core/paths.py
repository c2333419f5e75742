"""Where the optional offline data lives (`../shared` in this project's checkouts)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def shared_dir() -> Optional[Path]:
    """$LORA_SHARED_DIR when set (a missing folder then means "no shared data"), else ../shared
    next to the project checkout; None when absent."""
    env = os.environ.get("LORA_SHARED_DIR")
    c = Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared"
    return c if c.is_dir() else None


def shared_path(*parts: str) -> Optional[Path]:
    root = shared_dir()
    if root is None:
        return None
    p = root.joinpath(*parts)
    return p if p.exists() else None
