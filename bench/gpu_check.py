"""`make gpu-check`: run the half-precision and CUDA paths that CPU tests never reach (< 5 min on one GPU).

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--cpu-only]

Checks, each recorded as pass / fail / skip (with the reason) in a JSON file and a markdown table
beside it:
  sd-train-resume-{fp32-cpu, bf16-cpu, fp16, bf16}  tiny SD 1.x LoRA training, stopped by SIGTERM after step 3
      and resumed with --resume latest: finite losses, the adapter bit-identical to an uninterrupted
      run, and proof that the precision ran (a forward hook on a frozen attn2 projection records the
      weight dtype, the output dtype and the autocast state; fp16: Accelerate's GradScaler and its
      scale; the LoRA parameters stay fp32).
  llm-step-{fp32-cpu, bf16}  a tiny GPT-2 LoRA step through lora-llm's trainer, the same hook on c_attn.
  sd-generate-{fp32-cpu, fp16}  generation with the trained adapter: finite pixels, and the adapter
      changes the image.
  sd-train-lowmem{-cpu, }  the memory ladder's switches in bf16: fp8 base, gradient checkpointing, bitsandbytes'
      adamw8bit, without and with two UNet blocks offloaded (CUDA: side-stream copies from pinned memory):
      finite losses, fp8 storage, block loads, and the adapter bit-identical with and without offloading.
Without CUDA the CUDA checks are skipped with the reason; the CPU ones still run (tests/test_gpu_check.py
runs them in CI). Exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_core.files import atomic_write_json, atomic_write_text  # noqa: E402

STEPS, STOP_AT = 5, 3


class Skip(Exception):
    pass


# ------------------------------------------------------------------ evidence that a precision ran
class PrecisionProbe:
    """A forward hook on one frozen linear layer: what dtype its weight had, what dtype it produced,
    and whether autocast was on (and at which dtype) during the first training forward."""

    def __init__(self, module: torch.nn.Module):
        self.seen: dict = {}
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.seen or not torch.is_grad_enabled():
            return
        dev = output.device.type
        self.seen = {"weight_dtype": str(module.weight.dtype), "output_dtype": str(output.dtype), "device": dev,
                     "autocast": torch.is_autocast_enabled(dev),
                     "autocast_dtype": str(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None}

    def close(self) -> dict:
        self.handle.remove()
        return self.seen


def _accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# ------------------------------------------------------------------ SD: train, stop, resume
def _sd_run(tiny: str, data: Path, work: Path, name: str, mp: str, cpu: bool, stop_at: int = 0,
            resume: str | None = None, sections: dict | None = None) -> dict:
    """One tiny SD training run (`sections`: more config tables, merged into the check's own)."""
    from lora_sd.models import load_pipeline
    from lora_sd.testing import train_config
    from lora_sd.train import DiffusionLoss, run_training
    sections = dict(sections or {})
    cfg = train_config(work / name, tiny, data, work / "cache",
                       train={"max_steps": STEPS, "mixed_precision": mp, "checkpoint_every": 0,
                              "lr_scheduler": "constant", "lr_warmup_steps": 0, "batch_size": 2,
                              **sections.pop("train", {})}, **sections)
    pipe = load_pipeline(tiny)
    probe = PrecisionProbe(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q)
    acc = _accelerator(mp, cpu)
    original, calls = DiffusionLoss.forward, {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        if stop_at and calls["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)   # the Stop button: checkpoint after this step
        return original(self, batch)

    DiffusionLoss.forward = forward
    try:
        status = run_training(cfg, resume=resume, accelerator=acc, pipe=pipe)
    finally:
        DiffusionLoss.forward = original
    lora_dtypes = sorted({str(p.dtype) for n, p in pipe.unet.named_parameters() if "lora_" in n})
    scaler = acc.scaler
    stored = sorted({m.storage for m in pipe.unet.modules() if getattr(m, "quantized", False)})
    return {"status": status, "probe": probe.close(), "lora_dtypes": lora_dtypes, "stored": stored,
            "scaler": type(scaler).__name__ if scaler is not None else None,
            "scale": float(scaler.get_scale()) if scaler is not None else None,
            "losses": [r["loss"] for r in _metrics(work / name)]}


def _metrics(run: Path) -> list[dict]:
    from lora_core.run import RunDir
    return RunDir(run).read_metrics()


def _expect_precision(r: dict, mp: str, device: str) -> list[str]:
    """What must be true of the probe and the run for precision `mp`; returns the failures."""
    p, bad = r["probe"], []
    want = {"no": "torch.float32", "fp16": "torch.float16", "bf16": "torch.bfloat16"}[mp]
    if p.get("device") != device:
        bad.append(f"ran on {p.get('device')}, expected {device}")
    if p.get("weight_dtype") != want or p.get("output_dtype") != want:
        bad.append(f"frozen attn2.to_q weight {p.get('weight_dtype')} -> output {p.get('output_dtype')}, expected {want}")
    if mp != "no" and not (p.get("autocast") and p.get("autocast_dtype") == want):
        bad.append(f"autocast {p.get('autocast')} at {p.get('autocast_dtype')}, expected {want}")
    if r["lora_dtypes"] != ["torch.float32"]:
        bad.append(f"LoRA parameters are {r['lora_dtypes']}, expected fp32")
    if mp == "fp16" and not (r["scaler"] == "GradScaler" and r["scale"] and r["scale"] > 0):
        bad.append(f"no GradScaler in use (scaler {r['scaler']}, scale {r['scale']})")
    if mp != "fp16" and r["scaler"] is not None:
        bad.append(f"a GradScaler ({r['scaler']}) in a {mp} run")
    return bad


def check_sd_train_resume(ctx: dict, mp: str, cpu: bool) -> dict:
    from safetensors.torch import load_file
    device = "cpu" if cpu else "cuda"
    work = Path(tempfile.mkdtemp(prefix=f"sd_{mp}_", dir=ctx["work"]))
    full = _sd_run(ctx["tiny"], ctx["data"], work, "full", mp, cpu)
    part = _sd_run(ctx["tiny"], ctx["data"], work, "part", mp, cpu, stop_at=STOP_AT)
    resumed = _sd_run(ctx["tiny"], ctx["data"], work, "part", mp, cpu, resume="latest")
    a = load_file(str(work / "full" / "test_lora.safetensors"))
    b = load_file(str(work / "part" / "test_lora.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    losses = full["losses"] + resumed["losses"]
    bad = _expect_precision(full, mp, device) + _expect_precision(resumed, mp, device)
    if full["status"].get("state") != "done" or part["status"].get("state") != "stopped":
        bad.append(f"states: full {full['status'].get('state')}, part {part['status'].get('state')}")
    if part["status"].get("step") != STOP_AT or resumed["status"].get("state") != "done":
        bad.append(f"stopped at {part['status'].get('step')}, resumed run {resumed['status'].get('state')}")
    if not losses or not all(map(_finite, losses)):
        bad.append(f"non-finite losses {losses}")
    if diff != 0.0:
        bad.append(f"resume is not exact: adapter max |diff| {diff:g}")
    ctx.setdefault("adapters", {})[mp] = str(work / "full" / "test_lora.safetensors")
    return {"ok": not bad, "failures": bad, "losses": losses, "resume_max_abs_diff": diff,
            "probe": full["probe"], "lora_dtypes": full["lora_dtypes"], "scaler": full["scaler"], "scale": full["scale"]}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# ------------------------------------------------------------------ SD: the memory ladder's switches
LOWMEM = {"model": {"weight_dtype": {"denoiser": "fp8_e4m3"}},
          "train": {"gradient_checkpointing": True, "optimizer": "adamw8bit"}}


def check_sd_lowmem(ctx: dict, cpu: bool) -> dict:
    """fp8 base + gradient checkpointing + adamw8bit, bf16, trained without and with two UNet blocks offloaded:
    finite losses, the base stored fp8, the offloader loading blocks onto the device (on CUDA: copies on a side
    stream from pinned memory), and an adapter that learns, bit-identical with and without offloading."""
    import importlib.util
    import lora_sd.train as T
    from lora_core.lowmem import storage_problem
    from safetensors.torch import load_file
    device = "cpu" if cpu else "cuda"
    problem = storage_problem("fp8_e4m3", device)
    if problem:
        raise Skip(problem)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed (the [lowmem] extra)")
    work = Path(tempfile.mkdtemp(prefix="sd_lowmem_", dir=ctx["work"]))
    events: list = []
    real = T.offload_blocks
    T.offload_blocks = lambda model, n, dev, events_=None: real(model, n, dev, events)
    try:
        runs = {n: _sd_run(ctx["tiny"], ctx["data"], work, f"offload{n}", "bf16", cpu,
                           sections={**LOWMEM, "train": {**LOWMEM["train"], "offload_blocks": n}}) for n in (0, 2)}
    finally:
        T.offload_blocks = real
    a, b = (load_file(str(work / f"offload{n}" / "test_lora.safetensors")) for n in (0, 2))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    learned = max(float(v.abs().max()) for k, v in a.items() if "lora_up" in k or "lora_B" in k)
    loads = sum(1 for e in events if "load" in str(e))
    losses = [x for r in runs.values() for x in r["losses"]]
    bad = []
    if not losses or not all(map(_finite, losses)):
        bad.append(f"non-finite losses {losses}")
    if any(r["stored"] != ["fp8_e4m3"] for r in runs.values()):
        bad.append(f"UNet layers stored as {[r['stored'] for r in runs.values()]}, expected fp8_e4m3")
    if not loads:
        bad.append("the offloader loaded no block")
    if learned == 0:
        bad.append("the adapter did not learn (its up / B weights are zero)")
    if diff != 0.0:
        bad.append(f"offloading changed the adapter: max |diff| {diff:g}")
    return {"ok": not bad, "failures": bad, "losses": losses, "offload_max_abs_diff": diff, "block_loads": loads}


# ------------------------------------------------------------------ LLM: one bf16 step
def check_llm_step(ctx: dict, mp: str, cpu: bool) -> dict:
    import lora_llm.train as T
    from lora_llm.config import load_llm_config
    fix = ROOT / "tests" / "fixtures" / "llm" / "wikitext2"
    work = Path(tempfile.mkdtemp(prefix=f"llm_{mp}_", dir=ctx["work"]))
    cfg = load_llm_config(None, [f'run_dir="{work / "run"}"', 'data.task="wikitext2"', f'data.data_dir="{fix}"',
                                 'data.train_split="valid"', 'data.eval_split="valid"', "data.block_size=32",
                                 "train.max_steps=3", "train.batch_size=2", f'train.mixed_precision="{mp}"',
                                 "eval.enabled=false", "eval.prompts=[]"])
    probes: list[PrecisionProbe] = []
    original_build, original_acc = T.build_model, T.make_accelerator

    def build(cfg_, tok):
        model, lcfg = original_build(cfg_, tok)
        probes.append(PrecisionProbe(model.transformer.h[0].attn.c_attn.base_layer))
        return model, lcfg

    T.build_model = build
    T.make_accelerator = lambda cfg_: _accelerator(mp, cpu)
    try:
        status = T.train_from_config(cfg)
    finally:
        T.build_model, T.make_accelerator = original_build, original_acc
    seen = probes[0].close() if probes else {}
    losses = [r["loss"] for r in _metrics(work / "run")]
    want = {"no": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[mp]
    bad = []
    if status.get("state") != "done" or not losses or not all(map(_finite, losses)):
        bad.append(f"state {status.get('state')}, losses {losses}")
    if seen.get("device") != ("cpu" if cpu else "cuda") or seen.get("output_dtype") != want:
        bad.append(f"c_attn ran on {seen.get('device')} giving {seen.get('output_dtype')}, expected {want}")
    if mp != "no" and seen.get("autocast_dtype") != want:
        bad.append(f"autocast dtype {seen.get('autocast_dtype')}, expected {want}")
    return {"ok": not bad, "failures": bad, "losses": losses, "probe": seen}


# ------------------------------------------------------------------ generation with the adapter
def check_generate(ctx: dict, dtype_name: str, cpu: bool) -> dict:
    import numpy as np
    from lora_sd.generate import generate, load_adapters
    from lora_sd.models import load_pipeline
    adapter = ctx.get("adapters", {}).get("no" if dtype_name == "fp32" else dtype_name)
    if adapter is None:
        raise Skip("no trained adapter (the training check did not run)")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    device = "cpu" if cpu else "cuda"
    images = {}
    for with_adapter in (False, True):
        pipe = load_pipeline(ctx["tiny"], dtype=dtype).to(device)
        if with_adapter:
            load_adapters(pipe, [(adapter, 4.0)])
        img, _ = generate(pipe, ["a photo of a thing"], steps=3, width=32, height=32, seed=1)[0]
        images[with_adapter] = np.asarray(img, dtype=np.float32)
        unet_dtype, unet_device = str(pipe.unet.dtype), pipe.unet.device.type
    change = float(np.abs(images[True] - images[False]).max())
    bad = []
    if unet_dtype != str(dtype) or unet_device != device:
        bad.append(f"UNet {unet_dtype} on {unet_device}, expected {dtype} on {device}")
    if not np.isfinite(images[True]).all() or images[True].std() == 0:
        bad.append("the image is constant or not finite")
    if change == 0:
        bad.append("the adapter does not change the image")
    return {"ok": not bad, "failures": bad, "adapter_pixel_change": change, "unet_dtype": unet_dtype}


# ------------------------------------------------------------------ driver
def checks(cuda: bool) -> list[tuple[str, object, tuple, str]]:
    """(name, function, args, skip reason or "")."""
    no_cuda = "" if cuda else "no CUDA device (torch.cuda.is_available() is False)"
    bf16 = no_cuda or ("" if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support")
    return [
        ("sd-train-resume-fp32-cpu", check_sd_train_resume, ("no", True), ""),
        ("sd-train-resume-bf16-cpu", check_sd_train_resume, ("bf16", True), ""),
        ("llm-step-fp32-cpu", check_llm_step, ("no", True), ""),
        ("sd-generate-fp32-cpu", check_generate, ("fp32", True), ""),
        ("sd-train-lowmem-cpu", check_sd_lowmem, (True,), ""),
        ("sd-train-resume-fp16", check_sd_train_resume, ("fp16", False), no_cuda),
        ("sd-train-resume-bf16", check_sd_train_resume, ("bf16", False), bf16),
        ("llm-step-bf16", check_llm_step, ("bf16", False), bf16),
        ("sd-generate-fp16", check_generate, ("fp16", False), no_cuda),
        ("sd-train-lowmem", check_sd_lowmem, (False,), bf16),
    ]


def run_checks(work: Path, cpu_only: bool = False) -> dict:
    from lora_sd.models import save_tiny_pipeline
    from lora_sd.testing import make_images
    _deterministic()
    cuda = torch.cuda.is_available() and not cpu_only
    ctx = {"work": work, "tiny": str(save_tiny_pipeline(work / "tiny")), "data": work / "images"}
    make_images(ctx["data"], 4, size=(32, 32))
    results = []
    for name, fn, args, skip in checks(cuda):
        if cpu_only and not args[-1]:
            skip = skip or "--cpu-only"
        t0 = time.time()
        if skip:
            results.append({"check": name, "result": "skip", "reason": skip})
            continue
        try:
            r = fn(ctx, *args)
            results.append({"check": name, "result": "pass" if r.pop("ok") else "fail", **r})
        except Skip as e:
            results.append({"check": name, "result": "skip", "reason": str(e)})
        except Exception as e:  # a crash is a failed check, recorded with its traceback
            results.append({"check": name, "result": "fail", "failures": [f"{type(e).__name__}: {e}"],
                            "traceback": traceback.format_exc(limit=8)})
        results[-1]["seconds"] = round(time.time() - t0, 2)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "python": sys.version.split()[0]}
    return {"env": env, "checks": results, "ok": all(r["result"] != "fail" for r in results)}


def markdown(report: dict) -> str:
    env = report["env"]
    lines = [f"# gpu-check ({env['device']}, torch {env['torch']}, CUDA {env['cuda']})", "",
             "| check | result | seconds | details |", "|---|---|---:|---|"]
    for r in report["checks"]:
        if r["result"] == "skip":
            detail = r["reason"]
        elif r["result"] == "fail":
            detail = "; ".join(r["failures"])
        else:
            detail = ", ".join(f"{k}={v}" for k, v in r.items()
                               if k in ("resume_max_abs_diff", "scaler", "scale", "adapter_pixel_change", "unet_dtype",
                                    "offload_max_abs_diff", "block_loads"))
            p = r.get("probe") or {}
            if p:
                detail += f"{', ' if detail else ''}frozen weight {p['weight_dtype']} -> {p['output_dtype']}, " \
                          f"autocast {p['autocast_dtype'] or 'off'}"
        lines.append(f"| {r['check']} | {r['result']} | {r.get('seconds', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"),
                    help="JSON report; a markdown table is written beside it (.md)")
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU checks (CI)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as d:
        report = run_checks(Path(d), a.cpu_only)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
