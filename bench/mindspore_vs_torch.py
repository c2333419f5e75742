"""Step time of one GPT-2 LoRA configuration: PyTorch (transformers + lora_core) against MindSpore
(lora_llm.mindspore) in PyNative and in graph (mindspore.jit) mode.

Same random GPT-2-shaped weights, same adapter start, same batches, fp32, AdamW + clipping as the
trainers. A step = forward + backward + clip + AdamW on the LoRA parameters. The first MindSpore
graph step includes the compile and is reported apart. Prints a Markdown table (and the step-1
losses, which must agree).

    python bench/mindspore_vs_torch.py [--layers 4 --width 256 --heads 8 --seq 128 --batch 8 --steps 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up step)")
    p.add_argument("--device-target", default="CPU")
    return p.parse_args()


def main():
    a = parse()
    import torch
    import mindspore as ms
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    import lora_core as lc
    import lora_core.mindspore as lcm
    from lora_core.config import LoraConfig
    from lora_core.training import TrainSettings, make_optimizer
    from lora_llm.mindspore.gpt2 import GPT2Config, build_gpt2, load_hf_state_dict
    from lora_llm.mindspore.train import LoraTrainer, set_device

    set_device(a.device_target)
    hf = HFConfig(vocab_size=a.vocab, n_positions=max(a.seq, 128), n_embd=a.width, n_layer=a.layers, n_head=a.heads,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=a.rank, alpha=2 * a.rank, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})
    s = TrainSettings(max_steps=a.steps + 1, learning_rate=1e-3, max_grad_norm=1.0)
    torch.manual_seed(0)
    tm = GPT2LMHeadModel(hf).train()
    base = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
    lc.add_lora(tm, lora)
    start = {k: v.detach().numpy().copy() for k, v in lc.lora_state_dict(tm).items()}
    rng = np.random.RandomState(0)
    batches = [rng.randint(0, a.vocab, (a.batch, a.seq)) for _ in range(a.steps + 1)]
    mask = np.ones((a.batch, a.seq), np.int64)

    def make_ms_net():
        net = build_gpt2(GPT2Config.from_dict(hf.to_dict()))
        load_hf_state_dict(net, base)
        lcm.add_lora(net, lora)
        lcm.load_lora_state_dict(net, start)
        net.set_train(True)
        return net

    rows, first_losses = [], {}

    # ---- PyTorch
    params = lc.lora_parameters(tm)
    opt = make_optimizer(params, s)
    times = []
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        x = torch.from_numpy(ids)
        loss = tm(x, attention_mask=torch.from_numpy(mask), labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if i == 0:
            first_losses["torch"] = loss.item()
    rows.append(("PyTorch (eager)", times[0], times[1:]))

    # ---- MindSpore, PyNative and graph
    for mode in ("pynative", "graph"):
        net = make_ms_net()
        trainer = LoraTrainer(net, s, graph=mode == "graph")
        m = ms.Tensor(mask, ms.int32)
        times = []
        for i, ids in enumerate(batches):
            t0 = time.perf_counter()
            x = ms.Tensor(ids, ms.int32)
            loss = trainer.step([(x, m, x)], s.learning_rate)
            times.append(time.perf_counter() - t0)
            if i == 0:
                first_losses[mode] = loss
        rows.append((f"MindSpore {mode}", times[0], times[1:]))

    report(a, rows, first_losses, sum(p.numel() for p in params), sum(p.numel() for p in tm.parameters()))


def report(a, rows, first_losses, n_lora: int, n_all: int) -> None:
    import mindspore as ms
    import torch
    torch_med = statistics.median(rows[0][2])
    print(f"GPT-2-shaped model: {a.layers} layers, width {a.width}, {a.heads} heads, vocab {a.vocab} "
          f"({n_all / 1e6:.1f} M parameters, {n_lora} LoRA r={a.rank} on c_attn q,v); batch {a.batch} x {a.seq} tokens, "
          f"fp32, AdamW + clipping; {a.steps} timed steps after 1 warm-up")
    print(f"host: {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), mindspore {ms.__version__} on {a.device_target}\n")
    print("| backend | first step (s) | step time, median (s) | min (s) | vs PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for name, first, rest in rows:
        med = statistics.median(rest)
        print(f"| {name} | {first:.3f} | {med:.3f} | {min(rest):.3f} | {med / torch_med:.2f}x |")
    print("\nstep-1 loss: " + ", ".join(f"{k} {v:.6f}" for k, v in first_losses.items()))


if __name__ == "__main__":
    main()
