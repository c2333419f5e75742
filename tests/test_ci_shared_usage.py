"""How CI finds the tests that may use ../shared (.ci/shared_usage.py, .ci/sitecustomize.py): a child Python
process with .ci on its path logs the test or fixture that started it each time it asks where the shared
data is, and a child that could not log is counted as asking."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / ".ci"
OWNER = "test tests/test_x.py::test_y"


def _child_log(tmp_path, code: str) -> str:
    log = tmp_path / "usage.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CI), str(ROOT)]), "LORA_SHARED_USAGE_LOG": str(log),
           "LORA_SHARED_USAGE_OWNER": OWNER}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), check=True, timeout=120)
    return log.read_text(encoding="utf-8") if log.exists() else ""


def test_a_child_that_asks_logs_its_owner_once_per_question(tmp_path):
    code = "from lora_core.paths import shared_dir, shared_path; shared_dir(); shared_path('tokenizers')"
    assert _child_log(tmp_path, code) == f"{OWNER}\n{OWNER}\n"


def test_a_child_that_does_not_ask_logs_nothing(tmp_path):
    assert _child_log(tmp_path, "import lora_core.paths") == ""


def test_a_child_that_cannot_report_counts_as_asking(monkeypatch):
    spec = importlib.util.spec_from_file_location("shared_usage_under_test", CI / "shared_usage.py")
    su = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(su)
    monkeypatch.setenv(su.LOG_VAR, "/tmp/usage.log")
    monkeypatch.setenv(su.OWNER_VAR, OWNER)
    env = {"PYTHONPATH": su.CI_DIR, su.LOG_VAR: "/tmp/usage.log", su.OWNER_VAR: OWNER}
    cmd = [sys.executable, "-c", "pass"]
    assert su.child_reports((cmd,), {"env": env})
    assert not su.child_reports(([sys.executable, "-I", "-c", "pass"],), {"env": env})   # skips sitecustomize
    assert not su.child_reports((cmd,), {"env": {**env, "PYTHONPATH": str(ROOT)}})       # .ci not on its path
    assert not su.child_reports((cmd,), {"env": {**env, su.OWNER_VAR: "test another"}})
    assert not su.child_reports((cmd,), {"env": {k: v for k, v in env.items() if k != su.LOG_VAR}})
