"""What the training data's fingerprint (lora_core.fingerprint) costs: at the start of a run (every file hashed),
on a resume of untouched data (a stat per file), and on a resume after the data was copied or touched (every
file hashed again, found unchanged); and, on the real DreamBooth photos of ../shared, the hash against the full
decode that lora_sd.data.scan does of every image at the start anyway.

    python bench/data_fingerprint.py [--files 10000] [--kib 64] [--json bench/results/data_fingerprint.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from lora_core.files import atomic_write_json
from lora_core.fingerprint import DataFile, change_line, fingerprint
from lora_core.paths import shared_path
from lora_sd.data import scan


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def synthetic(n: int, kib: int) -> dict:
    """n files of kib KiB (random bytes: hashing cost depends on the bytes, not the format)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(n):
            (root / f"img_{i:05d}.png").write_bytes(os.urandom(kib * 1024))
        files = [DataFile("image", p.name, p) for p in sorted(root.iterdir())]
        start, t_start = _timed(lambda: fingerprint(files))
        same, t_resume = _timed(lambda: fingerprint(files, known=start))
        for p in root.iterdir():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        touched, t_touched = _timed(lambda: fingerprint(files, known=start))
        assert change_line(start, same) == "" and change_line(start, touched) == ""
    return {"files": n, "kib_each": kib, "start_s": round(t_start, 3), "resume_untouched_s": round(t_resume, 4),
            "resume_after_touch_s": round(t_touched, 3), "mib_per_s_hashed": round(n * kib / 1024 / t_start, 1)}


def real_photos() -> dict:
    """The DreamBooth photos: fingerprint (hash) against lora_sd.data.scan (a full decode of each image)."""
    src = shared_path("data", "dreambooth", "train_512")
    if src is None:
        return {"skipped": "../shared is absent"}
    files = [DataFile("image", p.name, p) for p in sorted(src.glob("*.jpg"))]
    _, t_hash = _timed(lambda: fingerprint(files))
    _, t_scan = _timed(lambda: scan(src))
    mib = sum(f.path.stat().st_size for f in files) / 2 ** 20
    return {"images": len(files), "mib": round(mib, 1), "fingerprint_s": round(t_hash, 3), "scan_decode_s": round(t_scan, 3),
            "fingerprint_over_scan": round(t_hash / t_scan, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--kib", type=int, default=64)
    ap.add_argument("--json", default="bench/results/data_fingerprint.json")
    a = ap.parse_args()
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "synthetic": synthetic(a.files, a.kib),
           "dreambooth": real_photos()}
    atomic_write_json(a.json, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
