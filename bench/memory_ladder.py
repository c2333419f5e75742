"""Bench: the memory ladder (sd-scripts' VRAM ladder) of a LoRA training step of an SDXL-sized UNet (random
weights) on the CPU: peak memory and step time for each rung, and the preflight's estimate of each.

    OMP_NUM_THREADS=2 python bench/memory_ladder.py [--resolution 256] [--size full] [--out bench/results/memory_ladder.json]

Each rung applies its switches through the trainer's own code (lora_core.lowmem.store_frozen, the UNet's gradient
checkpointing, lora_core.offload.offload_blocks, lora_core.training.make_optimizer) to a fresh UNet of
lora_sd/model_configs/sdxl-base with LoRA r=16 on attn2 (kohya's usual), times a step (after one that makes the
optimizer state; glibc's allocator as training has it), then runs two steps under the torch profiler (peak = the
tensors alive at the start, counted, plus the largest running sum of its raw allocation events) and one more for the
RSS cross-check. With block offloading, the host copies of the offloaded blocks are live tensors on a CPU too; on a
GPU machine they live in host RAM: `device_peak_mib` is the peak without them (the number a GPU would see). `--size`
w2-t2 / w4 / w8 divides every channel count by 2 / 4 / 8 (w2-t2: and keeps at most 2 transformer layers per block):
reduced SDXL-like UNets, whose numbers are not the SDXL ladder (the estimate is checked against them too:
bench/preflight_memory.py).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import subprocess
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
    "fp8 + checkpointing + adamw8bit": {"weights": "fp8_e4m3", "precision": "bf16", "checkpointing": True,
                                         "optimizer": "adamw8bit"},
    "fp8 + checkpointing + adafactor + fused backward": {"weights": "fp8_e4m3", "precision": "bf16",
                                                        "checkpointing": True, "optimizer": "adafactor",
                                                        "fused": True},
}
LORA = {"r": 16, "alpha": 16.0, "target_modules": "cross_attn"}


# --size: SDXL-base's UNet ("full") or a reduced one: (channel counts divided by, transformer layers per block at most)
SIZES = {"full": (1, None), "w2-t2": (2, 2), "w4": (4, None), "w8": (8, None)}


def sdxl_unet(size: str = "full"):
    """An SDXL-base-shaped UNet with random weights, at `size` (SIZES: its channel counts divided, its deepest
    transformer stacks cut)."""
    from diffusers import UNet2DConditionModel
    from lora_sd.single_file import CONFIG_DIR
    scale, depth = SIZES[size]
    cfg = dict(UNet2DConditionModel.load_config(str(CONFIG_DIR / "sdxl-base" / "unet")))
    if scale > 1:
        cfg["block_out_channels"] = [c // scale for c in cfg["block_out_channels"]]
        cfg["cross_attention_dim"] //= scale
        cfg["addition_time_embed_dim"] //= scale
        cfg["projection_class_embeddings_input_dim"] = 1280 // scale + 6 * cfg["addition_time_embed_dim"]
        cfg["attention_head_dim"] = [max(1, h // scale) for h in cfg["attention_head_dim"]]
        cfg["norm_num_groups"] = 32 // scale if scale <= 4 else 8
    if depth:
        cfg["transformer_layers_per_block"] = [min(n, depth) for n in cfg["transformer_layers_per_block"]]
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
    for name in ("vae", "text_encoder", "text_encoder_2"):   # frozen, as the trainer has them
        getattr(pipe, name).requires_grad_(False)
    pipe.unet, pipe.vae_scale_factor = unet, 8
    cfg.data.resolution = resolution
    rep = PreflightReport("sd-train", "bench")
    measure(cfg, pipe, "cpu", rep)
    return rep.memory


def run_rung(name: str, rung: dict, resolution: int, size: str = "full", categories: bool = False) -> dict:
    """One rung: its estimate, its measured peak (allocation_peak; `categories`: also the profiler's memory
    timeline by category, slow), what it holds counted exactly, the RSS cross-check and the step time."""
    from lora_core import LoraConfig, add_lora
    from lora_core.dtypes import autocast_dtype
    from lora_sd.preflight import unet_inputs
    import torch
    torch.manual_seed(0)
    unet = sdxl_unet(size)
    cfg = settings(rung)
    if rung.get("offload") == -1:   # every block
        from lora_core.offload import model_blocks
        cfg.train.offload_blocks = len(model_blocks(unet))
    unet.requires_grad_(False)
    add_lora(unet, LoraConfig(**{**LORA, "target_modules": r".*attn2\.(to_q|to_k|to_v|to_out\.0)"}))
    n_params = sum(p.numel() for p in unet.parameters())
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

    # the step time first, with glibc's allocator as training has it (a step that makes the optimizer state, then
    # the timed one); then the memory, with RSS made to follow the live bytes (fixed_mmap_threshold)
    step()
    t = time.perf_counter()
    step()
    step_s = time.perf_counter() - t
    fixed_mmap_threshold()
    reset_peak_rss()   # what the timed steps left in glibc's heap goes back to the system first
    peak = allocation_peak(step, sum(held_bytes(unet, opt).values()) + host + sum(
        t.numel() * t.element_size() for t in _tensors(inputs)))
    by_kind = profiled_peak(step)[1] if categories else {}
    held = held_bytes(unet, opt)
    reset_peak_rss()
    rss0 = status_bytes("VmRSS")
    step()
    rss_step = status_bytes("VmHWM") - rss0
    res = {"rung": name, **rung, "size": size, "unet_parameters": n_params,
           "step_s": round(step_s, 2), "peak_mib": round(peak / 2**20, 1),
           "device_peak_mib": round((peak - host) / 2**20, 1),
           "peak_parts_mib": {k: round(v / 2**20, 1) for k, v in by_kind.items() if v},
           "held_mib": {k: round(v / 2**20, 1) for k, v in held.items()},
           "rss_step_growth_mib": round(rss_step / 2**20, 1),
           "rss_peak_mib": round((sum(held.values()) + rss_step) / 2**20, 1),
           "estimate_mib": round(est["total_bytes"] / 2**20, 1),
           "estimate_parts_mib": {k: round(v / 2**20, 1) for k, v in est["parts"].items()}}
    res["estimate_ratio"] = round(est["total_bytes"] / (peak - host), 3)
    unet = opt = None   # the closure step() holds them: clear its cells, then collect
    gc.collect()
    return res


def held_bytes(unet, opt) -> dict:
    """What the model and the optimizer hold between steps, counted exactly: the frozen weights and buffers as
    stored on the device (offloaded blocks: the ones resident now; their host copies are not the model's tensors),
    the adapter, the optimizer state."""
    from lora_core.lowmem import stored_bytes
    adapter = sum(p.numel() * p.element_size() for p in unet.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if hasattr(t, "numel") and t.dim() > 0)
    return {"frozen weights": stored_bytes(unet), "adapter": adapter, "optimizer state": state}


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Free what can be freed (Python garbage, glibc's free heap) and restart the peak RSS (VmHWM) from now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def fixed_mmap_threshold() -> None:
    """Allocations of 64 KiB and more are their own mappings, returned to the system when freed (glibc otherwise
    raises the threshold after frees and keeps freed tensors in its heap): RSS then follows the live bytes."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD


def _tensors(x) -> list:
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return [x] if hasattr(x, "element_size") else []


def allocation_peak(step, live_before: int) -> int:
    """The peak of live tensor bytes during two step()s: `live_before` (the tensors alive at the start, counted)
    plus the largest running sum of every allocation and free in between (the profiler's raw memory events)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return live_before + int(np.cumsum([b for _, b in events]).max())


# the torch profiler's memory categories, in the order of its timeline's columns 1.. (0 is unused)
CATEGORIES = ("parameters", "optimizer state", "inputs", "temporaries", "activations", "gradients",
              "autograd detail", "unknown")


def profiled_peak(step) -> tuple[int, dict]:
    """(the largest sum of live tensor bytes during two step()s (torch profiler memory timeline), those bytes by
    the profiler's category at that moment)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    sizes = np.array(sizes)
    at = int(sizes.sum(axis=1).argmax())
    return int(sizes[at].sum()), dict(zip(CATEGORIES, (int(v) for v in sizes[at, 1:])))


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
    p.add_argument("--size", choices=list(SIZES), default="full", help="SDXL's UNet (full) or a reduced one")
    p.add_argument("--rungs", default="", help="comma-separated rung names (default: all)")
    p.add_argument("--out", default="", help="write the rows as JSON (only for a run at --size full)")
    p.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import lora_sd  # noqa: F401 - quiets optional packages' import messages before diffusers loads
    names = [n.strip() for n in a.rungs.split(",")] if a.rungs else list(RUNGS)
    if a.row_only:   # one rung, in this process (the parent runs each rung so)
        print(json.dumps(run_rung(names[0], RUNGS[names[0]], a.resolution, a.size)), flush=True)
        return 0
    rows = []
    for n in names:   # each rung in a fresh process: nothing of the last rung's model is left to count (or to OOM)
        cmd = [sys.executable, __file__, "--resolution", str(a.resolution), "--size", a.size, "--rungs", n, "--row-only"]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if a.out:
        if a.size != "full":
            raise SystemExit("--out: only a run at --size full (the SDXL-sized UNet) is the ladder to keep")
        from lora_core.files import atomic_write_json
        import torch
        atomic_write_json(Path(a.out), {"command": "python " + shlex.join(["bench/memory_ladder.py"] + sys.argv[1:]),
                                        "resolution": a.resolution, "lora": LORA, "torch": torch.__version__,
                                        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                                        "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
