"""The codebase's own rules: the layer contract (pyproject's [tool.importlinter], checked by lint-imports), no
import circles, no private name imported across modules, and a `# lazy: <reason>` on every import inside a
function that loads a project module or another package. The analysis is bench/code_health.py's (one home for
it); each test names every offender in its message."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "peft", "mindspore")


def _code_health():
    spec = importlib.util.spec_from_file_location("code_health", ROOT / "bench" / "code_health.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


health = _code_health()


def _offenders(title: str, items) -> str:
    items = list(items)
    return f"{len(items)} {title}:\n" + "\n".join(f"  {x}" for x in items)


def test_the_layer_contract_is_kept():
    """lint-imports: lora_gui > lora_sd | lora_llm > lora_core, and no torch in the GUI or the torch-free core."""
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), f"{lint} is missing: install the dev extra (pip install -e '.[dev]': import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(lint), "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    broken = report[report.find("Broken contracts"):] if "Broken contracts" in report else report
    kept = done.returncode == 0 and "BROKEN" not in report and " KEPT" in report
    assert kept, f"import-linter contracts broken:\n{broken[-6000:]}"


def test_app_imports_the_gui_alone():
    """app.py is a module, not a package, so import-linter cannot check it: it imports lora_gui and no torch."""
    sites = [s for s in health.import_sites() if s.module == "app"]
    wrong = [f"{s.where}: {', '.join(s.targets + s.external)}" for s in sites
             if any(not t.startswith("lora_gui") for t in s.targets) or set(s.external) & set(HEAVY)]
    assert sites and not wrong, _offenders("imports of app.py beyond lora_gui", wrong)


def test_no_import_circles():
    circles = health.scan()["import_circles"]
    assert not circles, _offenders("import circles among the project's modules (every import counts, those "
                                   "inside functions too)", (" <-> ".join(c) for c in circles))


def test_no_private_names_imported_across_modules():
    private = sorted({f"{s.where}: {s.module} <- {p}" for s in health.import_sites() for p in s.private})
    assert not private, _offenders("private names imported from another module (make them public or move "
                                   "the code)", private)


def _needs_reason(site) -> bool:
    """An import inside a function of a project module or of a package outside the standard library."""
    return site.nested and bool(site.targets or set(site.external) - set(sys.stdlib_module_names))


def test_every_lazy_import_says_why():
    missing = [f"{s.where}: {', '.join(s.targets + s.external)}" for s in health.import_sites()
               if _needs_reason(s) and "lazy:" not in s.comment]
    assert not missing, _offenders("imports inside functions without a `# lazy: <reason>` comment (hoist them, "
                                   "or say what importing them on use buys)", missing)


def test_the_checks_see_what_they_look_for():
    """The scanner finds imports inside functions, their comments, and private names: the tests above
    would fail if the code broke the rules."""
    sites = health.import_sites()
    assert any(s.nested and "lazy:" in s.comment for s in sites)
    assert any(s.module == "lora_core.run" and "lora_core.files" in s.targets for s in sites)
    assert health._cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["b", "a"]]
