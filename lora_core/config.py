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
    use_dora, conv_r, conv_alpha, rank_pattern, alpha_pattern: the adapter variants (help below).
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
    use_dora: bool = field(default=False, metadata={"help": (
        "DoRA (weight-decomposed LoRA, PEFT's use_dora): a trained magnitude per output times the direction "
        "W + ΔW normalised per output; Linear, Conv1D and Conv2d layers, not fused slices")})
    conv_r: int = field(default=0, metadata={"help": (
        "rank of k×k Conv2d layers (LoCon, kohya's conv_dim); 0 = r")})
    conv_alpha: float = field(default=0.0, metadata={"help": (
        "alpha of k×k Conv2d layers (kohya's conv_alpha); 0 = conv_r when conv_r is set, else alpha")})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": (
        "{regex: rank} per module (PEFT's rank_pattern: the first key matching the end of the module's "
        "qualified name after a '.' wins)")})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "{regex: alpha} per module (PEFT's alpha_pattern, same matching as rank_pattern)")})

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
        problem = variant_error(self)
        if problem:
            raise ValueError(problem)

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

    def rank_alpha(self, qualified_name: str, kxk_conv: bool = False) -> tuple[int, float]:
        """(r, alpha) of one module: rank_pattern / alpha_pattern first (PEFT's matching), then
        conv_r / conv_alpha for a k×k Conv2d (kohya's conv_dim / conv_alpha), then r / alpha."""
        r, alpha = self.r, self.alpha
        if kxk_conv and self.conv_r:
            r, alpha = self.conv_r, self.conv_alpha or float(self.conv_r)
        elif kxk_conv and self.conv_alpha:
            alpha = self.conv_alpha
        key = pattern_key(self.rank_pattern, qualified_name)
        if key is not None:
            r = self.rank_pattern[key]
        key = pattern_key(self.alpha_pattern, qualified_name)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return r, float(alpha)


def name_matches(qualified_name: str, name: str) -> bool:
    """PEFT's list matching: equal, or ends with '.' + name."""
    return qualified_name == name or qualified_name.endswith("." + name)


def pattern_key(patterns: dict, qualified_name: str) -> Optional[str]:
    """PEFT's get_pattern_key: the first key (a regex) such that "(.*\\.)?(key)$" matches the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", qualified_name):
            return key
    return None


def variant_error(cfg: LoraConfig) -> Optional[str]:
    """What is wrong with the variant fields (use_dora, conv_*, *_pattern), or None."""
    if not isinstance(cfg.conv_r, int) or cfg.conv_r < 0 or cfg.conv_alpha < 0:
        return f"lora.conv_r and lora.conv_alpha must be >= 0 (0 = as r / alpha), got {cfg.conv_r!r}, {cfg.conv_alpha!r}"
    if cfg.use_dora and cfg.fused_slices:
        return "lora.use_dora does not work with lora.fused_slices (PEFT has no DoRA for fused slices): drop one"
    for field_name, bad in (("rank_pattern", lambda v: not isinstance(v, int) or v <= 0),
                            ("alpha_pattern", lambda v: v <= 0)):
        for key, value in getattr(cfg, field_name).items():
            try:
                re.compile(key)
            except re.error as e:
                return f"lora.{field_name}: key {key!r} is not a valid regex: {e}"
            if bad(value):
                return f"lora.{field_name}[{key!r}] must be positive{' (an integer)' if field_name == 'rank_pattern' else ''}, got {value!r}"
    return None
