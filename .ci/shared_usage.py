"""pytest plugin for .ci/run: list the tests whose outcome may depend on ../shared (LORA_SHARED_DIR).

A test may depend on it when, during the test or during the setup of any fixture it uses, something
asks `lora_core.paths.shared_dir()` where the shared data is (shared_path() asks it too), or a
subprocess is started (the child may ask). Every other test provably never looks at ../shared, so
its outcome does not depend on it. The list (one node id a line) goes to --shared-usage-out; .ci/run
reruns exactly those tests with LORA_SHARED_DIR pointing to a missing folder.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_count = 0
_tainted_fixtures: set[str] = set()
_dependent: list[str] = []


def _note() -> None:
    global _count
    _count += 1


def pytest_addoption(parser):
    parser.addoption("--shared-usage-out", default=None, help="write the ids of tests that may use ../shared here")


def pytest_configure(config):
    import lora_core.paths as paths
    original = paths.shared_dir

    def shared_dir(*a, **k):
        _note()
        return original(*a, **k)
    paths.shared_dir = shared_dir            # shared_path() calls it through the module
    config._shared_usage = (original, shared_dir)
    popen_init = subprocess.Popen.__init__

    def init(self, *a, **k):
        _note()
        popen_init(self, *a, **k)
    subprocess.Popen.__init__ = init


def _rebind(config) -> None:
    """Modules that did `from lora_core.paths import shared_dir` hold the original: point them to the wrapper."""
    original, wrapper = config._shared_usage
    for mod in list(sys.modules.values()):
        if getattr(mod, "shared_dir", None) is original:
            mod.shared_dir = wrapper


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _rebind(request.config)
    before = _count
    yield
    if _count != before:
        _tainted_fixtures.add(fixturedef.argname)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _rebind(item.config)
    before = _count
    yield
    if _count != before or _tainted_fixtures & set(getattr(item, "fixturenames", ())):
        # the test file relative to the working directory (the node id is relative to pytest's rootdir,
        # which an option value such as --shared-usage-out /tmp/... can move), then the rest of the id
        rest = item.nodeid.partition("::")[2]
        _dependent.append(os.path.relpath(str(item.path)) + ("::" + rest if rest else ""))


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--shared-usage-out")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in _dependent))
        print(f"\n{len(_dependent)} test(s) may depend on ../shared: listed in {out}")
