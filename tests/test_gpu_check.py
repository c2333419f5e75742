"""bench/gpu_check.py (`make gpu-check`): its CPU part runs here; the CUDA checks report a skip with
the reason on a machine without CUDA (and run for real on one)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_cpu_part_passes_and_cuda_part_says_why_it_skipped(tmp_path):
    gc = _gpu_check()
    out = tmp_path / "gpu_check.json"
    assert gc.main(["--out", str(out), "--cpu-only"]) == 0
    report = json.loads(out.read_text())
    res = {r["check"]: r for r in report["checks"]}
    cpu = [n for n in res if n.endswith("-cpu")]
    assert len(cpu) == 5 and all(res[n]["result"] == "pass" for n in cpu), res
    assert all(res[n]["result"] == "skip" and res[n]["reason"] for n in res if n not in cpu)
    sd32, sd16 = res["sd-train-resume-fp32-cpu"], res["sd-train-resume-bf16-cpu"]
    assert sd32["resume_max_abs_diff"] == 0.0 and sd16["resume_max_abs_diff"] == 0.0
    # the probe saw the precision really run: bf16 weights and outputs under bf16 autocast, fp32 LoRA
    assert sd16["probe"] == {"weight_dtype": "torch.bfloat16", "output_dtype": "torch.bfloat16", "device": "cpu",
                             "autocast": True, "autocast_dtype": "torch.bfloat16"}
    assert sd32["probe"]["autocast"] is False and sd16["lora_dtypes"] == ["torch.float32"]
    assert res["sd-generate-fp32-cpu"]["adapter_pixel_change"] > 0
    low = res["sd-train-lowmem-cpu"]   # fp8 + checkpointing + adamw8bit, offloading exact and really loading blocks
    assert low["offload_max_abs_diff"] == 0.0 and low["block_loads"] > 0
    assert "| sd-train-resume-fp16 | skip |" in out.with_suffix(".md").read_text()


def test_precision_expectations_catch_a_path_that_did_not_run():
    gc = _gpu_check()
    fp32_probe = {"weight_dtype": "torch.float32", "output_dtype": "torch.float32", "device": "cuda",
                  "autocast": False, "autocast_dtype": None}
    fell_back = {"probe": fp32_probe, "lora_dtypes": ["torch.float32"], "scaler": None, "scale": None}
    bad = gc._expect_precision(fell_back, "fp16", "cuda")
    assert any("expected torch.float16" in b for b in bad) and any("GradScaler" in b for b in bad)
    assert any("autocast" in b for b in bad)
    half_lora = {**fell_back, "lora_dtypes": ["torch.float16"]}
    assert any("LoRA parameters" in b for b in gc._expect_precision(half_lora, "no", "cuda"))
    assert gc._expect_precision(fell_back, "no", "cpu") == ["ran on cuda, expected cpu"]


def test_probe_records_autocast():
    gc = _gpu_check()
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    probe = gc.PrecisionProbe(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin(torch.randn(2, 4))
    seen = probe.close()
    assert seen["autocast"] and seen["output_dtype"] == "torch.bfloat16" and seen["weight_dtype"] == "torch.bfloat16"
