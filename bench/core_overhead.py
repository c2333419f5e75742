"""LoRA training-step overhead of lora_core vs PEFT, against the frozen-base lower bound.

Models (random weights): a GPT-2-small-shaped stack (12 layers, 768 wide, LoRA r=8 on c_attn q,v
for ours and on the whole c_attn for PEFT, which has no slice option; plus both on full c_attn),
and a Stable Diffusion 1.5 UNet built from its config (LoRA r=4 on attn2 q/k/v/out, 256x256, batch 1).
The adapter variants on the same UNet: DoRA (use_dora) on attn2, and LoCon (the `cross_attn+conv`
preset: attn2 plus the ResNet and down/upsampler 3x3 convs), ours against PEFT's. `--unet-width` shrinks
the UNet (SD 1.5: 320) for a quick run. Variants are timed round-robin in the same process so machine
noise hits them alike.
The LyCORIS types (`--lycoris`): LoHa, LoKr and OFT, ours against PEFT's LoHaConfig / LoKrConfig / OFTConfig, on
the GPT-2-small shape (on the whole c_attn as an nn.Linear, since PEFT's types take no HF Conv1D; ours on GPT-2's
own c_attn q,v slices beside them, which PEFT cannot express) and on the SD 1.5-width UNet's attn2. `--quick`
shrinks every model so that the code runs in seconds (its numbers mean nothing).

    python bench/core_overhead.py [--steps 5] [--skip-unet] [--out bench/results/core.md]
    python bench/core_overhead.py --variants-only --unet-width 64 --json bench/results/core_variants.json
    python bench/core_overhead.py --lycoris [--json bench/results/core_lycoris.json]
    python bench/core_overhead.py --lycoris-layers --layer-steps 200 --json bench/results/core_lycoris.json
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time

import peft
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lora_core import LoraConfig, add_lora

SD15_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def _clone(base):
    """A copy of `base` whose frozen weights and buffers are base's own tensors (never written: the adapters leave
    them as they are), so that seven variants of an 860 M-parameter UNet fit in memory as one."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


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
    for r in range(rounds):
        for name, fn in steps_fns.items():
            times[name] += _timed(fn, warm, max(1, steps // rounds))
            warm = 0 if warm == 0 else 1
        if (r + 1) % max(1, rounds // 10) == 0:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {statistics.median(t):.3f}s" for k, t in times.items()),
                  file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def gpt2_variants():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256))
    base.requires_grad_(False)
    ours_qv = _clone(base)
    add_lora(ours_qv, LoraConfig(r=8, alpha=16, target_modules=["c_attn"], fused_slices={"c_attn": [1, 0, 1]}))
    ours = _clone(base)
    add_lora(ours, LoraConfig(r=8, alpha=16, target_modules=["c_attn"]))
    theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
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


# each LyCORIS type as (our config fields, PEFT's config) at the same rank, alpha and block size
def lycoris_types(r: int, alpha: float, targets, only: str = "") -> dict:
    """`only`: a comma-separated subset of LoHa, LoKr, OFT (--types)."""
    every = _lycoris_types(r, alpha, targets)
    return {k: v for k, v in every.items() if not only or k in only.split(",")}


def _lycoris_types(r: int, alpha: float, targets) -> dict:
    return {"LoHa": (dict(type="loha", r=r, alpha=alpha), peft.LoHaConfig(r=r, alpha=alpha, target_modules=targets)),
            "LoKr": (dict(type="lokr", r=r, alpha=alpha), peft.LoKrConfig(r=r, alpha=alpha, target_modules=targets)),
            "OFT": (dict(type="oft", oft_block_size=32, use_cayley_neumann=True),
                    peft.OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=True, target_modules=targets))}


def linear_c_attn(model):
    """GPT-2 with every c_attn (an HF Conv1D) as the nn.Linear it is: the layer PEFT's LyCORIS types can take."""
    for block in model.transformer.h:
        conv = block.attn.c_attn
        lin = torch.nn.Linear(*conv.weight.shape)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)
        block.attn.c_attn = lin.requires_grad_(False)
    return model


