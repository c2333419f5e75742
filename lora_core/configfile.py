"""Typed job configs: nested dataclasses <-> TOML files, with `section.key=value` overrides.

Every job (SD training, LLM training, evaluation) has one dataclass; the CLI, the GUI and
`accelerate launch` all load it through `load_config`, so a file means the same everywhere.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Type, TypeVar

import tomli_w

from .files import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: Type[T], data: dict, where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


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
    atomic_write_text(path, dumps(obj))


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


def load_config(cls: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where)
