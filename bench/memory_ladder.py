"""Bench: the memory ladder (sd-scripts' VRAM ladder) of a LoRA training step of an SDXL-sized UNet (random
weights) on the CPU: peak memory and step time for each rung, and the preflight's estimate of each.

    OMP_NUM_THREADS=2 python bench/memory_ladder.py [--resolution 256] [--scale 1] [--out bench/results/memory_ladder.json]

Each rung applies its switches through the trainer's own code (lora_core.lowmem.store_frozen, the UNet's
gradient checkpointing, lora_core.offload.offload_blocks, lora_core.training.make_optimizer) to a fresh UNet of
lora_sd/model_configs/sdxl-base with LoRA r=16 on attn2 (kohya's usual), runs two steps under the torch profiler
(peak = the largest sum of live tensor bytes in its memory timeline, as bench/preflight_memory.py), then one
timed step. With
block offloading, the host copies of the offloaded blocks are live tensors on a CPU too; on a GPU machine they
live in host RAM: `device_peak_mib` is the peak without them (the number a GPU would see). `--scale k` divides
every channel count by k (a quick check that the script works; its numbers are not the SDXL ladder).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# rung name -> switches (weights: model.weight_dtype.denoiser; precision: train.mixed_precision)
RUNGS = {
    "fp32": {"weights": "fp32", "precision": "no"},
    "bf16": {"weights": "bf16", "precision": "bf16"},
    "fp8": {"weights": "fp8_e4m3", "precision": "bf16"},
    "int8": {"weights": "int8", "precision": "bf16"},
    "bf16 + checkpointing": {"weights": "bf16", "precision": "bf16", "checkpointing": True},
    "fp8 + checkpointing": {"weights": "fp8_e4m3", "precision": "bf16", "checkpointing": True},
    "fp8 + checkpointing + offload all blocks": {"weights": "fp8_e4m3", "precision": "bf16", "checkpointing": True,
                                                 "offload": -1},
    "fp8 + checkpointing + adafactor, fused backward": {"weights": "fp8_e4m3", "precision": "bf16",
                                                        "checkpointing": True, "optimizer": "adafactor",
                                                        "fused": True},
}
LORA = {"r": 16, "alpha": 16.0, "target_modules": "cross_attn"}


def sdxl_unet(scale: int):
    """An SDXL-base-shaped UNet with random weights (channel counts divided by `scale`)."""
    from diffusers import UNet2DConditionModel
    from lora_sd.single_file import CONFIG_DIR
    cfg = dict(UNet2DConditionModel.load_config(str(CONFIG_DIR / "sdxl-base" / "unet")))
    if scale > 1:
        cfg["block_out_channels"] = [c // scale for c in cfg["block_out_channels"]]
        cfg["cross_attention_dim"] //= scale
        cfg["addition_time_embed_dim"] //= scale
        cfg["projection_class_embeddings_input_dim"] = 1280 // scale + 6 * cfg["addition_time_embed_dim"]
        cfg["attention_head_dim"] = [max(1, h // scale) for h in cfg["attention_head_dim"]]
        cfg["norm_num_groups"] = 32 // scale if scale <= 4 else 8
    return UNet2DConditionModel.from_config(cfg)


def settings(rung: dict):
    """The rung as an SDTrainConfig (the preflight's estimate reads it; the run applies the same switches)."""
    from lora_core.configfile import from_dict
    from lora_sd.config import SDTrainConfig
    t = {"mixed_precision": rung["precision"], "gradient_checkpointing": rung.get("checkpointing", False),
         "optimizer": rung.get("optimizer", "adamw"), "fused_backward": rung.get("fused", False),
         "offload_blocks": max(rung.get("offload", 0), 0)}
    if t["fused_backward"]:
        t["max_grad_norm"] = 0.0
    return from_dict(SDTrainConfig, {"data": {"path": "."}, "lora": LORA, "train": t,
                                     "model": {"weight_dtype": {"denoiser": rung["weights"]}}})


def apply(unet, cfg):
    """The trainer's switches on `unet` (LoRA added): storage, checkpointing, offloading; returns the optimizer
    and the bytes of the host copies (offloading)."""
    import torch
    from lora_core.dtypes import torch_dtype
    from lora_core.lowmem import store_frozen
    from lora_core.offload import offload_blocks
    from lora_core.training import make_optimizer
    s = cfg.train
    store_frozen(unet, cfg.model.weight_dtype.denoiser, torch_dtype(s.mixed_precision))
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    host = 0
    if s.offload_blocks:
        off = offload_blocks(unet, s.offload_blocks, "cpu")
        host = sum(h.numel() * h.element_size() for t in off.tensors.values() for *_, h in t.slots)
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    return make_optimizer(named, s), host, torch


def estimate(cfg, unet, resolution: int) -> dict:
    """The preflight's estimate for this rung (lora_sd.preflight.measure on a pipeline holding `unet`)."""
    from lora_core.preflight import PreflightReport
    from lora_sd.models import build_tiny_pipeline
    from lora_sd.preflight import measure
    pipe = build_tiny_pipeline(arch="sdxl")
    pipe.unet, pipe.vae_scale_factor = unet, 8
    cfg.data.resolution = resolution
    rep = PreflightReport("sd-train", "bench")
    measure(cfg, pipe, "cpu", rep)
    return rep.memory


def run_rung(name: str, rung: dict, resolution: int, scale: int) -> dict:
    from lora_core import LoraConfig, add_lora
    from lora_core.dtypes import autocast_dtype
    from lora_sd.preflight import unet_inputs
    import torch
    torch.manual_seed(0)
    unet = sdxl_unet(scale)
    cfg = settings(rung)
    if rung.get("offload") == -1:   # every block
        from lora_core.offload import model_blocks
        cfg.train.offload_blocks = len(model_blocks(unet))
    unet.requires_grad_(False)
    add_lora(unet, LoraConfig(**{**LORA, "target_modules": r".*attn2\.(to_q|to_k|to_v|to_out\.0)"}))
    est = estimate(cfg, unet, resolution)
    opt, host, _ = apply(unet, cfg)
    unet.train()
    inputs = unet_inputs(unet, resolution // 8, 1, 77, "cpu", torch.float32, resolution)
    dtype = autocast_dtype(cfg.train.mixed_precision)

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = unet(**inputs).sample.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = profiled_peak(step)   # two steps from the start (the optimizer state is made in the first)
    t = time.perf_counter()
    step()
    step_s = time.perf_counter() - t
    res = {"rung": name, **rung, "step_s": round(step_s, 2), "peak_mib": round(peak / 2**20, 1),
           "device_peak_mib": round((peak - host) / 2**20, 1),
           "estimate_mib": round(est["total_bytes"] / 2**20, 1),
           "estimate_parts_mib": {k: round(v / 2**20, 1) for k, v in est["parts"].items()}}
    res["estimate_ratio"] = round(est["total_bytes"] / (peak - host), 3)
    del unet, opt
    gc.collect()
    return res


def profiled_peak(step) -> int:
    """The largest sum of live tensor bytes during two step()s (torch profiler memory timeline)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.array(sizes).sum(axis=1).max())


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["rung"] == "bf16"), rows[0])
    out = ["| rung | peak (device) MiB | vs bf16 | step s | vs bf16 | preflight estimate MiB | estimate / peak |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['rung']} | {r['device_peak_mib']:,.0f} | {r['device_peak_mib'] / base['device_peak_mib']:.2f}x "
                   f"| {r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f}x | {r['estimate_mib']:,.0f} | "
                   f"{r['estimate_ratio']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--scale", type=int, default=1, help="divide the channel counts by this (1 = SDXL's own)")
    p.add_argument("--rungs", default="", help="comma-separated rung names (default: all)")
    p.add_argument("--out", default="", help="write the rows as JSON (only for a run at --scale 1)")
    a = p.parse_args(argv)
    import lora_sd  # noqa: F401 - quiets optional packages' import messages before diffusers loads
    names = [n.strip() for n in a.rungs.split(",")] if a.rungs else list(RUNGS)
    rows = []
    for n in names:
        rows.append(run_rung(n, RUNGS[n], a.resolution, a.scale))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if a.out:
        if a.scale != 1:
            raise SystemExit("--out: only a run at --scale 1 (the SDXL-sized UNet) is a result to keep")
        from lora_core.files import atomic_write_json
        import torch
        atomic_write_json(Path(a.out), {"command": "python " + " ".join(["bench/memory_ladder.py"] + sys.argv[1:]),
                                        "resolution": a.resolution, "lora": LORA, "torch": torch.__version__,
                                        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                                        "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