def gpt2_lycoris_variants(layers: int = 12, only: str = ""):
    """LoHa / LoKr / OFT (r=8) on the whole c_attn as nn.Linear, ours and PEFT's; ours on GPT-2's c_attn q,v too."""
    torch.manual_seed(0)
    conv = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=256))
    conv.requires_grad_(False)
    base = linear_c_attn(_clone(conv))
    out = {"frozen base (lower bound)": base}
    for label, (ours_cfg, peft_cfg) in lycoris_types(8, 16, ["c_attn"], only).items():
        ours, sliced = _clone(base), _clone(conv)
        add_lora(ours, LoraConfig(target_modules=["c_attn"], **ours_cfg))
        add_lora(sliced, LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": [1, 0, 1]}, **ours_cfg))
        out[f"lora_core {label} c_attn"] = ours
        out[f"peft {label} c_attn"] = peft.get_peft_model(_clone(base), peft_cfg)
        out[f"ours {label} c_attn q,v slices (no PEFT twin)"] = sliced
    return out


def unet_lycoris_variants(width: int = 320, only: str = ""):
    """LoHa / LoKr / OFT (r=4) on the UNet's attn2 projections, ours and PEFT's."""
    from lora_sd.config import CROSS_ATTN
    base = _unet(width)
    base.requires_grad_(False)
    out = {"frozen base (lower bound)": base}
    for label, (ours_cfg, peft_cfg) in lycoris_types(4, 4, CROSS_ATTN, only).items():
        ours = _clone(base)
        add_lora(ours, LoraConfig(target_modules=CROSS_ATTN, **ours_cfg))
        out[f"lora_core {label} attn2"], out[f"peft {label} attn2"] = ours, peft.get_peft_model(_clone(base),
                                                                                                 peft_cfg)
    return out


def lycoris_report(a) -> str:
    """The LyCORIS types' tables (and JSON with --json)."""
    layers, batch, seq, width = (1, 1, 32, 32) if a.quick else (12, 8, 128, a.unet_width)
    gpt2 = bench(gpt2_lycoris_variants(layers, a.types), functools.partial(gpt2_step, batch=batch, seq=seq), a.steps,
                 rounds=a.rounds)
    lines, gpt2_ratios = _variant_table(f"### GPT-2-small shape ({layers}x768), batch {batch} x {seq} tokens, r=8 "
                                        f"(OFT: blocks of 32): LoHa, LoKr, OFT ({a.steps} steps, {a.rounds} rounds)", gpt2)
    unet = {} if a.skip_unet else bench(unet_lycoris_variants(width, a.types), unet_step, a.steps, rounds=a.rounds)
    if unet:
        more, unet_ratios = _variant_table(f"### UNet (SD 1.5 layout, block width {width}), 256x256, batch 1, r=4 on "
                                           f"attn2: LoHa, LoKr, OFT ({a.steps} steps, {a.rounds} rounds)", unet)
        lines += [""] + more
    if a.json:
        from lora_core.files import atomic_write_json
        atomic_write_json(a.json, {"quick": a.quick, "types": a.types or "LoHa,LoKr,OFT", "steps": a.steps,
                                   "rounds": a.rounds, "torch": torch.__version__,
                                   "peft": peft.__version__, "threads": torch.get_num_threads(),
                                   "gpt2": {"layers": layers, "batch": batch, "seq": seq, "s_per_step": gpt2,
                                            "lora_core_vs_peft": gpt2_ratios},
                                   "unet": unet and {"block_width": width, "s_per_step": unet,
                                                     "lora_core_vs_peft": unet_ratios}})
    return "\n".join(lines) + "\n"


class _CAttn(torch.nn.Module):
    """GPT-2-small's c_attn alone (768 -> 2304, as the nn.Linear PEFT's types take) on 8 x 128 tokens: the layer
    the GPT-2 table adapts, without the frozen model around it (whose cost is most of that table's step)."""

    def __init__(self):
        super().__init__()
        self.c_attn = torch.nn.Linear(768, 2304)

    def forward(self, x):
        return self.c_attn(x).square().mean()


def lycoris_layer_variants():
    """LoHa / LoKr / OFT (r=8, OFT blocks of 32) on _CAttn, ours and PEFT's, every factor non-zero."""
    torch.manual_seed(0)
    base = _CAttn().requires_grad_(False)
    out = {"frozen base (lower bound)": base}
    for label, (ours_cfg, peft_cfg) in lycoris_types(8, 16, ["c_attn"]).items():
        ours = _clone(base)
        add_lora(ours, LoraConfig(target_modules=["c_attn"], **ours_cfg))
        theirs = peft.get_peft_model(_clone(base), peft_cfg)
        for m in (ours, theirs):
            for p in m.parameters():
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.01)
        out[f"lora_core {label} c_attn"], out[f"peft {label} c_attn"] = ours, theirs
    return out


