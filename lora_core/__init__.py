"""lora_core: low-rank adapters injected into frozen PyTorch models.

Knows nothing of Stable Diffusion or GPT-2. The MindSpore twin is `lora_core.mindspore`.
Importing the package imports no torch: the run contract (`lora_core.run`), atomic files
(`lora_core.files`), configs (`lora_core.config`, `lora_core.configfile`) and the other modules that
pyproject.toml's import-linter contract lists are torch-free, and the torch API below is loaded on
first use.
"""
from __future__ import annotations

import importlib
import logging

from .config import LoraConfig
from .errors import (AdapterExistsError, HeadConflictError, LoraLoadError, MergeOverflowError, NonFiniteError,
                     TargetMatchError, UnknownAdapterError)
from .files import atomic_path, atomic_write_json, atomic_write_text

# lazy: the torch API loads on first use, so that the GUI (which imports lora_core.run) never imports torch
_LAZY = {
    "io": ("atomic_save_safetensors", "load_lora", "read_safetensors", "save_lora"),
    "layers": ("LoraLayer", "ModulesToSaveWrapper"),
    "model": ("DEFAULT", "adapter_names", "head_state_dict",
              "add_lora", "add_weight_diffs", "delete_adapter", "enable_lora", "load_lora_state_dict",
              "lora_config", "lora_disabled", "lora_layers", "lora_parameters", "lora_state_dict", "merge_lora",
              "remove_lora", "set_adapter", "set_scale", "unmerge_lora"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}

__all__ = ["LoraConfig", "AdapterExistsError", "HeadConflictError", "LoraLoadError", "MergeOverflowError",
           "NonFiniteError", "TargetMatchError", "UnknownAdapterError", "atomic_path", "atomic_write_text", "atomic_write_json", *_WHERE]
__version__ = "0.1.0"

# torchao (the [lowmem] extra) is imported by diffusers whenever it is installed; its import warns about CUDA
# kernels a CPU build cannot load and about torch.compile details, and diffusers about serialization helpers it
# misses; bitsandbytes (adamw8bit; PEFT imports it whenever installed) warns, through `kernels`, that it cannot
# fetch a 4-bit CPU kernel from the Hub: none of it concerns a run (lora_core.lowmem uses torchao's int8 tensors only, and
# bitsandbytes' 8-bit optimizer only), so keep stderr clean
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer", "bitsandbytes",
              "kernels"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'lora_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
