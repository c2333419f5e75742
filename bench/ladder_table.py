"""Bench: `lora-sd check --table` as a committed file: the preflight's peak-memory ladder of the real-size SD 1.5,
SDXL, SD 3.5 Medium and Flux.1 dev denoisers (meta device, no weights) at 1024², batch 1, LoRA r=16 (kohya's usual)
on each architecture's default targets, AdamW, bf16 compute.

    python bench/ladder_table.py [--resolution 1024] [--out bench/results/ladder_table.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--out", default="bench/results/ladder_table.json")
    a = p.parse_args(argv)
    import torch
    from lora_core.configfile import from_dict
    from lora_core.files import atomic_write_json, atomic_write_text
    from lora_core.preflight import ladder_text
    from lora_sd.config import SDTrainConfig
    from lora_sd.preflight import ladder
    lora = {"r": 16, "alpha": 16.0, "target_modules": "cross_attn"}
    cfg = from_dict(SDTrainConfig, {"data": {"path": "."}, "lora": lora, "train": {"mixed_precision": "bf16"}})
    rows = ladder(cfg=cfg, resolution=a.resolution)
    atomic_write_json(Path(a.out), {"command": "python " + " ".join(["bench/ladder_table.py"] + sys.argv[1:]),
                                    "resolution": a.resolution, "lora": lora, "torch": torch.__version__,
                                    "rows": rows})
    text = ladder_text(rows)
    atomic_write_text(Path(a.out).with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
