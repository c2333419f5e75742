"""Config fields declared once: type (`Literal[...]` for choices), default, help text and range.

    steps: int = option(100, "optimizer steps", ge=1)
    init: Literal["kaiming", "gaussian"] = option("kaiming", "how lora_A starts")

The declaration drives everything else: `lora_core.configfile` validates a loaded file with it,
`Checked` validates a config built in code with it, `field_specs` lists it (dotted keys) for the
CLIs' `--help-config`, the generated docs (`lora_core.configdoc`) and the GUI's choices. Torch-free.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

RANGE_KEYS = ("ge", "gt", "le", "lt", "multiple_of")
# the largest value of an integer field that declares no upper bound: beyond it no run could hold the number
# (a rank, a step count, a size); a field that needs more declares its own le/lt
INT_LIMIT = 2**31 - 1


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, ge=None, gt=None, le=None, lt=None,
           multiple_of=None, check: Optional[Callable[[Any], Optional[str]]] = None):
    """A dataclass field with its help text and range (ge/gt: lower bound, inclusive/exclusive; le/lt: upper).
    `check(value)` is a rule of this field alone that a range cannot say: it returns what is wrong, continuing
    a sentence that starts with the key ("is not a valid regex: ..."), or None. A list or dict default is copied
    for every instance."""
    meta = {"help": help, **{k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, multiple_of=multiple_of,
                                                   check=check).items() if v is not None}}
    if factory is None and isinstance(default, (list, dict)):
        factory = lambda d=default: copy.deepcopy(d)  # noqa: E731
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------ types
def strip_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] -> (X, True); X -> (X, False)."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is typing.Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType")


def choices_of(tp: Any) -> tuple:
    """The allowed values of a Literal type (also inside Optional / list / dict keys); () when free."""
    tp, _ = strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (list, tuple, dict) and typing.get_args(tp):
        return choices_of(typing.get_args(tp)[0])
    return ()


def type_name(tp: Any) -> str:
    """The TOML-side name of a field type: integer, number, string, boolean, list of strings, table ..."""
    tp, optional = strip_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        name = "string" if all(isinstance(a, str) for a in args) else "value"
    elif _is_union(tp):
        name = " or ".join(type_name(a) for a in args)
    elif origin in (list, tuple):
        name = "list of " + _plural(type_name(args[0]) if args else "value")
    elif origin is dict:
        name = "table of " + _plural(type_name(args[1]) if args else "value")
    elif dataclasses.is_dataclass(tp):
        name = "table"
    else:
        name = {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))
    return f"{name} (optional)" if optional else name


def _plural(name: str) -> str:
    return "lists" + name[4:] if name.startswith("list ") else name + "s" if " " not in name else f"({name})"


# ------------------------------------------------------------------ ranges
def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(meta: dict, integer: bool = False) -> str:
    """'a positive integer', 'a number in [0, 1)', 'an integer >= 0, a multiple of 8', ... ('' when no range)."""
    lo = (meta["ge"], "[") if "ge" in meta else (meta["gt"], "(") if "gt" in meta else None
    hi = (meta["le"], "]") if "le" in meta else (meta["lt"], ")") if "lt" in meta else None
    kind = "an integer" if integer else "a number"
    if lo and hi:
        text = f"{kind} in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
    elif lo == ((1, "[") if integer else (0, "(")):
        text = f"a positive {'integer' if integer else 'number'}"
    elif lo:
        text = f"{kind} {'>=' if lo[1] == '[' else '>'} {_num(lo[0])}"
    elif hi:
        text = f"{kind} {'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
    else:
        text = kind if "multiple_of" in meta else ""
    if "multiple_of" in meta:
        text += f", a multiple of {meta['multiple_of']}"
    return text


def _in_range(x: float, meta: dict) -> bool:
    return (("ge" not in meta or x >= meta["ge"]) and ("gt" not in meta or x > meta["gt"])
            and ("le" not in meta or x <= meta["le"]) and ("lt" not in meta or x < meta["lt"])
            and ("multiple_of" not in meta or x % meta["multiple_of"] == 0))


def _fmt_choices(choices) -> str:
    return ", ".join(repr(c) for c in choices)


def check_value(value: Any, tp: Any, meta: dict | None = None) -> Optional[str]:
    """Why `value` breaks its field's declared choices, check or range, as the end of a sentence starting with
    the key ("must be one of 'a', 'b'; got 'c'"); None when it is fine. Types are checked by configfile."""
    meta = meta or {}
    tp, _ = strip_optional(tp)
    if value is None:
        return None
    choices = choices_of(tp)
    origin = typing.get_origin(tp)
    if choices:
        items = value if origin in (list, tuple, dict) and isinstance(value, (list, tuple, dict)) else [value]
        bad = [v for v in items if v not in choices]
        if bad and origin is Literal:
            return f"must be one of {_fmt_choices(choices)}; got {value!r}"
        if bad:
            what = "key(s)" if origin is dict else "value(s)"
            return f"has unknown {what} {_fmt_choices(bad)}; allowed: {_fmt_choices(choices)}"
    err = meta["check"](value) if "check" in meta else None
    if err:
        return err
    if tp is int and isinstance(value, int) and abs(value) > INT_LIMIT and not ("le" in meta or "lt" in meta):
        return f"must be {range_text({**meta, 'le': INT_LIMIT}, True)} (no run can use more); got {value}"
    if not any(k in meta for k in RANGE_KEYS):
        return None
    integer = tp is int
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if number and (not integer or float(value).is_integer()) and _in_range(value, meta):
        return None
    return f"must be {range_text(meta, integer)}; got {value!r}"


_VALUES_CHECKED = contextvars.ContextVar("lora_core_values_checked", default=False)


@contextlib.contextmanager
def values_checked():
    """Build config objects whose every value has been checked already (lora_core.configfile checks each one
    as it reads it, naming its dotted key): inside this block `Checked` skips its own field checks, so a
    loaded value is checked once. Rules that span fields (a subclass's `__post_init__`) still run."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


class Checked:
    """Mixin for config dataclasses: checks every declared choice and range when an instance is built
    in code (`LoraConfig(r=0)` raises; a loaded config is checked by lora_core.configfile instead, see
    `values_checked`). `section` names the TOML table in messages:
    `class LoraConfig(Checked, section="lora")`. A subclass's own `__post_init__` (for rules that
    span fields) calls `super().__post_init__()` first."""
    _section = ""

    def __init_subclass__(cls, section: str = "", **kw):
        super().__init_subclass__(**kw)
        if section:
            cls._section = section

    def __post_init__(self) -> None:
        if _VALUES_CHECKED.get():
            return
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            err = check_value(getattr(self, f.name), hints[f.name], f.metadata)
            if err:
                key = f"{self._section}.{f.name}" if self._section else f.name
                raise ValueError(f"{key} {err}")


# ------------------------------------------------------------------ listing
@dataclass(frozen=True)
class FieldSpec:
    """One config field as the CLIs' help, the docs and the GUI see it."""
    path: str                  # dotted key, e.g. "train.lr_scheduler"
    type: str                  # TOML-side type name: integer, number, string, boolean, list of strings, table ...
    default: Any               # the job's default (None: unset / absent table)
    help: str = ""
    choices: tuple = ()        # allowed values (from a Literal type); () = free
    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False     # min itself is not allowed (gt)
    max_open: bool = False     # max itself is not allowed (lt)
    multiple_of: Optional[int] = None

    @property
    def allowed(self) -> str:
        """'one of ...', the range in words, or ''."""
        if self.choices:
            each = "keys: " if self.type.startswith("table") else "each " if self.type.startswith("list") else ""
            return each + "one of " + ", ".join(repr(c) for c in self.choices)
        meta = {k: v for k, v in (("gt" if self.min_open else "ge", self.min), ("lt" if self.max_open else "le", self.max),
                                  ("multiple_of", self.multiple_of)) if v is not None}
        return range_text(meta, self.type.startswith("integer"))


def _spec(path: str, tp: Any, default: Any, meta: dict) -> FieldSpec:
    lo = meta.get("ge", meta.get("gt"))
    hi = meta.get("le", meta.get("lt"))
    return FieldSpec(path, type_name(tp), default, meta.get("help", ""), choices_of(tp), lo, hi,
                     "gt" in meta, "lt" in meta, meta.get("multiple_of"))


def field_specs(cls: type, stop_at: tuple = (), _prefix: str = "", _obj: Any = None) -> list[FieldSpec]:
    """Every field of config dataclass `cls`, nested tables flattened to dotted keys, defaults taken from
    `cls()` (so a job's own defaults show). Tables of a class in `stop_at`, and optional tables, are
    listed as one row (type "table") without their fields."""
    obj = cls() if _obj is None else _obj
    hints = typing.get_type_hints(cls)
    out: list[FieldSpec] = []
    for f in dataclasses.fields(cls):
        tp, value, path = hints[f.name], getattr(obj, f.name), _prefix + f.name
        out.append(_spec(path, tp, value, f.metadata))
        if dataclasses.is_dataclass(tp) and value is not None and tp not in stop_at:
            out.extend(field_specs(tp, stop_at, path + ".", value))
    return out


__all__ = ["option", "Checked", "values_checked", "FieldSpec", "field_specs", "check_value", "choices_of", "type_name",
           "range_text", "strip_optional"]
