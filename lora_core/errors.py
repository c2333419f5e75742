"""Every error class of lora_core, in one module (torch-free). Expected errors are ValueErrors: the
command-line boundary (`lora_core.cli_errors`) prints them as one line with exit code 2."""
from __future__ import annotations

from typing import Optional


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf (the run stops on the first one)."""


class RunFolderError(ValueError):
    """The run folder cannot be used as asked; the message names the folder and what to do."""


class OutputExistsError(ValueError):
    """A command's output would replace earlier results (without --overwrite) or one of its inputs."""


class MissingPackageError(ValueError):
    """An optional package that a setting needs is not installed; the message names the install command."""


class RunLockedError(RunFolderError):
    """Another live trainer holds the run folder's lock."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM/SIGINT outside the training loop (model loading, evaluation)."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file (or --set) and the dotted key."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key   # the dotted key at fault, when one is


class LoraLoadError(ValueError):
    """An adapter file is unreadable, of an unsupported kind, or does not fit the model; the message
    names the file and the keys at fault."""


class ModelLoadError(ValueError):
    """A base model could not be loaded (hub id unknown or offline, checkpoint unreadable); the
    message names the field and says what to do."""


class UnknownAdapterError(ValueError):
    """An adapter name the model does not have; the message names it and the known ones."""


class AdapterExistsError(ValueError):
    """add_lora/load_lora with a name the model already has."""


class TargetMatchError(ValueError):
    """lora.target_modules (or modules_to_save) match nothing usable in the model."""


class HeadConflictError(ValueError):
    """Two active adapters own their own copy of the same module to save."""


class NonFiniteError(ValueError):
    """NaN or inf in an adapter tensor (at load) or in a merged weight (at merge)."""


class MergeOverflowError(NonFiniteError):
    """A merge whose fp32 result does not fit the base dtype (fp16/bf16 overflow)."""


class QuantizedMergeError(ValueError):
    """A merge into a base layer whose frozen weight is stored quantized (fp8 / int8: lora_core.lowmem)."""