def c_attn_step(model):
    x0 = torch.randn(8, 128, 768, generator=torch.Generator().manual_seed(0))
    opt = _opt(model)

    def step():
        model(x0.clone().requires_grad_()).backward()   # inside a network: the input gradient is needed
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def lycoris_layers_report(a) -> str:
    """--lycoris-layers: the adapted layer alone, variants alternating every step; merged into --json."""
    res = bench(lycoris_layer_variants(), c_attn_step, a.layer_steps, rounds=a.layer_steps)
    lines, ratios = _variant_table(f"### GPT-2-small's c_attn alone (768 -> 2304, 8 x 128 tokens), r=8 (OFT: blocks "
                                   f"of 32): LoHa, LoKr, OFT ({a.layer_steps} steps, alternating)", res)
    if a.json:
        import json
        import os
        from lora_core.files import atomic_write_json
        old = json.loads(open(a.json).read()) if os.path.exists(a.json) else {}
        atomic_write_json(a.json, {**old, "c_attn_alone": {"steps": a.layer_steps, "s_per_step": res,
                                                           "lora_core_vs_peft": ratios}})
    return "\n".join(lines) + "\n"


def _unet(width: int = 320):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    cfg = dict(SD15_UNET, block_out_channels=tuple(width * m for m in (1, 2, 4, 4)))
    return UNet2DConditionModel(**cfg)


def unet_variants():
    torch.manual_seed(0)
    base = _unet()
    base.requires_grad_(False)
    targets = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
    ours = _clone(base)
    add_lora(ours, LoraConfig(r=4, alpha=4, target_modules=targets))
    theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    return {"frozen base (lower bound)": base, "lora_core attn2": ours, "peft attn2": theirs}


def adapter_variants(width: int = 320):
    """DoRA and LoCon on the same UNet, ours and PEFT's (same targets, rank and alpha)."""
    from lora_sd.config import CROSS_ATTN, TARGET_PRESETS
    base = _unet(width)
    base.requires_grad_(False)
    out = {"frozen base (lower bound)": base}
    for label, targets, dora in (("DoRA attn2", CROSS_ATTN, True), ("LoCon attn2+conv", TARGET_PRESETS["cross_attn+conv"], False)):
        ours = _clone(base)
        add_lora(ours, LoraConfig(r=4, alpha=4, target_modules=targets, use_dora=dora))
        theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                                                          use_dora=dora))
        out[f"lora_core {label}"], out[f"peft {label}"] = ours, theirs
    return out


class _AdaptedLayers(torch.nn.Module):
    """The layers DoRA and LoCon adapt, alone, at SD 1.5's 256x256 sizes (first block): attn2's q / k / out
    projections (4096 image tokens, 77 text tokens) and two ResNet 3x3 convs (320 ch at 32x32, 640 at 16x16).
    Without the frozen UNet around them, the adapter's own cost is most of the step, not 2 % of it."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.to_q, self.to_k, self.to_out = nn.Linear(320, 320, bias=False), nn.Linear(768, 320, bias=False), nn.Linear(320, 320)
        self.conv1, self.conv2 = nn.Conv2d(320, 320, 3, padding=1), nn.Conv2d(640, 640, 3, padding=1)

    def forward(self, tokens, text, x, z):
        return (self.to_out(self.to_q(tokens)).square().mean() + self.to_k(text).square().mean()
                + self.conv1(x).square().mean() + self.conv2(z).square().mean())


def layer_variants():
    """DoRA on the projections, LoCon on the convs, ours and PEFT's (r=4, B initialised non-zero)."""
    torch.manual_seed(0)
    base = _AdaptedLayers()
    base.requires_grad_(False)
    out = {"frozen base (lower bound)": base}
    for label, targets, dora in (("DoRA q/k/out", ["to_q", "to_k", "to_out"], True), ("LoCon convs", ["conv1", "conv2"], False)):
        ours = _clone(base)
        add_lora(ours, LoraConfig(r=4, alpha=4, target_modules=targets, use_dora=dora))
        theirs = peft.get_peft_model(_clone(base), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                                                          use_dora=dora))
        for m in (ours, theirs):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.01)
        out[f"lora_core {label}"], out[f"peft {label}"] = ours, theirs
    return out


