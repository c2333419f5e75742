"""The LoRA configuration: one typed object, shared by every job and both backends."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Literal, Optional, Union

from .fields import Checked, option, values_checked


def _targets_error(targets) -> Optional[str]:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return f"is not a valid regex: {e}"
        return None
    return None if targets else "is empty: name the modules to adapt"


def layers_error(layers) -> Optional[str]:
    """What is wrong with a layer selection (a list of indices or 'top:K'), or None: the check of lora.layers and
    of any other field that selects layers the same way."""
    if isinstance(layers, str):
        return None if _top_k(layers) else f"must be a list of layer indices or 'top:K' (K >= 1); got {layers!r}"
    bad = [i for i in layers if i < 0]
    return f"has negative layer indices {bad}" if bad else None


def _top_k(text: str) -> Optional[int]:
    m = re.fullmatch(r"top:(\d+)", text.strip())
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def resolve_indices(layers: Union[list[int], str], num_layers: int, key: str = "lora.layers") -> list[int]:
    """A layer selection checked by layers_error (indices or 'top:K') as the sorted indices it picks among
    num_layers layers; an index or K beyond them is a ValueError naming `key`."""
    if isinstance(layers, str):
        k = _top_k(layers)
        if k > num_layers:
            raise ValueError(f"{key} = {layers!r}: the model has only {num_layers} layers")
        return list(range(num_layers - k, num_layers))
    bad = [i for i in layers if i >= num_layers]
    if bad:
        raise ValueError(f"{key}: {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
    return sorted(set(layers))


def layer_index(qualified_name: str) -> Optional[int]:
    """The layer a module belongs to, as PEFT's layers_to_transform finds it (no layers_pattern): the
    number in the last `.<name>.<N>.` of the qualified name (`model.layers.3.self_attn.q_proj` -> 3)."""
    m = re.match(r".*\.[^.]*\.(\d+)\.", qualified_name)
    return int(m.group(1)) if m else None


def _slices_error(slices: dict) -> Optional[str]:
    bad = [name for name, mask in slices.items() if not any(mask)]
    return f"must enable at least one slice of {bad[0]!r}" if bad else None


def _pattern_error(patterns: dict, kind: type) -> Optional[str]:
    for key, value in patterns.items():
        try:
            re.compile(key)
        except re.error as e:
            return f"key {key!r} is not a valid regex: {e}"
        if not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
            return f"[{key!r}] must be a positive {'integer' if kind is int else 'number'}, got {value!r}"
    return None


# The factors (parameter names) of each additive LyCORIS type, as lora_core.variants holds them and as LyCORIS'
# kohya files name them; a LoKr factor is full (lokr_w1) or split in two (lokr_w1_a, lokr_w1_b)
LYCORIS_FACTORS = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                   "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}


@dataclass
class LoraConfig(Checked, section="lora"):
    """What to adapt and how (the `[lora]` table). Matching follows PEFT; fused slices follow loralib's
    MergedLinear. Each field's help and range is declared below (docs/config-reference.md lists them)."""

    type: Literal["lora", "loha", "lokr", "oft"] = option(
        "lora", "the adapter: lora (B A; DoRA, LoCon and fused slices are its options), loha (LoHa: (w1_a w1_b) ⊙ "
        "(w2_a w2_b) · alpha/r), lokr (LoKr: w1 ⊗ w2 · alpha/r, Kronecker factors), oft (OFT: the frozen weight "
        "rotated by a block-diagonal orthogonal matrix; r and alpha unused). LoHa, LoKr and OFT are PEFT's "
        "LoHaConfig / LoKrConfig / OFTConfig (LyCORIS's algorithms)")
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
        "(GPT-2 c_attn q,v: [true, false, true]); LoHa / LoKr / OFT: one adapter per true slice", check=_slices_error)
    modules_to_save: list[str] = option([], "modules trained in full and saved with the adapter (e.g. a head)")
    exclude_modules: list[str] = option([], "module names never adapted (same matching rules as target_modules)")
    use_dora: bool = option(False, "DoRA (weight-decomposed LoRA, PEFT's use_dora): a trained magnitude per output "
                            "times the direction W + ΔW normalised per output; Linear, Conv1D, Conv2d; not fused slices")
    conv_r: int = option(0, "rank of k×k Conv2d layers (LoCon, kohya's conv_dim); 0 = r", ge=0)
    conv_alpha: float = option(0.0, "alpha of k×k Conv2d layers (kohya's conv_alpha); 0 = conv_r when conv_r is "
                               "set, else alpha", ge=0)
    rank_pattern: dict[str, int] = option(
        {}, "{regex: rank} per module (PEFT's rank_pattern: the first key matching the end of the module's "
        "qualified name after a '.' wins)", check=lambda p: _pattern_error(p, int))
    alpha_pattern: dict[str, float] = option(
        {}, "{regex: alpha} per module (PEFT's alpha_pattern, same matching as rank_pattern)",
        check=lambda p: _pattern_error(p, float))
    decompose_factor: int = option(
        -1, "LoKr: the size of the first Kronecker factor of each dimension when it divides it (PEFT's "
        "decompose_factor, LyCORIS's factor); -1 = the divisor pair nearest the square root", ge=-1,
        check=lambda f: "must be -1 or a positive integer" if f == 0 else None)
    decompose_both: bool = option(False, "LoKr: also write the first factor w1 as w1_a w1_b of rank r when r < half "
                                  "its larger side (PEFT's and LyCORIS's decompose_both)")
    oft_block_size: int = option(32, "OFT: the size of each orthogonal block (PEFT's oft_block_size); must divide "
                                 "every adapted layer's input size (in_channels·kh·kw for a Conv2d)", ge=2)
    coft: bool = option(False, "OFT: the constrained variant (COFT, PEFT's coft): each block's generator is kept "
                        "within coft_eps of zero")
    coft_eps: float = option(6e-5, "OFT with coft: the radius of the constraint (PEFT's eps)", gt=0)
    block_share: bool = option(False, "OFT: one block shared by all blocks of a layer (PEFT's block_share)")
    use_cayley_neumann: bool = option(True, "OFT: approximate the Cayley transform by a Neumann series (PEFT's "
                                      "use_cayley_neumann); false = the exact transform (a linear solve)")
    num_cayley_neumann_terms: int = option(5, "OFT: terms of that series (PEFT's num_cayley_neumann_terms)", ge=1)
    layers: Union[list[int], str] = option(
        [], "adapt only modules of these layers (PEFT's layers_to_transform): a list of indices, or 'top:K' for the "
        "last K layers; [] = all. LoRA on the top K layers only lets lora_llm cache the frozen layers below them",
        check=layers_error)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora and self.fused_slices:
            raise ValueError("lora.use_dora does not work with lora.fused_slices (PEFT has no DoRA for fused "
                             "slices): drop one")
        for key, owner in _OWNED.items():
            if self.type not in owner and getattr(self, key) != _default(key):
                raise ValueError(f"lora.{key} applies to lora.type = {' or '.join(map(repr, owner))} only; this config "
                                 f"has lora.type = {self.type!r}: remove lora.{key} or change the type")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def resolve_layers(self, num_layers: int) -> "LoraConfig":
        """This config with `layers` as a sorted list of indices of a num_layers-layer model ('top:K' resolved)."""
        layers = resolve_indices(self.layers, num_layers)
        with values_checked():   # this config's values are checked already; the indices are in range
            return replace(self, layers=layers)

    def matches(self, qualified_name: str) -> bool:
        if any(name_matches(qualified_name, e) for e in self.exclude_modules):
            return False
        if isinstance(self.layers, str):
            raise ValueError(f"lora.layers = {self.layers!r} must be resolved against the model's layer count "
                             "first (LoraConfig.resolve_layers; lora_llm does it)")
        if self.layers and layer_index(qualified_name) not in self.layers:
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
            r = int(self.rank_pattern[key])
        key = pattern_key(self.alpha_pattern, qualified_name)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return r, float(alpha)


# fields that only some adapter types use (the others refuse a value other than the default)
_LORA_ONLY = ("use_dora", "use_rslora", "init", "dropout")
_OWNED = {**{k: ("lora",) for k in _LORA_ONLY},
          **{k: ("lora", "loha", "lokr") for k in ("conv_r", "conv_alpha", "rank_pattern", "alpha_pattern")},
          **{k: ("lokr",) for k in ("decompose_factor", "decompose_both")},
          **{k: ("oft",) for k in ("oft_block_size", "coft", "coft_eps", "block_share", "use_cayley_neumann",
                                   "num_cayley_neumann_terms")}}


def _default(key: str):
    f = LoraConfig.__dataclass_fields__[key]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def name_matches(qualified_name: str, name: str) -> bool:
    """PEFT's list matching: equal, or ends with '.' + name."""
    return qualified_name == name or qualified_name.endswith("." + name)


def pattern_key(patterns: dict, qualified_name: str) -> Optional[str]:
    """PEFT's get_pattern_key: the first key (a regex) such that "(.*\\.)?(key)$" matches the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", qualified_name):
            return key
    return None
