"""The kinds of form input, one class each: which Gradio component shows a config field (named with its
keyword arguments, so this module needs no Gradio), how a config value is shown in it and how the shown
value is parsed back into a config value.

A field's kind follows from its declared type (`kind_for`): integer -> INTEGER, number -> NUMBER, boolean
-> TOGGLE, a string with allowed values -> CHOICE, a list of strings -> LINES, a table -> MAPPING, a layer
selection (indices or 'top:K') -> INDICES. A form
names a kind only where the declared type does not say how it is typed in (a model reference, a folder of
the workspace, a comma-separated list, the rank of an optional table). Parsing turns text into the
declared type and nothing more: ranges and allowed values are the config's own check on load, whose
message the page shows.
"""
from __future__ import annotations

import json
import tomllib
from typing import Any, Optional

from lora_core.errors import ConfigError
from lora_core.fields import FieldSpec

from .model_refs import resolve_model_ref
from .errors import PathError
from .workspace import Workspace


def get_key(data: dict, key: str, default: Any = None) -> Any:
    """The value at dotted `key` ("section.name") of plain config data, or `default`."""
    node: Any = data
    for k in key.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def set_key(data: dict, key: str, value: Any) -> None:
    """Set dotted `key` of plain config data, making its tables as needed."""
    parts = key.split(".")
    node = data
    for k in parts[:-1]:
        node = node.setdefault(k, {})
    node[parts[-1]] = value


class FieldKind:
    """A text input (the base of the other kinds)."""
    name = "text"
    component = "Textbox"   # the Gradio component class
    wide = False            # a row of its own in the form

    def widget(self, f) -> dict:
        """The component's keyword arguments beyond label, info, value and elem_id."""
        return {}

    def shown(self, f, value: Any, ws: Optional[Workspace]) -> Any:
        """A config value as the component shows it."""
        return value

    def parse(self, f, value: Any, ws: Optional[Workspace]) -> Any:
        """The component's value as a config value (ConfigError naming the field when it cannot be read)."""
        return "" if value is None else str(value)

    def store(self, f, data: dict, value: Any) -> None:
        """Put a parsed value into plain config data."""
        set_key(data, f.key, value)


class Choice(FieldKind):
    """One of the declared values (a dropdown)."""
    name, component = "choice", "Dropdown"

    def widget(self, f) -> dict:
        return {"choices": list(f.choices)}


class Preset(FieldKind):
    """A named preset (the form's `presets`: shown name -> config value) or a value typed in."""
    name, component = "preset", "Dropdown"

    def widget(self, f) -> dict:
        return {"choices": list(f.choices), "allow_custom_value": True}

    def shown(self, f, value, ws):
        return next((shown for shown, v in f.presets if v == value), value)

    def parse(self, f, value, ws):
        return next((v for shown, v in f.presets if shown == value), super().parse(f, value, ws))


class Toggle(FieldKind):
    name, component = "boolean", "Checkbox"

    def parse(self, f, value, ws):
        return bool(value)


class Number(FieldKind):
    """A number with the declared bounds (an excluded bound is the minimum / maximum; the config refuses it)."""
    name, component = "number", "Number"
    precision: Optional[int] = None

    def widget(self, f) -> dict:
        spec = f.spec or FieldSpec(f.key, "", None)
        return {"precision": self.precision, "minimum": spec.min, "maximum": spec.max}

    def parse(self, f, value, ws):
        if value is None or value == "":
            if f.optional:
                return None
            raise ConfigError(f"{f.where}: a number is required")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{f.where}: {value!r} is not a number") from None


class Integer(Number):
    name, precision = "integer", 0

    def parse(self, f, value, ws):
        number = super().parse(f, value, ws)
        if number is None:
            return None
        if not number.is_integer():
            raise ConfigError(f"{f.where}: {value!r} is not a whole number")
        return int(number)


class TableRank(Integer):
    """The `r` of an optional table such as [text_encoder_lora]: 0 = no table (that adapter is off)."""
    name = "table_rank"

    def widget(self, f) -> dict:
        return {**super().widget(f), "minimum": 0}

    def shown(self, f, value, ws):
        return value or 0

    def parse(self, f, value, ws):
        return 0 if value is None or value == "" else super().parse(f, value, ws)

    def store(self, f, data, value):
        if value:
            set_key(data, f.key, value)
        else:
            data.pop(f.key.split(".")[0], None)