def layers_step(model):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 4096, 320, generator=g), torch.randn(1, 77, 768, generator=g),
              torch.randn(1, 320, 32, 32, generator=g), torch.randn(1, 640, 16, 16, generator=g)]
    opt = _opt(model)

    def step():
        xs = [t.clone().requires_grad_() for t in inputs]   # inside a network: the input gradient is needed
        model(*xs).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


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
    ap.add_argument("--variants-only", action="store_true", help="only the DoRA / LoCon table")
    ap.add_argument("--unet-width", type=int, default=320, help="first UNet block width (SD 1.5: 320)")
    ap.add_argument("--json", default=None, help="also write the DoRA / LoCon (with --lycoris: LoHa / LoKr / OFT) "
                    "numbers here")
    ap.add_argument("--layer-steps", type=int, default=40, help="timed steps of the adapted layers alone")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds (steps per variant per round: "
                    "steps / rounds); --rounds = --steps alternates the variants every step")
    ap.add_argument("--lycoris", action="store_true", help="only the LoHa / LoKr / OFT tables")
    ap.add_argument("--lycoris-layers", action="store_true", help="only GPT-2's c_attn alone with LoHa / LoKr / "
                    "OFT (--layer-steps, alternating; merged into --json)")
    ap.add_argument("--types", default="", help="with --lycoris: only these of LoHa,LoKr,OFT (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="with --lycoris: tiny shapes, to check that the code runs")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = [f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
             f"median of {a.steps} timed steps per variant (round-robin, {a.rounds} rounds)\n"]
    if a.lycoris_layers:
        parts.append(lycoris_layers_report(a))
    else:
        parts += [lycoris_report(a)] if a.lycoris else lora_tables(a)
    text = "\n".join(parts)
    print(text)
    if a.out:
        from lora_core.files import atomic_write_text
        atomic_write_text(a.out, f"Command: `python bench/core_overhead.py {' '.join(sys.argv[1:])}`\n\n" + text)


def lora_tables(a) -> list[str]:
    """The LoRA tables (GPT-2, UNet) and the DoRA / LoCon ones."""
    parts = []
    if not a.variants_only:
        res = bench(gpt2_variants(), gpt2_step, a.steps)
        parts.append(report("GPT-2-small-shaped (12x768), batch 8 x 128 tokens, r=8", res,
                            "frozen base (lower bound)", "peft c_attn"))
    if not a.skip_unet and not a.variants_only:
        res = bench(unet_variants(), unet_step, a.steps)
        parts.append(report("SD 1.5 UNet (859.5M, random weights), 256x256, batch 1, r=4 on attn2", res,
                            "frozen base (lower bound)", "peft attn2"))
    if not a.skip_unet:
        layers = bench(layer_variants(), layers_step, a.layer_steps, rounds=a.layer_steps)
        parts.append(variants_report(a, bench(adapter_variants(a.unet_width), unet_step, a.steps, rounds=a.rounds),
                                     layers))
    return parts


def _variant_table(title: str, res: dict) -> tuple[list[str], dict]:
    """Markdown lines and {variant: ours / PEFT} of one round-robin measurement."""
    base = "frozen base (lower bound)"
    twin = {k: "peft " + k.split(" ", 1)[1] for k in res if k.startswith("lora_core ")}
    twin.update({v: v for v in twin.values()})
    ratios = {k.split(" ", 1)[1]: res[k] / res[v] for k, v in twin.items() if k.startswith("lora_core ")}
    lines = [title, "", "| variant | s/step | vs frozen base | vs PEFT (same variant) |", "|---|---|---|---|"]
    for k, v in res.items():
        vs = f"{v / res[twin[k]]:.2f}x" if k in twin else ""
        lines.append(f"| {k} | {v:.4f} | {v / res[base]:.2f}x | {vs} |")
    return lines, ratios


def variants_report(a, res: dict, layers: dict) -> str:
    lines, ratios = _variant_table(f"### UNet (SD 1.5 layout, block width {a.unet_width}, random weights), 256x256, "
                                   f"batch 1, r=4: DoRA and LoCon ({a.steps} steps, {a.rounds} rounds)", res)
    more, layer_ratios = _variant_table(f"### The adapted layers alone (SD 1.5 sizes, r=4): DoRA on attn2 q/k/out, "
                                        f"LoCon on two ResNet 3x3 convs ({a.layer_steps} steps, alternating)", layers)
    if a.json:
        from lora_core.files import atomic_write_json
        atomic_write_json(a.json, {"unet_block_width": a.unet_width, "steps": a.steps, "rounds": a.rounds,
                                   "torch": torch.__version__,
                                   "peft": peft.__version__, "threads": torch.get_num_threads(),
                                   "s_per_step": res, "lora_core_vs_peft": ratios,
                                   "layers": {"steps": a.layer_steps, "s_per_step": layers,
                                              "lora_core_vs_peft": layer_ratios}})
    return "\n".join(lines + [""] + more) + "\n"


if __name__ == "__main__":
    main()
