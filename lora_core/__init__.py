"""lora_core: low-rank adapters injected into frozen PyTorch models.

Knows nothing of Stable Diffusion or GPT-2. The MindSpore twin is `lora_core.mindspore`.
"""
from .config import LoraConfig
from .io import (atomic_path, atomic_save_safetensors, atomic_write_json, atomic_write_text, load_lora,
                 read_safetensors, save_lora)
from .layers import LoraLayer
from .model import (DEFAULT, LoraLoadError, add_lora, delete_adapter, enable_lora, load_lora_state_dict,
                    lora_config, lora_disabled, lora_layers, lora_parameters, lora_state_dict, merge_lora,
                    remove_lora, set_adapter, set_scale, unmerge_lora)

__all__ = [
    "LoraConfig", "LoraLayer", "LoraLoadError", "DEFAULT",
    "add_lora", "merge_lora", "unmerge_lora", "remove_lora", "delete_adapter",
    "set_adapter", "set_scale", "enable_lora", "lora_disabled", "lora_layers", "lora_parameters", "lora_config",
    "lora_state_dict", "load_lora_state_dict", "save_lora", "load_lora", "read_safetensors",
    "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
]
__version__ = "0.1.0"
