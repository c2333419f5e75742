"""Typed job configs: nested dataclasses <-> TOML files, with `section.key=value` overrides.

Every job (SD training, LLM training, evaluation) has one dataclass; the CLI, the GUI and
`accelerate launch` all load it through `load_config`, so a file means the same everywhere.
Loading checks every key, type, choice (`Literal`) and range that the fields declare (lora_core.fields)
before the dataclass is built, once (the objects built do not check them again); a wrong value is one
ConfigError line naming the file (or `--set`), the dotted key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar

import tomli_w

from .fields import check_value, values_checked
from .files import atomic_write_text
from .errors import ConfigError

T = TypeVar("T")


class _Bad(Exception):
    """The value at dotted `key` is wrong; `text` continues the sentence after `label` (default: the key)."""

    def __init__(self, key: Optional[str], text: str, label: Optional[str] = None):
        super().__init__(text)
        self.key, self.text, self.label = key, text, label if label is not None else key

    def error(self, where: str) -> ConfigError:
        msg = f"{where}: {self.label}{self.text}" if self.label else f"{where}: {self.text.lstrip(': ')}"
        return ConfigError(msg, self.key)


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    errors = []
    for arg in typing.get_args(tp):
        if arg is type(None):
            if value is None:
                return None
            continue
        try:
            return _convert(value, arg, key)
        except _Bad as e:
            errors.append(e)
    raise errors[0] if errors else _Bad(key, f": bad value {value!r}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (tables become dataclasses, integers become floats where a number is asked)."""
    origin = typing.get_origin(tp)
    if tp is Any or origin is typing.Literal:
        return value   # choices: fields.check_value
    if origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        return _convert_union(value, tp, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Bad(key, f": expected a table, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Bad(key, f": expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Bad(key, f": expected a table, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(value, tp, key)


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(key, f": expected a number, got {value!r}")
        if not math.isfinite(value):
            raise _Bad(key, f": expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            raise _Bad(key, f": expected an integer, got the number {value!r}; write it without a decimal point "
                            "or exponent")
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(key, f": expected an integer, got {value!r}")
        return value
    if tp is bool and not isinstance(value, bool):
        raise _Bad(key, f": expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise _Bad(key, f": expected a string, got {value!r}")
    return value


def _build(cls: Type[T], data: dict, prefix: str) -> T:
    """The dataclass from a table: every key known, every value of its declared type, choice and range."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Bad(_join(prefix, unknown[0]), f"unknown key(s) {unknown}; known: {sorted(fields)}",
                   label=f"{prefix}: " if prefix else "")
    kwargs = {}
    for k, v in data.items():
        key = _join(prefix, k)
        kwargs[k] = _convert(v, hints[k], key)
        err = check_value(kwargs[k], hints[k], fields[k].metadata)
        if err:
            raise _Bad(key, f" {err}")
    try:
        with values_checked():   # each value was checked above, with its dotted key
            return cls(**kwargs)
    except (TypeError, ValueError) as e:   # a rule that spans fields (__post_init__)
        raise _Bad(None, str(e)) from e


def from_dict(cls: Type[T], data: dict, where: str = "config") -> T:
    """The typed config from a plain dict; a bad key or value raises ConfigError naming `where` and the key."""
    try:
        return _build(cls, data, "")
    except _Bad as e:
        raise e.error(where) from None


def to_dict(obj) -> dict:
    """Plain dict of a config dataclass, None values dropped (TOML has no null)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(obj))


def dumps(obj) -> str:
    return tomli_w.dumps(to_dict(obj))


def save_config(path, obj) -> None:
    """Write config `obj` as TOML, atomically; a file that holds exactly this text already is left as it is
    (the GUI writes a run's config.toml before the trainer starts: each run's file is written once)."""
    text, path = dumps(obj), Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass   # missing or unreadable: written below
    atomic_write_text(path, text)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4). Values are TOML
    (numbers, true/false, [lists], "strings"); anything that is not TOML is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a table")
        node[keys[-1]] = value
    return data


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing, unreadable, non-UTF-8 or invalid file raises one ConfigError line."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte {e.start}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _overridden(key: Optional[str], override_keys: list[str]) -> bool:
    return bool(key) and any(key == k or key.startswith((k + ".", k + "[")) for k in override_keys)


def _other_tool(data: dict, other: Optional[tuple[str, Sequence[str]]]) -> Optional[str]:
    """When `data` has keys that only the other tool's configs have: what to say instead of "unknown key"."""
    if other is None:
        return None
    tool, marks = other

    def has(mark: str) -> bool:
        section, _, key = mark.partition(".")
        return section in data if not key else isinstance(data.get(section), dict) and key in data[section]
    found = [m for m in marks if has(m)]
    if not found:
        return None
    return f"a {tool} config (it has {', '.join(found[:3])}), not one of this tool: run it with `{tool}`"


def load_config(cls: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                other: Optional[tuple[str, Sequence[str]]] = None) -> T:
    """The typed config of a TOML file (or the defaults) with `section.key=value` overrides, validated
    completely: a bad value raises ConfigError naming the file (or --set), the dotted key and what is allowed.
    other: (the other tool, the keys that only its configs have): a file of the other tool is named as such."""
    data = read_toml(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    data = apply_overrides(data, overrides)
    try:
        return _build(cls, data, "")
    except _Bad as e:
        hint = _other_tool(data, other) if "unknown key" in e.text else None
        if hint:
            raise ConfigError(f"{where}: {hint}", e.key) from None
        keys = [".".join(parse_override(o)[0]) for o in overrides]
        if _overridden(e.key, keys):
            where = "--set"
        elif e.key is None and keys:   # a rule that spans fields: the file and the overrides together
            where += " with --set"
        raise e.error(where) from None
