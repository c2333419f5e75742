"""pytest plugin for .ci/run: list the tests whose outcome may depend on ../shared (LORA_SHARED_DIR).

A test may depend on it when something asks `lora_core.paths.shared_dir()` where the shared data is
(shared_path() asks it too): in the pytest process, during the test or during the setup of any fixture it
uses (a fixture as defined in one module or conftest: another module's fixture of the same name is another
fixture); or in a process that the test or such a fixture started, or any process those started in turn.
Child processes report through .ci/sitecustomize.py: they inherit $LORA_SHARED_USAGE_LOG and
$LORA_SHARED_USAGE_OWNER (the test or fixture running when they started) and log the owner when they ask.
A child that cannot report counts as asking: one started with an environment without .ci on its
PYTHONPATH or without the owner, or with a Python flag that skips sitecustomize (-I, -E, -S); and one still
running when the run ends counts for its owner. Every other test provably never looks at ../shared, so its
outcome does not depend on it. The list (one node id a line) goes to --shared-usage-out (under pytest-xdist
each worker writes its part and the main process joins them); .ci/run reruns exactly those tests with
LORA_SHARED_DIR pointing to a missing folder.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CI_DIR = str(Path(__file__).resolve().parent)
LOG_VAR, OWNER_VAR = "LORA_SHARED_USAGE_LOG", "LORA_SHARED_USAGE_OWNER"
SKIPS_SITECUSTOMIZE = re.compile(r"(^|\s)-[a-zA-Z]*[IES]")   # python -I / -E / -S (conservative for other tools)

_count = 0
_tainted_fixtures: set[str] = set()
_children: list[tuple[subprocess.Popen, str]] = []   # (child, its owner) of those that report
_tests: dict[str, tuple[str, frozenset]] = {}   # "test NODEID" -> (listed id, keys of the fixtures it uses)
_dependent: set[str] = set()                    # owners: "test NODEID"


def _note() -> None:
    global _count
    _count += 1


def child_reports(popen_args: tuple, popen_kwargs: dict) -> bool:
    """Whether the child (and what it starts) will log its shared_dir() calls under the current owner."""
    try:
        env = popen_kwargs.get("env", popen_args[10] if len(popen_args) > 10 else None)
        env = os.environ if env is None else env
        cmd = popen_args[0] if popen_args else popen_kwargs.get("args", "")
        words = [cmd] if isinstance(cmd, (str, bytes, os.PathLike)) else list(cmd)
        return (env.get(LOG_VAR) == os.environ.get(LOG_VAR) and env.get(OWNER_VAR) == os.environ.get(OWNER_VAR)
                and CI_DIR in env.get("PYTHONPATH", "").split(os.pathsep)
                and not any(SKIPS_SITECUSTOMIZE.search(os.fsdecode(w)) for w in words))
    except (TypeError, ValueError, AttributeError):   # an environment or command of another shape: assume it asks
        return False


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
    fd, log = tempfile.mkstemp(prefix="shared-usage-", suffix=".log")
    os.close(fd)
    os.environ[LOG_VAR] = log
    popen_init = subprocess.Popen.__init__

    def init(self, *a, **k):
        if child_reports(a, k):
            _children.append((self, os.environ.get(OWNER_VAR, "")))
        else:
            _note()
        popen_init(self, *a, **k)
    subprocess.Popen.__init__ = init


def _key(fixturedef) -> str:
    """A fixture as defined in one place (a module's `tiny` is not another module's `tiny`)."""
    return f"{getattr(fixturedef, 'baseid', '')}::{fixturedef.argname}"


def _fixture_keys(item) -> frozenset:
    """The keys of every fixture the test uses, with each definition an override may reach."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return frozenset(_key(d) for name in getattr(item, "fixturenames", ()) for d in defs.get(name, ()))


def _rebind(config) -> None:
    """Modules that did `from lora_core.paths import shared_dir` hold the original: point them to the wrapper."""
    original, wrapper = config._shared_usage
    for mod in list(sys.modules.values()):
        if getattr(mod, "shared_dir", None) is original:
            mod.shared_dir = wrapper


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _rebind(request.config)
    before, owner = _count, os.environ.get(OWNER_VAR)
    os.environ[OWNER_VAR] = "fixture " + _key(fixturedef)
    yield
    if owner is None:
        del os.environ[OWNER_VAR]
    else:
        os.environ[OWNER_VAR] = owner
    if _count != before:
        _tainted_fixtures.add(_key(fixturedef))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _rebind(item.config)
    before, owner = _count, "test " + item.nodeid
    os.environ[OWNER_VAR] = owner
    yield
    # the test file relative to the working directory (the node id is relative to pytest's rootdir,
    # which an option value such as --shared-usage-out /tmp/... can move), then the rest of the id
    rest = item.nodeid.partition("::")[2]
    _tests[owner] = (os.path.relpath(str(item.path)) + ("::" + rest if rest else ""), _fixture_keys(item))
    if _count != before:
        _dependent.add(owner)


def _children_asked() -> tuple[set[str], set[str]]:
    """The tests and fixtures whose child processes asked shared_dir() (from the children's log)."""
    text = Path(os.environ[LOG_VAR]).read_text(encoding="utf-8")
    owners = set(text.split("\n")) - {""}
    owners |= {owner for child, owner in _children if child.poll() is None}   # it may still ask, after this read
    return ({o for o in owners if o.startswith("test ")},
            {o.removeprefix("fixture ") for o in owners if o.startswith("fixture ")})


def _worker(config) -> str:
    """The pytest-xdist worker id ("gw0", ...) of this process; "" in the main process."""
    return getattr(config, "workerinput", {}).get("workerid", "")


def pytest_sessionfinish(session, exitstatus):
    out = session.config.getoption("--shared-usage-out")
    tests, fixtures = _children_asked()
    fixtures |= _tainted_fixtures
    os.unlink(os.environ.pop(LOG_VAR))
    if not out:
        return
    dependent = [listed for owner, (listed, keys) in _tests.items()
                 if owner in _dependent or owner in tests or keys & fixtures]
    worker = _worker(session.config)
    if worker:   # under pytest-xdist each worker lists its own tests; the main process joins the lists
        Path(f"{out}.{worker}").write_text("".join(n + "\n" for n in dependent), encoding="utf-8")
        return
    for part in sorted(Path(out).parent.glob(Path(out).name + ".gw*")):
        dependent += part.read_text(encoding="utf-8").splitlines()
        part.unlink()
    with open(out, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in dependent))
    print(f"\n{len(dependent)} test(s) may depend on ../shared: listed in {out}")
