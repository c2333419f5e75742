"""`lora-llm sweep`, `lora-llm check` and `inspect --base` (added to lora_llm.cli)."""
from __future__ import annotations

import json


def inspect_base(a) -> int:
    """`lora-llm inspect FILE --base MODEL`: the load report of FILE against MODEL, before any load."""
    from pathlib import Path
    from .adapters import ADAPTER_FILE, load_report, read_adapter_info
    from .config import ModelSection
    from .models import load_model, load_tokenizer
    path = Path(a.file)
    info = read_adapter_info(path / ADAPTER_FILE if path.is_dir() else path)
    ms = ModelSection(**{**info.get("model", {}), "pretrained": a.base, "gguf_file": ""})
    tok = load_tokenizer(ms)
    model = load_model(ms, info.get("num_labels", 0), tok.pad_token_id)
    rep = load_report(path, model, base=a.base)
    print(json.dumps(rep.to_dict(), indent=2) if a.json else rep.text())
    return 0 if rep.fits else 1


def _cmd_sweep(a) -> int:
    from lora_core.sweep import cli_sweep
    from .config import LLMTrainConfig, load_llm_config
    from .train import train_from_config
    return cli_sweep(a, LLMTrainConfig, load_llm_config, train_from_config)


def _cmd_check(a) -> int:
    from lora_core.preflight import cli_check
    from .preflight import preflight
    return cli_check(a, preflight)


def add_commands(sub) -> None:
    """Add sweep and check to the `lora-llm` subparsers."""
    from lora_core.preflight import add_check_parser
    from lora_core.sweep import add_sweep_parser
    add_sweep_parser(sub, "lora_llm.config:LLMTrainConfig", "lora-llm").set_defaults(fn=_cmd_sweep)
    add_check_parser(sub, "lora_llm.config:LLMTrainConfig", _cmd_check)
