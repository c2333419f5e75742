"""Every error class of lora_sd (torch-free). The lora_core ones (ConfigError, LoraLoadError,
ModelLoadError, ...) are lora_core.errors'."""
from __future__ import annotations


class DatasetError(ValueError):
    """The dataset cannot be trained on; the message names the folder and files at fault."""


class CaptionError(ValueError):
    """A folder cannot be captioned as asked, or the captioning model is not one lora-sd caption runs."""
