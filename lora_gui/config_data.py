"""A job's config as the GUI handles it: plain TOML data (the same files as the CLIs read), validated by
the job's config class.

The config of a run = a base config (a loaded file, or the defaults) + the form's values as overrides
({key: value}, parsed by each field's kind), validated once by the job's dataclass (lora_sd.config /
lora_llm.config) and written with save_config. Loading a file sets the base and fills the form from
that one object.
"""
from __future__ import annotations

import json
from typing import Optional

from lora_core.configfile import from_dict, read_toml, to_dict
from lora_core.errors import ConfigError

from . import job_kinds
from .workspace import Workspace


def default_config_dict(kind: str) -> dict:
    """The repository's demo config of job kind `kind` (e.g. configs/sd_synth_purple.toml) or the
    config class's defaults."""
    path = job_kinds.get(kind).default_path()
    if path is not None:
        return complete(kind, read_toml(path))
    return to_dict(job_kinds.get(kind).config_class()())


def complete(kind: str, data: dict) -> dict:
    """`data` with every field the file leaves out set to its default (so the form shows it).
    A file that does not validate (e.g. data.path missing here) is returned as it is."""
    try:
        return to_dict(validate(kind, data))
    except ConfigError:
        return data


def form_values(kind: str, data: dict, ws: Optional[Workspace] = None) -> dict:
    """{key: what its input shows} of job kind `kind`'s form for config data `data`."""
    return {f.key: f.shown(data, ws) for f in job_kinds.get(kind).fields}


def apply_form(base: dict, fields, values: dict, ws: Optional[Workspace] = None) -> dict:
    """`base` with the form's `values` ({key: input value}) parsed and set; a key no field has is a bug."""
    by_key = {f.key: f for f in fields}
    unknown = sorted(set(values) - set(by_key))
    if unknown:
        raise ValueError(f"not fields of this form: {unknown}")
    data = json.loads(json.dumps(base))  # a deep copy of plain TOML data
    for key, value in values.items():
        f = by_key[key]
        f.kind.store(f, data, f.parse(value, ws))
    return data


def validate(kind: str, data: dict, where: str = "config"):
    """The typed config object of job kind `kind` (ConfigError names the key at fault)."""
    return from_dict(job_kinds.get(kind).config_class(), data, where)
