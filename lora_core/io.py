"""The backend-neutral safetensors adapter file (`save_lora` / `load_lora`), and atomic safetensors writes."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig
from .files import PathLike, atomic_path
from .model import (DEFAULT, adapter_names, add_lora, check_finite, load_lora_state_dict, lora_config, lora_layers,
                    lora_state_dict, rollback)
from .errors import AdapterExistsError, LoraLoadError, NonFiniteError

FORMAT = "lora_core"
FORMAT_VERSION = "1"


def atomic_save_safetensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LoraLoadError(f"{path}: not a readable safetensors file ({e})") from e


def config_metadata(config: LoraConfig, targets: list[str]) -> dict[str, str]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lora_config": json.dumps(config.to_dict()),
        "targets": json.dumps(sorted(targets)),
        "r": str(config.r),
        "alpha": str(config.alpha),
    }


def save_lora(path: PathLike, model: nn.Module, metadata: Optional[dict] = None, adapter: str = DEFAULT) -> None:
    """Write one adapter (and modules_to_save) with its config to a safetensors file, atomically.
    `metadata` adds string fields (e.g. base_model, steps)."""
    cfg = lora_config(model, adapter)
    targets = [n for n, l in lora_layers(model) if adapter in l.adapters]
    meta = config_metadata(cfg, targets)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_save_safetensors(path, lora_state_dict(model, adapter), meta)


def read_lora_config(metadata: dict[str, str], path: PathLike = "?") -> tuple[LoraConfig, list[str]]:
    if metadata.get("format") != FORMAT or "lora_config" not in metadata:
        raise LoraLoadError(f"{path}: not a {FORMAT} adapter file (metadata key 'format' is "
                            f"{metadata.get('format')!r}); convert it or use the matching loader")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LoraLoadError(f"{path}: unsupported format_version {metadata.get('format_version')!r}")
    return LoraConfig(**json.loads(metadata["lora_config"])), json.loads(metadata.get("targets", "[]"))


def load_lora(path: PathLike, model: nn.Module, adapter: str = DEFAULT) -> LoraConfig:
    """Add adapter `adapter` (LoRA weights and its own copies of the modules to save, e.g. a head)
    to `model` from a file written by save_lora. Strict: any missing, unexpected or mis-shaped key,
    or a tensor holding NaN/inf, raises an error naming it, and the model is left as it was."""
    sd, meta = read_safetensors(path)
    cfg, targets = read_lora_config(meta, path)
    if adapter in adapter_names(model):
        raise AdapterExistsError(f"{path}: the model already has an adapter named {adapter!r}; "
                                 f"load it under another name or delete_adapter it first")
    try:
        check_finite(sd, str(path))
    except NonFiniteError as e:
        raise NonFiniteError(f"adapter file {e}") from None
    # adapt exactly the modules named in the file
    exact = LoraConfig(**{**cfg.to_dict(), "target_modules": "|".join(re.escape(t) for t in targets) or cfg.target_modules,
                          "exclude_modules": []})
    try:
        with rollback(model, adapter):
            wrapped = add_lora(model, exact, adapter)
            if sorted(wrapped) != sorted(targets):
                raise LoraLoadError(f"modules in the file but not in the model: "
                                    f"{sorted(set(targets) - set(wrapped))[:10]}")
            load_lora_state_dict(model, sd, adapter)
            model._lora_configs[adapter] = cfg
    except (LoraLoadError, NonFiniteError) as e:
        raise type(e)(f"{path}: {e}") from None
    except Exception as e:
        raise LoraLoadError(f"{path}: {e}") from e
    return cfg
