"""Bench: the preflight's peak-memory estimate (lora_sd.preflight / lora_llm.preflight) against the measured peak
of real training steps on CPU.

    OMP_NUM_THREADS=1 python bench/preflight_memory.py --case tiny-sd [--json]
    python bench/preflight_memory.py --case sd15-256 | smollm2-16x64 | tiny-gpt2-16x64
    python bench/preflight_memory.py --case sdxl-256 --size w8 | w4 | w2-t2 | full [--rungs "bf16,fp8 + checkpointing"]

Each case runs in this process: the model is built and the estimate made; then two optimisation steps run as
the trainers do (the same loss module, AdamW over the LoRA parameters) under the torch profiler; measured
peak = the largest sum of live tensor bytes in its memory timeline (parameters, gradients, optimizer state,
activations, temporaries: what the estimate models). The peak RSS above the RSS after imports is printed
too (rss_peak_mib): on CPU it adds library code loaded on first use and heap glibc keeps after frees.

`--case sdxl-256`: an SDXL-like UNet at 256 px (`--size`: SDXL-base's own, `full`, or reduced: channel counts
divided by 8 / 4 / 2, w2-t2 with at most 2 transformer layers per block) with each rung of
bench/memory_ladder.py (its switches applied by the trainer's own code), one JSON entry per rung named
"sdxl-<size>-256: <rung>": the estimate and its parts; the measured peak (the tensors alive at the start, counted,
plus the largest running sum of the profiler's raw allocation events over two steps; the host copies of offloaded
blocks left out); `held_mib`, what the model and the optimizer hold between steps, counted exactly; and a cross-check
from the process RSS (`rss_peak_mib`: held + the RSS growth of one more step, glibc's mmap threshold fixed so
freed tensors leave the RSS). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sd_case(resolution: int, batch: int, unet_kw: dict | None):
    import torch
    from lora_core.configfile import from_dict
    from lora_sd.config import SDTrainConfig
    from lora_sd.models import build_tiny_pipeline
    cfg = from_dict(SDTrainConfig, {"data": {"path": ".", "resolution": resolution},
                                    "train": {"batch_size": batch}, "lora": {"r": 4, "alpha": 4.0}})
    pipe = build_tiny_pipeline()
    if unet_kw:   # an SD-1.5-sized UNet (random weights) in the tiny pipeline
        from diffusers import UNet2DConditionModel
        pipe.unet = UNet2DConditionModel(**unet_kw)
        pipe.vae_scale_factor = 8
    return cfg, pipe, torch


def run_sd(resolution: int, batch: int, unet_kw: dict | None = None) -> dict:
    cfg, pipe, torch = _sd_case(resolution, batch, unet_kw)
    from lora_core.preflight import PreflightReport
    from lora_sd.preflight import measure
    from lora_sd.train import DiffusionLoss
    from diffusers import DDPMScheduler
    rep = PreflightReport("sd-train", "bench")
    measure(cfg, pipe, "cpu", rep)
    unet = pipe.unet
    module = DiffusionLoss(unet, DDPMScheduler.from_config(pipe.scheduler.config), scaling_factor=0.18215)
    module.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    s = resolution // pipe.vae_scale_factor
    batch_data = {"latent_params": torch.randn(batch, 2 * unet.config.in_channels, s, s),
                  "text_emb": torch.randn(batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)}
    return _measure(rep.memory, lambda: module(batch_data), opt, params)


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True)


def smollm2_shaped(folder: Path) -> str:
    """A LLaMA model of SmolLM2-135M's shape with random weights (no hub here), with the GPT-2 tokenizer
    (its vocabulary, 50,257, stands in for SmolLM2's 49,152)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from lora_llm.models import gpt2_tokenizer
    tok = gpt2_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                 **SMOLLM2_135M)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run_llm(batch: int, length: int, pretrained: str) -> dict:
    from lora_core.configfile import from_dict
    from lora_core.preflight import PreflightReport
    from lora_llm.config import LLMTrainConfig
    from lora_llm.preflight import measure
    import torch
    cfg = from_dict(LLMTrainConfig, {"model": {"pretrained": pretrained}, "data": {"task": "wikitext2", "block_size": length},
                                     "train": {"batch_size": batch}})
    rep = PreflightReport("llm-train", "bench")
    model = measure(cfg, "cpu", rep)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    return _measure(rep.memory, lambda: model(input_ids=ids, labels=ids).loss, opt, params)


