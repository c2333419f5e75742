"""The extra cost of the adapter EMA (train.ema_decay) per optimizer step (goal: under 2 %).

A Stable Diffusion UNet from its config (random weights; `--unet-width 320` is SD 1.5, the default 64
keeps a CPU run under a minute) with LoRA r=4 on attn2 q/k/v/out. One step = forward, backward and
AdamW; the EMA step adds lora_core.training.EMA.update. The two are timed round-robin in one process
(the machine may be shared: noise hits both alike), and the EMA update is also timed on its own.

    python bench/ema_overhead.py [--unet-width 64] [--steps 6] [--res 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_core import LoraConfig, add_lora
from lora_core.training import EMA


def _unet(width: int):
    from diffusers import UNet2DConditionModel
    w = (width, width * 2, width * 4, width * 4)
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=w, cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet-width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--res", type=int, default=32, help="latent side (256 px images: 32)")
    ap.add_argument("--json", default=None, help="also write the numbers here (e.g. bench/results/ema_overhead.json)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = _unet(a.unet_width).requires_grad_(False)
    add_lora(unet, LoraConfig(r=4, alpha=4, target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
    unet.to(dev)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ema = EMA(unet, 0.999)
    x = torch.randn(1, 4, a.res, a.res, device=dev)
    t = torch.tensor([500], device=dev)
    cond = torch.randn(1, 77, 768, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step(with_ema: bool, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        unet(x, t, cond).sample.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if with_ema:
            ema.update(n)
        sync()
        return time.perf_counter() - t0

    plain, with_ema, update = [], [], []
    for n in range(a.steps + 2):
        p, e = step(False, n), step(True, n)
        sync()
        t0 = time.perf_counter()
        ema.update(n)
        sync()
        if n >= 2:   # warm-up
            plain.append(p), with_ema.append(e), update.append(time.perf_counter() - t0)
    mp, me, mu = (statistics.median(v) for v in (plain, with_ema, update))
    n_par = sum(p.numel() for p in params)
    print(f"device {dev}, UNet width {a.unet_width}, latent {a.res}x{a.res}, {n_par} LoRA parameters, "
          f"{a.steps} steps (median)")
    print(f"step {mp * 1e3:.1f} ms, step+EMA {me * 1e3:.1f} ms ({(me / mp - 1) * 100:+.2f} %), "
          f"EMA update alone {mu * 1e3:.3f} ms ({mu / mp * 100:.2f} % of a step)")
    if a.json:
        import os
        from lora_core.files import atomic_write_json
        atomic_write_json(a.json, {
            "command": "python bench/ema_overhead.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                                                                  if k != "json" and v is not None),
            "device": dev, "unet_width": a.unet_width, "latent": a.res, "lora_parameters": n_par, "steps": a.steps,
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "step_ms": mp * 1e3, "step_with_ema_ms": me * 1e3, "ema_update_ms": mu * 1e3,
            "ema_update_share_of_step": mu / mp})


if __name__ == "__main__":
    main()
