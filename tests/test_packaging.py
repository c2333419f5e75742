"""Packaging and layering: console scripts answer --help; no arrow points upward."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["lora-sd", "lora-llm", "lora-gui"])
def test_console_scripts_have_help(script):
    exe = BIN / script
    if not exe.exists():
        pytest.fail(f"{exe} is not installed: run `pip install -e .` (make test does)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout.lower()


def _imported_after(code: str) -> set[str]:
    prog = textwrap.dedent(f"""
        import sys
        {code}
        print("\\n".join(sorted({{m.split('.')[0] for m in sys.modules}})))
    """)
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_core_knows_nothing_of_sd_llm_or_gui():
    mods = _imported_after("import lora_core, lora_core.training, lora_core.configfile")
    assert not mods & {"diffusers", "lora_sd", "lora_llm", "lora_gui", "gradio", "app", "mindspore"}


def test_trainers_know_nothing_of_the_gui():
    mods = _imported_after("import lora_sd.cli, lora_llm.cli")
    assert not mods & {"lora_gui", "gradio", "app"}
