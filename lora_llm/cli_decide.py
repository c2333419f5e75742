"""`lora-llm sweep`, `lora-llm check` and `inspect --base` (added to lora_llm.cli)."""
from __future__ import annotations

import json

from lora_core.adapter_files import open_view
from lora_core.cli_errors import add_sweep_and_check

from .adapter_formats import LLM_INFO
from .config import ModelSection


def inspect_base(a) -> int:
    """`lora-llm inspect FILE --base MODEL`: the load report of FILE against MODEL, before any load."""
    from . import adapter_io, models   # lazy: torch and transformers (not for --help or argument errors)
    if not a.file:   # the base's adaptable modules {key: [in, out]}, for a header-only fit check (GUI badge)
        return _base_modules(a.base)
    view = open_view(a.file)   # our file / run folder (llm_info says the task) or a PEFT folder
    info = view.json_metadata.get(LLM_INFO) or {}
    if not info and view.config:
        heads = [s[0] for k, s in ((k, view.header.shape(k)) for k in view.keys) if ".score." in k and len(s) == 2]
        info = {"num_labels": heads[0] if heads else 0}
    ms = ModelSection(**{**info.get("model", {}), "pretrained": a.base, "gguf_file": ""})
    tok = models.load_tokenizer(ms)
    model = models.load_model(ms, info.get("num_labels", 0), tok.pad_token_id)
    rep = adapter_io.load_report(a.file, model, base=a.base)
    print(json.dumps(rep.to_dict(), indent=2) if a.json else rep.text())
    return 0 if rep.fits else 1


def _base_modules(base: str) -> int:
    from . import adapter_io, models   # lazy: torch and transformers (not for --help or argument errors)
    ms = ModelSection(pretrained=base)
    model = models.load_model(ms, 0, models.load_tokenizer(ms).pad_token_id)
    mods = {n: list(dims) for n, dims in adapter_io.module_dims(model).items()}
    print(json.dumps({"base": base, "modules": mods}))
    return 0


def add_commands(sub) -> None:
    """Add sweep and check to the `lora-llm` subparsers."""
    add_sweep_and_check(sub, "lora-llm", "lora_llm.config:LLMTrainConfig",
                        "lora_llm.config:load_llm_config", "lora_llm.train:train_from_config", "lora_llm.preflight:preflight")
