"""`lora-llm sweep`, `lora-llm check` and `inspect --base` (added to lora_llm.cli)."""
from __future__ import annotations

import json

from lora_core.configdoc import HelpConfig


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
    from lora_core.preflight import print_report
    from .preflight import preflight
    rep = preflight(a.config, a.set, device=a.device, steps=0 if a.no_steps else 2)
    print(json.dumps(rep.to_dict(), indent=2) if a.json else print_report(rep))
    return 0 if rep.ok else 1


def add_commands(sub) -> None:
    """Add sweep and check to the `lora-llm` subparsers."""
    from lora_core.sweep import add_sweep_parser
    add_sweep_parser(sub, "lora_llm.config:LLMTrainConfig", "lora-llm").set_defaults(fn=_cmd_sweep)
    c = sub.add_parser("check", help="preflight: config conflicts, data audit, parameters, memory estimate and two "
                                     "real optimisation steps at a reduced size; exit 0 only when nothing blocks")
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--device", default="", help="default: cuda when available, else cpu")
    c.add_argument("--no-steps", action="store_true", help="skip the two optimisation steps")
    c.add_argument("--json", action="store_true")
    c.add_argument("--help-config", action=HelpConfig, config_class="lora_llm.config:LLMTrainConfig")
    c.set_defaults(fn=_cmd_check)