class Names(FieldKind):
    """A comma-separated list of names, or a regex written as re:<pattern>."""
    name = "names"

    def shown(self, f, value, ws):
        if isinstance(value, list):
            return ", ".join(map(str, value))
        return "" if value is None else str(value)

    def parse(self, f, value, ws):
        text = str(value or "").strip()
        if text.startswith("re:"):
            return text[3:].strip()
        return [x.strip() for x in text.split(",") if x.strip()]


class Indices(FieldKind):
    """A layer selection: comma-separated indices, or 'top:K' (kept as text; the config checks it)."""
    name = "indices"

    def shown(self, f, value, ws):
        return ", ".join(map(str, value)) if isinstance(value, list) else str(value or "")

    def parse(self, f, value, ws):
        text = str(value or "").strip()
        if text.startswith("top:"):
            return text
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{f.where}: write indices such as 0, 2, 5 or top:K, not {text[:60]!r}") from None


class Lines(FieldKind):
    """A list of strings, one per line."""
    name, wide = "lines", True

    def widget(self, f) -> dict:
        return {"lines": 2}

    def shown(self, f, value, ws):
        return "\n".join(map(str, value or []))

    def parse(self, f, value, ws):
        return [x.strip() for x in str(value or "").splitlines() if x.strip()]


class Mapping(Lines):
    """A {key: value} table written as JSON, a TOML inline table or `key = value` lines ("" = {})."""
    name = "mapping"

    def shown(self, f, value, ws):
        return json.dumps(value) if value else ""

    def parse(self, f, value, ws):
        text = str(value or "").strip()
        if not text:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _toml_table(f, text)
        if not isinstance(data, dict):
            raise ConfigError(f"{f.where}: a table {{\"regex\": value}} is required, not {text[:60]!r}")
        return data


def _toml_table(f, text: str) -> dict:
    body = text[1:-1].strip() if text.startswith("{") and text.endswith("}") else text
    try:
        return tomllib.loads(f"t = {{ {body} }}" if "\n" not in body else f"[t]\n{body}")["t"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{f.where}: write JSON {{\"regex\": value}} or one `\"regex\" = value` per line, "
                          f"not {text[:60]!r}") from None


class ModelRef(FieldKind):
    """A base model reference: "tiny", pkg:<bundled package>, a path in the workspace, or a hub id."""
    name, wide = "model", True

    def parse(self, f, value, ws):
        return resolve_model_ref(_needs(f, ws), str(value or ""), f.where)


class Folder(FieldKind):
    """A folder of the workspace that exists (shown relative to the workspace)."""
    name, wide = "folder", True

    def shown(self, f, value, ws):
        return ws.rel(value) if ws is not None and isinstance(value, str) and value else value

    def parse(self, f, value, ws):
        ws = _needs(f, ws)
        if not str(value or "").strip():
            raise ConfigError(f"{f.where}: give a folder in the workspace")
        try:
            return str(ws.resolve(str(value), must_exist=True))
        except PathError as e:
            raise ConfigError(f"{f.where}: {e}") from None


def _needs(f, ws: Optional[Workspace]) -> Workspace:
    if ws is None:
        raise ConfigError(f"{f.where}: no workspace to resolve the path in")
    return ws


TEXT, CHOICE, PRESET, TOGGLE = FieldKind(), Choice(), Preset(), Toggle()
NUMBER, INTEGER, TABLE_RANK = Number(), Integer(), TableRank()
NAMES, INDICES, LINES, MAPPING, MODEL, FOLDER = Names(), Indices(), Lines(), Mapping(), ModelRef(), Folder()

# declared type (lora_core.fields.type_name, without " (optional)") -> its kind of input
BY_TYPE = {"string": TEXT, "integer": INTEGER, "number": NUMBER, "boolean": TOGGLE, "list of strings": LINES,
           "list of strings or string": NAMES, "list of integers or string": INDICES, "table of integers": MAPPING,
           "table of numbers": MAPPING, "table of strings": MAPPING}


def kind_for(key: str, spec: Optional[FieldSpec], presets: tuple = ()) -> FieldKind:
    """The kind of input of a declared field: PRESET with presets, CHOICE for a string with allowed values,
    else by its declared type."""
    if presets:
        return PRESET
    if spec is None:
        raise ValueError(f"form field {key!r} is not a declared config field: give its kind")
    base = spec.type.removesuffix(" (optional)")
    if spec.choices and base == "string":
        return CHOICE
    if base not in BY_TYPE:
        raise ValueError(f"form field {key!r}: no input for the declared type {spec.type!r}: give its kind")
    return BY_TYPE[base]
