"""The metadata strings of an SD adapter file that describe the adapter itself (no torch here).

lora_sd.formats.adapter_metadata (the one entry, used by `train`, `convert` and `merge`) joins them with
the run's facts. Network keys, from the modules an adapter holds (each with .rank, .alpha, .is_kxk and
.magnitude and .kind, lora_sd.formats.ModuleLora / ModuleLyco), as kohya sd-scripts and LyCORIS write them:
  ss_network_module  networks.lora (kohya's LoRA / LoCon), lycoris.kohya with DoRA (kohya has none), LoHa or LoKr
  ss_network_dim     the commonest rank of the linear and 1×1 modules (network_dim), k×k convs alone otherwise
  ss_network_alpha   the commonest alpha of those modules, read from the modules (never recomputed)
  ss_network_args    JSON of strings: conv_dim / conv_alpha (commonest of the k×k convs) when k×k convs are
                     adapted; algo = locon and dora_wd = True with DoRA, algo = loha / lokr / full (LyCORIS' names;
                     the commonest type when a file mixes them); full (whole weight differences) adds
                     trained_as = oft when they are a trained OFT's (docs/sd.md), and no conv_dim / conv_alpha
  lora_sd.module_types                           JSON {module: type} of the modules whose type is not algo's
  lora_sd.module_ranks / lora_sd.module_alphas   JSON {module: value} of the modules that differ from those
  lora_sd.dora_modules                           JSON [module] when DoRA is on some modules only
  lora_sd.fused_ranks   kohya SD 3.x / Flux files: JSON {kohya module: [rank of each diffusers part, 0 = none]}
                        of the fused native modules (lora_sd.formats.fuse), so they split back exactly
Base keys, from the architecture (sd1 / sd2 / sdxl / sd3 / flux): ss_base_model_version, ss_v2, modelspec.architecture.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Mapping, Optional

MODULE_RANKS, MODULE_ALPHAS, DORA_MODULES = "lora_sd.module_ranks", "lora_sd.module_alphas", "lora_sd.dora_modules"
MODULE_TYPES = "lora_sd.module_types"
FUSED_RANKS = "lora_sd.fused_ranks"   # SD 3.x / Flux kohya files: {native module: [rank of each part]}
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                MODULE_RANKS, MODULE_ALPHAS, DORA_MODULES, MODULE_TYPES, FUSED_RANKS)
# kohya's ss_base_model_version of each lora_sd.models.arch_of
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


# the SAI model spec's architecture of each base model (SD 2.x: 512-base or 768-v by its prediction type)
MODELSPEC = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
             "sdxl": "stable-diffusion-xl-v1-base",
             # kohya's for an SD 3.x / FLUX.1 whose variant (-5-medium, -dev, ...) is not known
             "sd3": "stable-diffusion-3", "flux": "flux-1"}


def modelspec_architecture(arch: str, prediction_type: str, lora: bool = True) -> str:
    """The SAI model spec's architecture of `arch` (sd1 / sd2 / sdxl): of a LoRA for it, or of the model."""
    base = MODELSPEC["sd2-v" if arch == "sd2" and prediction_type == "v_prediction" else arch]
    return f"{base}/lora" if lora else base


def prediction_type_of(metadata: Mapping[str, str]) -> str:
    """The base's prediction type a file's metadata records (modelspec.prediction_type, kohya's
    ss_v_parameterization), else epsilon."""
    if metadata.get("modelspec.prediction_type"):
        return metadata["modelspec.prediction_type"]
    return "v_prediction" if metadata.get("ss_v_parameterization") == "True" else "epsilon"


def base_metadata(arch: str, prediction_type: str) -> dict[str, str]:
    return {"ss_base_model_version": BASE_MODEL_VERSION[arch], "ss_v2": str(arch == "sd2"),
            "modelspec.architecture": modelspec_architecture(arch, prediction_type)}


def _commonest(modules) -> tuple[int, float]:
    """The commonest (rank, alpha) of `modules` (the first seen of equally common ones)."""
    return Counter((m.rank, m.alpha) for m in modules).most_common(1)[0][0]


def _network_args(conv: Optional[tuple[int, float]], dora: bool, algo: str = "lora") -> dict[str, str]:
    """kohya's / LyCORIS' network_args (strings, as given on their command lines); `algo`: the LyCORIS type."""
    args = {"conv_dim": str(conv[0]), "conv_alpha": str(conv[1])} if conv else {}
    if algo != "lora":
        return {"algo": algo, **args}
    return {"algo": "locon", **args, "dora_wd": "True"} if dora else args


def _differing(groups) -> tuple[dict, dict]:
    """({module: rank}, {module: alpha}) of the modules whose rank / alpha is not their group's (rank, alpha)."""
    ranks, alphas = {}, {}
    for modules, (r, alpha) in groups:
        ranks.update({k: m.rank for k, m in modules.items() if m.rank != r})
        alphas.update({k: m.alpha for k, m in modules.items() if m.alpha != alpha})
    return dict(sorted(ranks.items())), dict(sorted(alphas.items()))


def network_metadata(modules: Mapping) -> dict[str, str]:
    """The network keys (see the module docstring) of {module name: ModuleLora}."""
    if not modules:
        raise ValueError("an adapter with no modules has no metadata")
    kxk = {k: m for k, m in modules.items() if m.is_kxk}
    linear = {k: m for k, m in modules.items() if not m.is_kxk}
    r, alpha = _commonest((linear or kxk).values())
    conv = _commonest(kxk.values()) if kxk else None
    dora = sorted(k for k, m in modules.items() if m.magnitude is not None)
    algo = Counter(m.kind for m in modules.values()).most_common(1)[0][0]
    meta = {"ss_network_module": "lycoris.kohya" if dora or algo != "lora" else "networks.lora",
            "ss_network_dim": str(r), "ss_network_alpha": str(alpha)}
    origins = sorted({m.origin for m in modules.values() if m.kind == "full" and m.origin})
    args = _network_args(None if algo == "full" else conv, bool(dora), algo)
    if algo == "full" and origins:
        args["trained_as"] = "+".join(origins)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    ranks, alphas = _differing(((linear, (r, alpha)), (kxk, conv or (r, alpha))))
    if ranks:
        meta[MODULE_RANKS] = json.dumps(ranks)
    if alphas:
        meta[MODULE_ALPHAS] = json.dumps(alphas)
    if dora and len(dora) < len(modules):
        meta[DORA_MODULES] = json.dumps(dora)
    others = {k: m.kind for k, m in sorted(modules.items()) if m.kind != algo}
    if others:
        meta[MODULE_TYPES] = json.dumps(others)
    return meta
