"""Merge an adapter into its base model and save the result (run by the GUI as a subprocess).

    python -m lora_gui.merge sd  --model tiny --lora RUN/lora.safetensors --out DIR   (a diffusers folder)
    python -m lora_gui.merge llm --lora RUN_DIR_or_adapter.safetensors --out DIR       (a transformers folder)

Glue over the trainers' own loaders (lora_sd.generate.load_adapters, lora_llm.train.load_trained)
and lora_core.remove_lora(merge=True); no LoRA math here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def merge_sd(model: str, lora: str, out: Path, scale: float = 1.0) -> None:
    from lora_core import remove_lora
    from lora_sd.generate import load_adapters
    from lora_sd.models import load_pipeline
    pipe = load_pipeline(model)
    load_adapters(pipe, [(lora, scale)])
    for m in (pipe.unet, pipe.text_encoder):
        remove_lora(m, merge=True)
    pipe.save_pretrained(str(out))


def merge_llm(lora: str, out: Path) -> None:
    from lora_core import remove_lora
    from lora_llm.train import load_trained
    model, tok, _ = load_trained(lora, "cpu")
    remove_lora(model, merge=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_gui.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["sd", "llm"])
    p.add_argument("--model", default="tiny", help="SD base model (hub id, diffusers folder, file or 'tiny')")
    p.add_argument("--lora", required=True, help="adapter file (LLM: also a run folder)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"{a.out} exists already")
    if a.kind == "sd":
        merge_sd(a.model, a.lora, a.out, a.scale)
    else:
        merge_llm(a.lora, a.out)
    print(f"merged model written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
