"""Wall time of the test commands on this machine: `make test-fast` (the inner loop) and `make test` (everything,
what CI runs first). Run it on a quiet machine; it writes one JSON with the pytest summary line of each.

    python bench/test_times.py --targets test-fast test --out bench/results/test_times.json
"""
import argparse
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

from lora_core.paths import shared_dir

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^=*\s*(\d+ passed.*?) in [\d.]+s", re.M)


def run(target: str) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(["make", target, "PYTEST_ARGS=-p no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = SUMMARY.findall(p.stdout)
    print(f"make {target}: {wall:.0f} s, exit {p.returncode}: {found[-1] if found else p.stdout[-300:]}")
    return {"target": target, "wall_s": round(wall, 1), "exit": p.returncode, "summary": found[-1] if found else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["test-fast", "test"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "test_times.json")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    rows = [run(t) for t in args.targets]
    shared = shared_dir()
    out = {"commit": commit.strip(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
           "shared_data": str(shared) if shared else None, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
