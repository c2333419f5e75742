"""LoRA training-step overhead of lora_core vs PEFT, against the frozen-base lower bound.

Models (random weights): a GPT-2-small-shaped stack (12 layers, 768 wide, LoRA r=8 on c_attn q,v
for ours and on the whole c_attn for PEFT, which has no slice option; plus both on full c_attn),
and a Stable Diffusion 1.5 UNet built from its config (LoRA r=4 on attn2 q/k/v/out, 256x256, batch 1).
Variants are timed round-robin in the same process so machine noise hits them alike.

    python bench/core_overhead.py [--steps 5] [--skip-unet] [--out bench/results/core.md]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lora_core import LoraConfig, add_lora

SD15_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _opt(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4) if params else None


def _timed(step, n_warm, n):
    for _ in range(n_warm):
        step()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def bench(variants: dict, make_step, steps: int, warm: int = 2, rounds: int = 3) -> dict:
    steps_fns = {name: make_step(m) for name, m in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in steps_fns.items():
            times[name] += _timed(fn, warm, max(1, steps // rounds))
            warm = 0 if warm == 0 else 1
    return {name: statistics.median(t) for name, t in times.items()}


def gpt2_variants():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256))
    base.requires_grad_(False)
    ours_qv = copy.deepcopy(base)
    add_lora(ours_qv, LoraConfig(r=8, alpha=16, target_modules=["c_attn"], fused_slices={"c_attn": [1, 0, 1]}))
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(r=8, alpha=16, target_modules=["c_attn"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                                      fan_in_fan_out=True))
    return {"frozen base (lower bound)": base, "lora_core c_attn q,v": ours_qv,
            "lora_core c_attn": ours, "peft c_attn": theirs}


def gpt2_step(model, batch=8, seq=128):
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(0))
    opt = _opt(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    def step():
        x = emb(ids).detach().requires_grad_(opt is None)  # frozen base: backprop to the input
        loss = model(inputs_embeds=x, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def unet_variants():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    base = UNet2DConditionModel(**SD15_UNET)
    base.requires_grad_(False)
    targets = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(r=4, alpha=4, target_modules=targets))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    return {"frozen base (lower bound)": base, "lora_core attn2": ours, "peft attn2": theirs}


def unet_step(model, res=256):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, res // 8, res // 8, generator=g)
    enc = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])
    opt = _opt(model)

    def step():
        x = lat.clone().requires_grad_(opt is None)
        out = model(x, t, encoder_hidden_states=enc).sample
        out.float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def report(title, res, base_key, peft_key):
    lines = [f"### {title}", "", "| variant | s/step | vs frozen base | vs PEFT |", "|---|---|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v:.3f} | {v / res[base_key]:.2f}x | {v / res[peft_key]:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = [f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
             f"median of {a.steps} timed steps per variant (round-robin)\n"]
    res = bench(gpt2_variants(), gpt2_step, a.steps)
    parts.append(report("GPT-2-small-shaped (12x768), batch 8 x 128 tokens, r=8", res,
                        "frozen base (lower bound)", "peft c_attn"))
    if not a.skip_unet:
        res = bench(unet_variants(), unet_step, a.steps)
        parts.append(report("SD 1.5 UNet (859.5M, random weights), 256x256, batch 1, r=4 on attn2", res,
                            "frozen base (lower bound)", "peft attn2"))
    text = "\n".join(parts)
    print(text)
    if a.out:
        from lora_core.io import atomic_write_text
        atomic_write_text(a.out, f"Command: `python bench/core_overhead.py --steps {a.steps}`\n\n" + text)


if __name__ == "__main__":
    main()
