"""Imported by every Python process that .ci/run's test run starts (.ci is on their PYTHONPATH).

When $LORA_SHARED_USAGE_LOG is set (.ci/shared_usage.py sets it for the pytest process, and children
inherit it), this process appends $LORA_SHARED_USAGE_OWNER (the test or fixture that started the process
tree, also inherited) to that log each time something asks lora_core.paths.shared_dir(): so the
pytest plugin learns which tests' subprocesses looked at ../shared. Nothing happens otherwise.
"""
import importlib.abc
import importlib.machinery
import os
import sys

LOG = os.environ.get("LORA_SHARED_USAGE_LOG")
OWNER = os.environ.get("LORA_SHARED_USAGE_OWNER", "")


def _note() -> None:
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(OWNER + "\n")


def _wrap(module) -> None:
    """shared_dir() logs, then answers; shared_path() calls it through the module, so it logs too."""
    original = module.shared_dir

    def shared_dir(*a, **k):
        _note()
        return original(*a, **k)
    module.shared_dir = shared_dir


class _WrapPaths(importlib.abc.MetaPathFinder):
    """Finds lora_core.paths as usual and wraps its shared_dir as the module loads (before any
    `from lora_core.paths import shared_dir` can copy the original)."""

    def find_spec(self, name, path, target=None):
        if name != "lora_core.paths":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)
        spec.loader.exec_module = exec_and_wrap
        return spec


if LOG:
    sys.meta_path.insert(0, _WrapPaths())
