"""`lora-llm`: LoRA for causal LMs (WikiText-2 LM, SST-2 / CoLA / IMDB / AG-News classification).

    lora-llm train --config configs/llm_sst2_tiny.toml [--run-dir DIR] [--resume latest|PATH] [--set k=v ...]
    accelerate launch -m lora_llm.cli train --config FILE          (several GPUs / NPUs)
    lora-llm eval --adapter RUN_DIR [--set eval.max_eval_tokens=0] [--baseline] [--json]
    lora-llm eval-suite --config configs/llm_suite_tiny.toml --out DIR
    lora-llm generate --adapter RUN_DIR --prompt "The history of" [--sample --temperature 0.8 --top-k 50 --top-p 0.9]
    lora-llm merge RUN_DIR --out MERGED_DIR
    lora-llm inspect RUN_DIR/adapter.safetensors [--json] [--base MODEL]
    lora-llm check --config FILE          (config conflicts, data audit, memory estimate, two real steps)
    lora-llm sweep --config FILE --vary lora.r=4,8 [--dry-run]   (one run per combination of values)
    lora-llm tiny-model OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_core.adapter_files import inspect, refuse_non_finite
from lora_core.cli_errors import (add_debug_flag, add_inspect_parser, add_overwrite_flag, add_tiny_model_parser,
                                  add_train_parser, moved_note, run_command)
from lora_core.configdoc import HelpConfig
from lora_core.errors import LoraLoadError, RunFolderError
from lora_core.files import atomic_write_json, check_output, room_for
from lora_core.run import setup_logging

from .adapter_formats import ADAPTER_FILE, LLM_INFO, check_trained_task
from .cli_decide import add_commands
from .config import ModelSection, load_llm_config
from .errors import SuiteStopped
from .suite import RESULT_FILES, load_suite, markdown_table, run_suite


def _cmd_train(a) -> int:
    from .train import train_from_config   # lazy: torch and transformers (not for --help or argument errors)
    cfg = load_llm_config(a.config, [*a.set, *([f'backend="{a.backend}"'] if a.backend else [])])
    if a.run_dir:
        cfg.run_dir = a.run_dir   # the path as given; config.toml records where the run is
    try:
        status = train_from_config(cfg, a.run_dir, a.resume, overwrite=a.overwrite)
    except RunFolderError as e:
        print(f"lora-llm train: error: {e}", file=sys.stderr)
        return 2
    return 0 if status.get("state") in ("done", "stopped") else 1


def _run_config(adapter: Path, config: str | None, overrides):
    """The job config for evaluating a trained adapter: --config, else the run's config.toml."""
    run_cfg = adapter / "config.toml" if adapter.is_dir() else adapter.parent / "config.toml"
    path = config or (str(run_cfg) if run_cfg.is_file() else None)
    return load_llm_config(path, overrides)


def _cmd_eval(a) -> int:
    from . import adapter_io, evaluate   # lazy: torch and transformers (not for --help or argument errors)
    adapter = Path(a.adapter)
    found = check_output(a.out, inputs=[adapter], overwrite=a.overwrite, flag="--out") if a.out else []
    cfg = _run_config(adapter, a.config, a.set)
    file = adapter / ADAPTER_FILE if adapter.is_dir() else adapter
    if file.is_file():   # before the model loads (a missing file: load_trained says so)
        note = check_trained_task(file, cfg.data.task, f"--adapter {a.adapter}",
                                  "evaluate it on its own task (--set data.task=...), or give a "
                                  f"{cfg.data.task} adapter")
        if note:
            print(f"lora-llm eval: note: {note}", file=sys.stderr)
    model, tok, _ = adapter_io.load_trained(adapter, a.device, cfg.model if a.config or a.set else None)
    res = evaluate.evaluate_job(cfg, model, tok, progress=not a.json, baseline=a.baseline)
    if a.out:
        with room_for(found) as moved:
            atomic_write_json(a.out, res)
        moved_note(moved)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            if k == "generations":
                for g in v:
                    print(f"--- {g['prompt']}{g['text']}")
            elif k == "baseline":   # e.g. "base model + untrained head: accuracy 0.51 (majority-class rate 0.55)"
                print(f"{k:>20}: {v['label']}: " + ", ".join(
                    f"{'majority-class rate' if m == 'majority_accuracy' else m} {x:.4g}"
                    for m, x in v.items() if m != "label"))
            elif not k.startswith("baseline_"):
                print(f"{k:>20}: {v}")
    return 0


def _cmd_suite(a) -> int:
    setup_logging(None)
    suite = load_suite(a.config, a.set)
    if a.resume and a.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    found = [] if a.resume else check_output(
        a.out, inputs=[a.config, *suite.adapters.values()], overwrite=a.overwrite, flag="--out",
        results=[*RESULT_FILES, *suite.tasks])   # --resume continues the earlier results there
    with room_for(found) as moved:
        moved_note(moved)
        rows = run_suite(suite, a.out, a.resume)
    print(markdown_table(rows, suite.note))
    return 0


def _adapter_file(spec: str) -> tuple[Path, dict]:
    """(file, llm_info) of the adapter.safetensors of a run folder or file given on the command line,
    checked to exist and to hold only finite numbers (before any model is loaded)."""
    from lora_core.io import read_safetensors   # lazy: torch (not for --help or argument errors)
    path = Path(spec).expanduser()
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        what = "no such file or folder" if not path.exists() else f"no {ADAPTER_FILE} in this folder (is training done?)"
        raise FileNotFoundError(f"--adapter {spec}: {what}")
    tensors, meta = read_safetensors(file)
    if LLM_INFO not in meta:
        raise ValueError(f"--adapter {spec}: {file.name} was not written by lora-llm (no llm_info metadata); "
                         "give a lora-llm run folder or its adapter.safetensors")
    refuse_non_finite(tensors, file)
    return file, json.loads(meta[LLM_INFO])


