"""bench/sd_train.py keeps working: at the tiny size (a check of the script, not a benchmark) both the reference
loop and our trainer run one SD 3.5 step and the results file holds their timings and ratios."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sd_train_bench_runs_both_variants_at_tiny_size(tmp_path):
    out = tmp_path / "sd3.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sd_train.py"), "--arch", "sd3", "--size", "tiny",
                           "--variants", "reference,ours", "--warmup", "0", "--steps", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = json.loads(out.read_text())["best"]
    assert set(best) == {"reference", "ours"}
    assert all(len(r["step_times"]) == 1 and r["peak_mb"] > 0 for r in best.values())
    assert best["ours"]["lora_params"] == best["reference"]["lora_params"]   # the same adapter on both sides
    assert set(best["ours"]["ratio_vs_reference"]) == {"min_step", "peak_mb"}
