"""Every error class of lora_llm (lora_core's own are in lora_core.errors)."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line)."""


class SuiteStopped(RuntimeError):
    """A task's training was stopped (SIGTERM/SIGINT: the GUI's Stop button): the suite stops too."""


# the one line of a MindSpore run without MindSpore (the trainer raises it, `lora-llm check` reports it)
MINDSPORE_MISSING = ('backend = "mindspore" needs MindSpore, which is not installed: pip install ".[mindspore]" '
                     '(or backend = "torch")')
