"""The causal-LM adapter formats, registered with lora_core.adapter_files, and the file names of a run's
adapter (ADAPTER_FILE, PEFT_DIR). No torch here: the GUI and `inspect` read headers through it.

lora_core: our `adapter.safetensors` (lora_core.io.save_lora, either backend), with the run's
           `llm_info` (task, num_labels, model section) in its metadata; `lora-llm` loads it.
peft:      a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, keys
           `base_model.model.<path>.lora_A.weight`), as `lora-llm train` exports beside the file and
           PEFT's `save_pretrained` writes; loaded with PEFT itself, `lora-llm inspect` describes it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from lora_core.adapter_files import (LORA_CORE, PEFT_CONFIG, AdapterFormat, AdapterView, describe_lora_core,
                                     is_lora_core, read_header, register)

ADAPTER_FILE = "adapter.safetensors"   # a run folder's adapter (lora_core format)
PEFT_DIR = "peft"                      # the run folder's PEFT export, beside it
LLM_INFO = "llm_info"                  # the metadata key of what rebuilds the model (task, labels, [model])
PEFT = "peft"
PEFT_KEY = re.compile(r"base_model\.model\.(.+?)\.lora_[AB](?:\.[^.]+)?\.weight")
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr", "OFT": "oft"}   # peft_type -> lora.type
# the module of a LoHa / LoKr / OFT tensor in a PEFT folder (lora_llm.adapter_io.export_peft writes them)
PEFT_LYCORIS_KEY = re.compile(r"base_model\.model\.(.+?)\.(?:hada_\w+|lokr_\w+|oft_R(?:\.[^.]+)?\.weight)")


def check_trained_task(file: Path, task: str, where: str, fix: str) -> str:
    """Refuse (ValueError, one line naming both tasks, and `fix`) an adapter file whose `llm_info` says it was
    trained on another task than `task`, from its header: an SST-2 adapter is never scored as CoLA's. Returns a
    note ("" when checked) for a file whose metadata names no task, so that it cannot be checked."""
    raw = read_header(file).metadata.get(LLM_INFO) or "{}"
    try:
        trained = json.loads(raw).get("task")
    except (ValueError, AttributeError):   # llm_info that is not a JSON object
        trained = None
    if not trained:
        return (f"{where}: {Path(file).name} does not say which task it was trained on (no task in its {LLM_INFO} "
                f"metadata), so it cannot be checked that it was trained on {task!r}")
    if trained != task:
        raise ValueError(f"{where}: that adapter was trained on {trained!r}, not {task!r}; {fix}")
    return ""


def describe_llm_file(view: AdapterView) -> dict:
    d = describe_lora_core(view)
    info = view.json_metadata.get(LLM_INFO) or {}
    d["info"] = info
    d["base_model"] = d["base_model"] or info.get("pretrained") or info.get("model", {}).get("pretrained", "")
    d["steps"] = d["steps"] or info.get("steps", "")
    return d


def detect_peft(view: AdapterView) -> bool:
    if view.config is not None and str(view.config.get("peft_type", "")).upper() in PEFT_TYPES:
        return True
    return any(PEFT_KEY.fullmatch(k) for k in view.keys)


def describe_peft(view: AdapterView) -> dict:
    cfg = view.config or {}
    kind = PEFT_TYPES.get(str(cfg.get("peft_type", "LORA")).upper(), "lora")
    targets = sorted({m.group(1) for k in view.keys for m in [PEFT_KEY.fullmatch(k) or PEFT_LYCORIS_KEY.fullmatch(k)]
                      if m})
    shapes = {m.group(1): view.header.shape(k) for k in view.keys
              for m in [PEFT_KEY.fullmatch(k)] if m and ".lora_A" in k}
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    ranks = [shape[0] for shape in shapes.values()] or ([cfg["r"]] if "r" in cfg else [])
    alphas = {float(a) for a in alpha_pattern.values()}
    alpha = cfg.get("lora_alpha", cfg.get("alpha"))   # LoHa / LoKr: PEFT's `alpha`
    if alpha is not None and (not alpha_pattern or len(alpha_pattern) < len(targets)):
        alphas.add(float(alpha))
    return {"ranks": ranks, "alphas": sorted(alphas), "target_modules": targets, "config": cfg,
            "base_model": cfg.get("base_model_name_or_path") or "", "task_type": cfg.get("task_type") or "",
            "rank_pattern": rank_pattern, "adapter_types": {kind: len(targets)}}


register(AdapterFormat(LORA_CORE, "lora_core adapter (lora-llm run, PyTorch or MindSpore)", tool="lora-llm",
                       cli="lora_llm.cli", family=LORA_CORE, detect=is_lora_core, describe=describe_llm_file,
                       commands=("inspect", "eval", "generate", "merge"), priority=10))
register(AdapterFormat(PEFT, f"PEFT adapter folder ({PEFT_CONFIG}; load with peft.PeftModel)", tool="lora-llm",
                       cli="lora_llm.cli", family=PEFT, detect=detect_peft, describe=describe_peft, priority=40))
