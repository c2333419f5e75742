"""Every error class of lora_llm (lora_core's own are in lora_core.errors)."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


class SuiteStopped(RuntimeError):
    """A task's training was stopped (SIGTERM/SIGINT: the GUI's Stop button): the suite stops too."""
