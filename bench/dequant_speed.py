"""Bench: how fast a quantized frozen weight becomes a compute-dtype weight on the CPU (issue 29 §5's step time).

    OMP_NUM_THREADS=2 python bench/dequant_speed.py [--rounds 10] [--out bench/results/dequant_speed.json]

Every Linear / Conv2d weight shape of SDXL-base's UNet that occurs more than a handful of times (random weights,
quantized as lora_core.lowmem does), each cast to bf16 and to fp32 once per round, in the order: a warm-up round,
then `--rounds` timed ones; nanoseconds per weight element, the fastest round. Compared, on the same tensors:
- fp8_e4m3: torch's own cast (`q.to(dtype)`) against lora_core.lowmem.fp8_cast (bits moved into bf16's, one
  multiply), which the quantized layers use;
- int8: torchao's `dequantize()` (scale applied, fp32, then cast: what the layers did before) against the plain
  cast of the int8 rows (`q.to(dtype)`, the scale then multiplies the layer's output), which they use now.
Each pair is checked equal (fp8: bit for bit; int8: the cast times the scale equals torchao's dequantize()).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (out, in[, kh, kw]) of SDXL-base's UNet: the 1280- and 640-wide attention and feed-forward Linears (attn2's
# k/v read the 2048-wide text), and the 3x3 ResNet convolutions
SHAPES = [(1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120), (640, 640), (640, 2048), (5120, 640),
          (640, 2560), (1280, 1280, 3, 3), (640, 640, 3, 3)]


def fastest(fn, tensors, rounds: int) -> float:
    """ns per element of fn over every tensor, the fastest of `rounds` rounds after a warm-up one."""
    n = sum(t.numel() for t in tensors)
    best = float("inf")
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        for t in tensors:
            fn(t)
        if r:
            best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import torch
    from lora_core.lowmem import fp8_cast, fp8_quantize, int8_quantize, torchao_int8
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.02 for s in SHAPES]
    fp8 = [fp8_quantize(w)[0] for w in weights]
    linear = [w for w in weights if w.dim() == 2]   # torchao's int8 has no convolution
    int8 = [int8_quantize(w) for w in linear]
    ao = [torchao_int8(w) for w in linear]
    assert all(torch.equal(q.float() * s[:, None], t.dequantize()) for (q, s), t in zip(int8, ao))
    rows = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[1]
        assert all(torch.equal(fp8_cast(q, dtype), q.to(dtype)) for q in fp8)
        rows[name] = {
            "fp8 torch cast": fastest(lambda q: q.to(dtype), fp8, a.rounds),
            "fp8 lora_core fp8_cast": fastest(lambda q: fp8_cast(q, dtype), fp8, a.rounds),
            "int8 torchao dequantize": fastest(lambda t: t.dequantize().to(dtype), ao, a.rounds),
            "int8 cast (scale on the output)": fastest(lambda q: q.to(dtype), [q for q, _ in int8], a.rounds)}
        rows[name] = {k: round(v, 3) for k, v in rows[name].items()}
        r = rows[name]
        r["fp8 speed-up"] = round(r["fp8 torch cast"] / r["fp8 lora_core fp8_cast"], 2)
        r["int8 speed-up"] = round(r["int8 torchao dequantize"] / r["int8 cast (scale on the output)"], 2)
        print(name, json.dumps(r), flush=True)
    if a.out:
        from lora_core.files import atomic_write_json
        atomic_write_json(Path(a.out), {
            "command": "OMP_NUM_THREADS=2 python " + " ".join(["bench/dequant_speed.py"] + sys.argv[1:]),
            "what": "ns per weight element to turn SDXL-base UNet-shaped quantized weights into the compute dtype "
                    "on the CPU, fastest of --rounds rounds",
            "shapes": SHAPES, "elements": sum(w.numel() for w in weights), "ns_per_element": rows,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
