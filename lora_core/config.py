"""The LoRA configuration: one typed object, shared by every job and both backends."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union


@dataclass
class LoraConfig:
    """What to adapt and how.

    r, alpha:        rank and scaling numerator; scale = alpha / r (or alpha / sqrt(r) with use_rslora).
    dropout:         dropout on the LoRA input path only.
    target_modules:  PEFT semantics: a list of names matches a module whose qualified name equals
                     a name or ends with "." + name; a string is a regex that must fully match.
    fused_slices:    {module name (same matching rules): [bool, ...]} splits that module's output
                     into len(list) equal slices and adapts only the True ones (GPT-2 c_attn q,v:
                     {"c_attn": [True, False, True]}, as loralib's MergedLinear).
    init:            "kaiming" (A Kaiming-uniform a=sqrt(5), as loralib/PEFT) or "gaussian" (A ~ N(0, 1/r)).
    modules_to_save: modules trained in full and saved with the adapter (e.g. a classification head).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    init: str = "kaiming"
    fused_slices: dict[str, list[bool]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"lora.r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"lora.target_modules is not a valid regex: {e}") from e
        elif not self.target_modules:
            raise ValueError("lora.target_modules is empty")
        for name, mask in self.fused_slices.items():
            if not mask or not any(mask):
                raise ValueError(f"lora.fused_slices[{name!r}] must enable at least one slice")

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