def _measure(estimate: dict, loss_fn, opt, params) -> dict:
    """Two optimisation steps; the peak of live tensor bytes (torch profiler memory timeline: parameters,
    gradients, optimizer state, activations, temporaries) and the peak RSS above RSS0."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    from memory_ladder import reset_peak_rss, status_bytes
    rss0 = int(os.environ["_BENCH_RSS0"])
    reset_peak_rss()
    t = time.time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(2):
            loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    steps_s = time.time() - t
    rss_peak = status_bytes("VmHWM") - rss0
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    peak = int(np.array(sizes).sum(axis=1).max())
    return {"estimate_mib": round(estimate["total_bytes"] / 2**20, 1), "measured_mib": round(peak / 2**20, 1),
            "ratio": round(estimate["total_bytes"] / peak, 3), "rss_peak_mib": round(rss_peak / 2**20, 1),
            "parts_mib": {k: round(v / 2**20, 1) for k, v in estimate["parts"].items()}, "steps_s": round(steps_s, 1)}


SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
def run_sdxl_rung(rung: str, size: str) -> dict:
    """An SDXL-like UNet (bench/memory_ladder.py's SIZES) at 256 px with one rung of its switches: the estimate,
    the peak of live tensor bytes (offloaded blocks' host copies left out) by the profiler's category, and the
    cross-check from RSS (what the model and optimizer hold, counted, + the RSS growth of one more step)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_ladder import RUNGS, run_rung
    r = run_rung(rung, RUNGS[rung], 256, size)
    keep = ("unet_parameters", "peak_parts_mib", "held_mib", "rss_peak_mib")
    return {"estimate_mib": r["estimate_mib"], "measured_mib": r["device_peak_mib"], "ratio": r["estimate_ratio"],
            "parts_mib": r["estimate_parts_mib"], "steps_s": r["step_s"], "rung": rung, "size": size,
            **{k: r[k] for k in keep}, "rss_ratio": round(r["estimate_mib"] / r["rss_peak_mib"], 3)}


CASES = {
    "tiny-sd": lambda: run_sd(128, 4),
    "sd15-256": lambda: run_sd(256, 1, SD15_UNET),
    "smollm2-16x64": lambda: run_llm(16, 64, smollm2_shaped(Path(tempfile.mkdtemp(prefix="smollm2_")))),
    "tiny-gpt2-16x64": lambda: run_llm(16, 64, "tiny"),
}
SDXL_CASE = "sdxl-256"   # with --size and --rungs: one entry per rung, named "sdxl-<size>-256: <rung>"


def _merge_result(path: Path, res: dict) -> None:
    """One entry per case in a committed JSON file; other cases' entries stay."""
    from lora_core.files import atomic_write_json
    cases = json.loads(path.read_text()) if path.is_file() else {}
    cases[res["case"]] = res
    atomic_write_json(path, dict(sorted(cases.items())))


def sdxl_table(cases: dict) -> str:
    """BENCHMARKS.md's table of the sdxl-256 entries of a results file."""
    out = ["| UNet (256², batch 1, LoRA r=16 attn2) | rung | estimate MiB | measured MiB | estimate / measured | "
           "RSS cross-check MiB |", "|---|---|---:|---:|---:|---:|"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_ladder import RUNGS, SIZES
    rows = sorted((r for r in cases.values() if r["case"].startswith("sdxl-")),
                  key=lambda r: (list(SIZES).index(r["size"]), list(RUNGS).index(r["rung"])))
    for r in rows:
        out.append(f"| {r['size']} ({r['unet_parameters'] / 1e6:,.0f} M) | {r['rung']} | {r['estimate_mib']:,.1f} | "
                   f"{r['measured_mib']:,.1f} | {r['ratio']:.3f} | {r['rss_peak_mib']:,.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted([*CASES, SDXL_CASE]), default="tiny-sd")
    p.add_argument("--size", default="w4", help=f"{SDXL_CASE}: the UNet, full (SDXL's) or reduced "
                   "(bench/memory_ladder.py SIZES: w2-t2, w4, w8)")
    p.add_argument("--rungs", default="", help=f"{SDXL_CASE}: comma-separated rungs of bench/memory_ladder.py "
                   "(default: all)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default="", help="merge this case's result into a JSON file (one entry per case), "
                   "e.g. bench/results/preflight_memory.json")
    p.add_argument("--table", metavar="JSON", help="print the SDXL entries of a results file as a markdown table")
    a = p.parse_args(argv)
    if a.table:
        print(sdxl_table(json.loads(Path(a.table).read_text())))
        return 0
    import torch  # noqa: F401 - the imports belong to the baseline
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    import lora_sd.train  # noqa: F401
    import lora_llm.train  # noqa: F401
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_ladder import RUNGS, SIZES, fixed_mmap_threshold, reset_peak_rss, status_bytes
    if a.case == SDXL_CASE and a.size not in SIZES:
        raise SystemExit(f"--size {a.size}: use one of {', '.join(SIZES)}")
    fixed_mmap_threshold()
    reset_peak_rss()
    os.environ["_BENCH_RSS0"] = str(status_bytes("VmRSS"))
    if a.case == SDXL_CASE:
        runs = {f"sdxl-{a.size}-256: {r}": (lambda r=r: run_sdxl_rung(r, a.size))
                for r in (a.rungs.split(",") if a.rungs else RUNGS)}
    else:
        runs = {a.case: CASES[a.case]}
    for case, fn in runs.items():
        res = {"case": case, **fn(), "command": "python " + " ".join(["bench/preflight_memory.py"] + sys.argv[1:]),
               "torch_threads": __import__("torch").get_num_threads(), "load_average": os.getloadavg()}
        if a.out:
            _merge_result(Path(a.out), res)
        print(json.dumps(res) if a.json else
              f"{case}: estimate {res['estimate_mib']} MiB, measured {res['measured_mib']} MiB, ratio {res['ratio']} "
              f"({res['parts_mib']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