def check_sampling(a) -> None:
    """Refuse generation settings that would fail late or be silently ignored."""
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if not a.temperature > 0 or a.temperature == float("inf"):
        raise ValueError(f"--temperature {a.temperature}: must be a finite number > 0 (1.0: unchanged)")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p {a.top_p}: must be in (0, 1] (1.0: off)")
    if a.top_k < 0:
        raise ValueError(f"--top-k {a.top_k}: must be >= 0 (0: off)")
    if a.seed < 0:
        raise ValueError(f"--seed {a.seed}: must be >= 0")
    if not all(p.strip() for p in a.prompt):
        raise ValueError("--prompt: an empty prompt; give some text to continue")


def _cmd_generate(a) -> int:
    check_sampling(a)
    from . import adapter_io, evaluate, models   # lazy: torch and transformers (not for --help or argument errors)
    if a.adapter:
        file, info = _adapter_file(a.adapter)
        if info.get("num_labels"):
            raise ValueError(f"{a.adapter}: a classification adapter; generate needs a language-model adapter")
        model, tok, _ = adapter_io.load_trained(file, a.device)
    else:
        ms = ModelSection(pretrained=a.model, gguf_file=a.gguf_file or "")
        tok = models.load_tokenizer(ms)
        model = models.load_model(ms).to(a.device)
    for p, t in zip(a.prompt, evaluate.generate(model, tok, a.prompt, a.max_new_tokens, a.sample, a.temperature,
                                       a.top_k, a.top_p, a.seed)):
        print(p + t)
        print()
    return 0


def _cmd_tiny(a) -> int:
    from .models import make_tiny_model   # lazy: torch and transformers (not for --help or argument errors)
    found = check_output(a.out_dir, overwrite=a.overwrite, flag="OUT_DIR")
    with room_for(found) as moved:
        make_tiny_model(a.out_dir, seed=a.seed)
    moved_note(moved)
    print(f"tiny GPT-2 written to {a.out_dir} (use model.pretrained = \"{a.out_dir}\")")
    return 0


def _cmd_merge(a) -> int:
    from .adapter_io import save_merged   # lazy: torch and transformers (not for --help or argument errors)
    found = check_output(a.out, inputs=[a.adapter], overwrite=a.overwrite, flag="--out")
    file = _adapter_file(a.adapter)[0]
    with room_for(found) as moved:
        save_merged(file, a.out)
    moved_note(moved)
    print(f"merged model written to {a.out} (load it with transformers' from_pretrained)")
    return 0


def _cmd_inspect(a) -> int:
    try:
        d = inspect(a.file)
    except LoraLoadError as e:
        print(f"lora-llm inspect: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:>16}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-llm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = add_train_parser(sub, "train one adapter from a TOML job file", "lora_llm.config:LLMTrainConfig",
                         "configs/llm_*.toml", _cmd_train)
    t.add_argument("--backend", choices=["torch", "mindspore"], default=None,
                   help="override the config's backend (mindspore: see docs/mindspore.md and the [mindspore] table)")

    e = sub.add_parser("eval", help="evaluate a trained adapter (perplexity or accuracy/F1/MCC)")
    e.add_argument("--adapter", required=True, help="run folder or adapter.safetensors")
    e.add_argument("--config", default=None, help="job file (default: the run folder's config.toml)")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    e.add_argument("--baseline", action="store_true",
                   help="also score the base model without the adapter (a classifier with its untrained head), "
                        "with the majority-class rate")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="write the result as JSON here")
    add_overwrite_flag(e, "the --out file")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("eval-suite", help="train or load and evaluate all tasks; writes results.md + results.json")
    s.add_argument("--config", required=True, help="suite TOML (see configs/llm_suite_*.toml)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. base.train.max_steps=10")
    s.add_argument("--resume", default=None, help="'latest': continue unfinished task runs")
    add_overwrite_flag(s, "earlier results there (results.json, results.md, the task run folders)")
    s.add_argument("--help-config", action=HelpConfig, config_class="lora_llm.suite:SuiteConfig")
    s.set_defaults(fn=_cmd_suite)

    g = sub.add_parser("generate", help="generate text with a language-model adapter (or a bare model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="run folder or adapter.safetensors")
    src.add_argument("--model", help="a base model without adapter (hub id, folder, 'tiny')")
    g.add_argument("--gguf-file", default=None)
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.set_defaults(fn=_cmd_generate)

    add_tiny_model_parser(sub, "write a tiny random GPT-2 (+ GPT-2 tokenizer) folder for tests", _cmd_tiny)

    mg = sub.add_parser("merge", help="fold an adapter into its base model and save a transformers folder")
    mg.add_argument("adapter", help="run folder or adapter.safetensors")
    mg.add_argument("--out", required=True, help="new folder for the merged model")
    add_overwrite_flag(mg, "the --out folder")
    mg.set_defaults(fn=_cmd_merge)

    add_inspect_parser(sub, "describe an adapter file or PEFT folder", _cmd_inspect, "lora-llm",
                       "lora_llm.cli_decide:inspect_base")
    add_commands(sub)   # sweep, check
    add_debug_flag(p, sub)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def command() -> int:
        try:
            return a.fn(a)
        except SuiteStopped as e:   # a stop asked for by the user: not an error
            print(f"lora-llm {a.cmd}: {e}", file=sys.stderr)
            return 1
    return run_command(f"lora-llm {a.cmd}", command, a.debug)


if __name__ == "__main__":
    sys.exit(main())
