"""The LoRA configuration: one typed object, shared by every job and both backends."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

from .fields import Checked, option


def _targets_error(targets) -> Optional[str]:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return f"is not a valid regex: {e}"
        return None
    return None if targets else "is empty: name the modules to adapt"


def _slices_error(slices: dict) -> Optional[str]:
    bad = [name for name, mask in slices.items() if not any(mask)]
    return f"must enable at least one slice of {bad[0]!r}" if bad else None


@dataclass
class LoraConfig(Checked, section="lora"):
    """What to adapt and how (the `[lora]` table). Matching follows PEFT; fused slices follow loralib's
    MergedLinear. Each field's help and range is declared below (docs/config-reference.md lists them)."""

    r: int = option(8, "rank of the update B A", ge=1)
    alpha: float = option(8.0, "scaling numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora)", gt=0)
    dropout: float = option(0.0, "dropout on the LoRA input path only", ge=0, lt=1)
    target_modules: Union[list[str], str] = option(
        ["q_proj", "v_proj"], "a list of module names (a qualified name equal to one or ending with '.' + one), "
        "or a regex that must match the whole qualified name", check=_targets_error)
    use_rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    init: Literal["kaiming", "gaussian"] = option(
        "kaiming", "lora_A's start: kaiming (Kaiming-uniform a=sqrt(5), as loralib/PEFT) or gaussian (N(0, 1/r)); "
        "lora_B starts at zero")
    fused_slices: dict[str, list[bool]] = option(
        {}, "{module: [bool, ...]}: split that module's output into equal slices and adapt the true ones "
        "(GPT-2 c_attn q,v: [true, false, true])", check=_slices_error)
    modules_to_save: list[str] = option([], "modules trained in full and saved with the adapter (e.g. a head)")
    exclude_modules: list[str] = option([], "module names never adapted (same matching rules as target_modules)")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def matches(self, qualified_name: str) -> bool:
        if any(name_matches(qualified_name, e) for e in self.exclude_modules):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, qualified_name) is not None
        return any(name_matches(qualified_name, t) for t in self.target_modules)

    def slices_for(self, qualified_name: str) -> Optional[list[bool]]:
        for name, mask in self.fused_slices.items():
            if name_matches(qualified_name, name):
                return list(mask)
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def name_matches(qualified_name: str, name: str) -> bool:
    """PEFT's list matching: equal, or ends with '.' + name."""
    return qualified_name == name or qualified_name.endswith("." + name)
