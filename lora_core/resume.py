"""Resume is exact or refused: which config fields may change when a run is continued (torch-free).

Each trainer classifies every field of its job config in a table that mirrors the config's tables
(`lora_sd.resume_rules.SD_RESUME`, `lora_llm.resume_rules.LLM_RESUME`; the shared `[lora]` and `[train]`
tables are classified here once). A rule is one of

    FREE     may change on resume (intervals, validation and sample settings, where files go): logged
    MATCH    must match: the checkpoint holds weights or optimizer state made for this value
    RESULT   changes the result: the run would continue on another trajectory than its checkpoint's

or a function of the new table's values returning one of them (train.max_steps: FREE, unless the
learning-rate schedule spans the run's steps). `resume_changes` compares a run's saved config with the new
one; a MATCH or RESULT change refuses the resume with one line naming each changed field, its old and new
value. tests/test_resume_rules.py fails for a field that has no rule.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Union

from .configfile import from_dict, read_toml, to_dict
from .errors import ConfigError, RunFolderError
from .fields import strip_optional
from .settings import TrainSettings

FREE, MATCH, RESULT = "may change", "must match", "changes the result"
WHY = {MATCH: "must match: the checkpoint was made for it", RESULT: "changes the result from the checkpoint on"}
Rule = Union[str, Callable[[Any], str], dict]
# learning-rate schedules that do not depend on the run's total steps
STEPLESS_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt")


def _max_steps(train: TrainSettings) -> str:
    return FREE if train.lr_scheduler in STEPLESS_SCHEDULES else RESULT


LORA_RESUME: dict[str, Rule] = {
    **{k: MATCH for k in ("type", "r", "alpha", "target_modules", "use_rslora", "init", "fused_slices",
                          "modules_to_save", "exclude_modules", "use_dora", "conv_r", "conv_alpha", "rank_pattern",
                          "alpha_pattern", "decompose_factor", "decompose_both", "oft_block_size", "coft", "coft_eps",
                          "block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "layers")},
    "dropout": RESULT,
}
TRAIN_RESUME: dict[str, Rule] = {
    "max_steps": _max_steps,
    "optimizer": MATCH,
    **{k: RESULT for k in ("batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                           "loraplus_lr_ratio", "head_learning_rate", "ema_decay", "ema_start_step", "lr_scheduler",
                           "lr_warmup_steps", "max_grad_norm", "mixed_precision", "seed")},
    # fused_backward gives the same result bit for bit (tests/test_lowmem.py)
    **{k: FREE for k in ("gradient_checkpointing", "log_every", "checkpoint_every", "keep_checkpoints",
                         "sample_every", "val_every", "num_workers", "log_with", "fused_backward")},
}


# the tables every trainer shares, by the name a message gives them
SHARED = {id(LORA_RESUME): "LORA_RESUME in lora_core/resume.py",
          id(TRAIN_RESUME): "TRAIN_RESUME in lora_core/resume.py"}


def table_class(tp: Any) -> Any:
    """The dataclass of a table field (Optional unwrapped), else None."""
    tp, _ = strip_optional(tp)
    return tp if dataclasses.is_dataclass(tp) else None


def unclassified(cls: type, rules: dict, where: str, prefix: str = "") -> list[str]:
    """Lines naming each field of config class `cls` with no rule in `rules` (and each rule of no field), and
    where to add it (`where` names `rules`: "SD_RESUME in lora_sd/resume_rules.py")."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = [f"{prefix}{k}: a rule for a field that does not exist (remove it from {where})"
           for k in rules if k not in names]
    for name in names:
        key, sub = prefix + name, table_class(hints[name])
        if name not in rules:
            out.append(f"{key}: no resume rule; add {name!r}: FREE, MATCH or RESULT (lora_core.resume) to {where}")
        elif sub is not None and not isinstance(rules[name], dict):
            out.append(f"{key}: a table needs a dict of rules in {where}")
        elif sub is not None:
            inner = SHARED.get(id(rules[name]), f"{where}[{name!r}]")
            out += unclassified(sub, rules[name], inner, key + ".")
    return out


def _changes(old: Any, new: Any, rules: dict, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(key, old, new, FREE | MATCH | RESULT) of each field that differs."""
    out = []
    for f in dataclasses.fields(new):
        a, b, rule, key = getattr(old, f.name), getattr(new, f.name), rules[f.name], prefix + f.name
        if isinstance(rule, dict):
            if a is not None and b is not None:
                out += _changes(a, b, rule, key + ".")
            elif a != b:   # an optional table set or removed: other weights
                out.append((key, a and to_dict(a), b and to_dict(b), MATCH))
        elif a != b:
            out.append((key, a, b, rule(new) if callable(rule) else rule))
    return out


def _show(v: Any) -> str:
    return "(none)" if v is None else repr(v)


def resume_changes(saved: Path, config: Any, rules: dict) -> list[str]:
    """Compare the run's saved config file with the new config: the allowed changes as lines for the log;
    any other change raises RunFolderError naming every one (field, old -> new, why)."""
    try:
        old = from_dict(type(config), read_toml(saved), where=str(saved))
    except (ConfigError, OSError) as e:
        raise RunFolderError(f"--resume: cannot read the run's config to compare ({e}); resume it with the "
                             "version of the tool that made it, or start a new run") from None
    changes = _changes(old, config, rules)
    refused = [f"{k} {_show(a)} -> {_show(b)} ({WHY[c]})" for k, a, b, c in changes if c != FREE]
    if refused:
        raise RunFolderError(f"--resume would not continue this run exactly: {'; '.join(refused)}; resume with the "
                             f"run's own config ({saved}), or start a new run in another folder")
    return [f"{k} {_show(a)} -> {_show(b)}" for k, a, b, _ in changes]


__all__ = ["FREE", "MATCH", "RESULT", "LORA_RESUME", "TRAIN_RESUME", "unclassified", "resume_changes"]
