"""The job kinds the GUI can queue: one registry instead of parallel tables and guesses.

A job kind names its config class, the CLI module and subcommand it runs, and its form. The
queue writes the kind into the run folder's status.json (field `kind`) when it queues a run, and
the trainers' job wrapper writes the same value, so the page reads a folder's kind from there;
nothing is guessed from the keys of a TOML file.

Adding a kind: one `JobKind(...)` entry here (and, for a new form, its fields in forms.py).
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lora_core.run import RunDir

from .forms import LLM_FIELDS, SD_FIELDS, bind

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class JobKind:
    """name: the value of status.json `kind`; config: "module:Class" of the typed config;
    cli/command: `python -m <cli> <command>`; form: the form's fields (forms.py; `fields` binds
    them to the declarations of the form's config class, `form_config`); prefix: the page's
    element-id prefix; train: a training run (resumable, launched with accelerate, writes its
    own status, run folder under runs/) rather than a one-shot job writing into `--out`;
    default_file: the repository config the form starts from (absent: the dataclass defaults)."""
    name: str
    config: str
    cli: str
    command: str
    form: tuple = ()
    prefix: str = ""
    train: bool = True
    default_file: str = ""
    form_config: str = ""  # "module:Class" the form's keys belong to (default: `config`)

    @property
    def out_flag(self) -> str:
        return "--run-dir" if self.train else "--out"

    def default_path(self) -> Optional[Path]:
        path = REPO_ROOT / "configs" / self.default_file if self.default_file else None
        return path if path is not None and path.is_file() else None

    def config_class(self) -> type:
        return _load(self.config)

    @property
    def fields(self) -> tuple:
        return _fields(self.form, self.form_config or self.config)


def _load(ref: str) -> type:
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


@functools.lru_cache(maxsize=None)
def _fields(form: tuple, config: str) -> tuple:
    return bind(form, _load(config))


KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("sd-train", "lora_sd.config:SDTrainConfig", "lora_sd.cli", "train", tuple(SD_FIELDS), "sd",
            default_file="sd_synth_purple.toml"),
    JobKind("llm-train", "lora_llm.config:LLMTrainConfig", "lora_llm.cli", "train", tuple(LLM_FIELDS), "llm",
            default_file="llm_tiny_demo.toml"),
    # the suite's [base] table is the text-task form; tasks and steps per task come from its own inputs
    JobKind("eval-suite", "lora_llm.suite:SuiteConfig", "lora_llm.cli", "eval-suite", tuple(LLM_FIELDS), "eval",
            train=False, form_config="lora_llm.config:LLMTrainConfig"),
)}


def get(name: str) -> JobKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}; known: {sorted(KINDS)}") from None


def run_kind(run_dir: Path) -> Optional[str]:
    """The kind recorded in a run folder's status.json (None: not recorded, or not a known kind)."""
    kind = RunDir(run_dir).read_status().get("kind")
    return kind if kind in KINDS else None
