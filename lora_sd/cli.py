"""`lora-sd`, the Stable Diffusion commands:
  train             train a LoRA from a TOML config (lora_sd.train; also under `accelerate launch`)
  tiny-model        write a tiny SD 1.x / 2.x / SDXL pipeline with random weights (offline tests and demos)
  generate          images with adapters and embeddings (lora_sd.generate)
  merge             fold adapters into the base and save it as a diffusers folder
  save-single-file  write a model as one .safetensors file in the original (LDM / SGM) layout
  convert           kohya <-> diffusers adapter files (lora_sd.formats)
  inspect           rank, alpha, targets, metadata of an adapter file; with --base, whether it fits a model
  check-dataset     count images and captions, list problems (lora_sd.data)
  caption           caption a data folder's images with a local BLIP model (lora_sd.caption)
  score             concept score of a model with adapters at scales (lora_sd.concept_score)
  pretrain-tiny     pretrain the tiny pipeline on the synthetic shapes world (lora_sd.pretrain)
  grid              comparison grid over steps, scales, prompts, seeds or adapters (lora_sd.grid)
  sweep             one run per combination of --vary values
  check             preflight: conflicts, data, memory estimate and two real steps (lora_sd.preflight)
(grid, sweep and check are added by lora_sd.cli_decide). Also runs as
`accelerate launch -m lora_sd.cli train --config FILE` on several processes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_core.cli_errors import (add_debug_flag, add_inspect_parser, add_overwrite_flag, add_tiny_model_parser,
                                  add_train_parser, moved_note, run_command)
from lora_core.adapter_files import inspect
from lora_core.errors import RunFolderError
from lora_core.files import atomic_write_json, check_output, room_for

from . import synth
from .adapter_formats import embeddings_used
from .cli_decide import add_commands
from .concept_score import format_table, noise_refusal, score_generator
from .config import ARCHS, AUTO_SAMPLER, SAMPLER_HELP, load_train_config

EXAMPLES = """examples:
  lora-sd tiny-model workspace/models/tiny-sd
  lora-sd train --config configs/sd_tiny_demo.toml --set train.max_steps=50
  accelerate launch --multi_gpu --num_processes 2 -m lora_sd.cli train --config configs/sd15_cross_attn.toml
  lora-sd generate --model runwayml/stable-diffusion-v1-5 --lora RUN/lora.safetensors:0.8 --prompt "a photo of sks dog"
  lora-sd convert RUN/lora.safetensors out/pytorch_lora_weights.safetensors --to diffusers
  lora-sd inspect RUN/lora.safetensors
  lora-sd save-single-file workspace/models/tiny-sd tiny-sd.safetensors --half
  lora-sd check-dataset ../shared/data/dreambooth/train_512
  lora-sd score --model tiny --lora RUN/lora.safetensors --scales 0,1 --concept base --concept purple --seeds 8
  lora-sd pretrain-tiny --out workspace/models/tiny-synth        # the shipped "tiny" model: ~97 min on 2 CPU cores
"""


def _cmd_train(a) -> int:
    from .train import run_training  # lazy: torch (--help stays torch-free)
    cfg = load_train_config(a.config, list(a.set or []))
    if a.run_dir:
        cfg.run_dir = a.run_dir   # the path as given (not re-parsed as TOML)
    try:
        status = run_training(cfg, resume=a.resume, overwrite=a.overwrite)
    except RunFolderError as e:
        print(f"lora-sd train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: status.get(k) for k in ("state", "step", "last_checkpoint")}))
    print(f"run folder: {cfg.run_dir}")
    return 0 if status.get("state") in ("done", "stopped") else 1


def _cmd_tiny_model(a) -> int:
    from .models import RANDOM_WEIGHTS_NOTE, save_tiny_pipeline  # lazy: torch (--help stays torch-free)
    found = check_output(a.out_dir, overwrite=a.overwrite, flag="OUT_DIR")
    with room_for(found) as moved:
        out = save_tiny_pipeline(a.out_dir, seed=a.seed, arch=a.arch)
    moved_note(moved)
    print(f"wrote {out} ({a.arch})\n{RANDOM_WEIGHTS_NOTE}.")
    return 0


def _parse_lora(spec: str) -> tuple[str, float]:
    path, sep, scale = spec.rpartition(":")
    if sep and path and not path.endswith(("\\", "/")):
        try:
            return path, float(scale)
        except ValueError:
            if Path(path).expanduser().exists() and not Path(spec).expanduser().exists():
                raise ValueError(f"--lora {spec}: the scale {scale!r} is not a number; write FILE:SCALE, "
                                 "e.g. FILE:0.8") from None
    return spec, 1.0


def _adapter_specs(a) -> list[tuple[str, float]]:
    from .generate import check_adapter_list  # lazy: torch (--help stays torch-free)
    specs = [_parse_lora(s) for s in a.lora or []]
    check_adapter_list(specs)
    return specs


def _add_embedding_choice(p) -> None:
    """--skip-embedding / --embedding-from: which --lora files' own word embeddings load (generate, merge, score)."""
    p.add_argument("--skip-embedding", action="append", metavar="FILE", help="a --lora file whose own "
                   "<name>_emb.safetensors is left out (repeatable): combine adapters trained with the same word")
    p.add_argument("--embedding-from", action="append", metavar="FILE", help="a --lora file whose own "
                   "<name>_emb.safetensors gives its word when several --lora files bring one for the same word "
                   "(repeatable, one per word): the others' embedding of that word is left out")


def _embedding_choice(a, files) -> dict:
    """load_adapters' keyword arguments for the choice, checked from the files' headers before any model loads."""
    choice = {"skip_embeddings": a.skip_embedding or (), "embedding_from": a.embedding_from or ()}
    embeddings_used(files, choice["skip_embeddings"], choice["embedding_from"])
    return choice


def _cmd_generate(a) -> int:
    from lora_core.dtypes import torch_dtype  # lazy: torch (--help stays torch-free)
    from .generate import check_generation, generate, load_adapters  # lazy: torch (--help stays torch-free)
    from .models import RANDOM_WEIGHTS_NOTE, is_random_weights, load_pipeline, pick_device  # lazy: torch (--help stays torch-free)
    check_generation(steps=a.steps, guidance_scale=a.guidance, width=a.width, height=a.height, seed=a.seed,
                     scheduler=a.scheduler)
    specs = _adapter_specs(a)
    choice = _embedding_choice(a, [f for f, _ in specs])
    prompts = a.prompt or ["a photo"]
    found = check_output(a.out, inputs=[f for f, _ in specs], overwrite=a.overwrite, flag="--out",
                         results=[f"image_{i}.png" for i in range(len(prompts))])
    pipe = load_pipeline(a.model, a.model_config, dtype=torch_dtype(a.dtype))
    if is_random_weights(pipe):
        print(f"note: {RANDOM_WEIGHTS_NOTE}.", file=sys.stderr)
    pipe.to(pick_device(a.device))
    report = load_adapters(pipe, specs, fuse=a.fuse, embeddings=a.embedding or (), **choice)
    for r in report:
        what = f"the word {r['word']!r}" if "word" in r else f"{r['matched_modules']} modules matched"
        print(f"adapter {r['file']} ({r['format']}): {what}, scale {r['scale']}")
    with room_for(found) as moved:
        res = generate(pipe, prompts, negative_prompt=a.negative_prompt, steps=a.steps, guidance_scale=a.guidance,
                       seed=a.seed, width=a.width, height=a.height, scheduler=a.scheduler, out_dir=a.out,
                       prefix="image_", base={"model": a.model, "adapters": report, "fused": a.fuse})
    moved_note(moved)
    for i in range(len(res)):
        print(Path(a.out) / f"image_{i}.png")
    return 0


def _cmd_merge(a) -> int:
    from lora_core import remove_lora  # lazy: torch (--help stays torch-free)
    from .embeddings import fold_embeddings  # lazy: torch (--help stays torch-free)
    from .formats import MERGED_ADAPTERS, file_metadata  # lazy: torch (--help stays torch-free)
    from .generate import load_adapters, pipeline_components  # lazy: torch (--help stays torch-free)
    from .models import load_pipeline  # lazy: torch (--help stays torch-free)
    out = Path(a.out)
    specs = _adapter_specs(a)
    found = check_output(out, inputs=[a.model, *(f for f, _ in specs)], overwrite=a.overwrite, flag="--out")
    choice = _embedding_choice(a, [f for f, _ in specs])
    pipe = load_pipeline(a.model, a.model_config)
    comps = pipeline_components(pipe)
    merged = [{"file": path, "scale": scale, "metadata": file_metadata(path, comps)} for path, scale in specs]
    load_adapters(pipe, specs, **choice)
    for m in comps.values():
        remove_lora(m, merge=True)   # fold every loaded adapter (at its scale) into the base weights
    fold_embeddings(pipe.text_encoder)   # and the word embeddings trained with them into the token rows
    with room_for(found) as moved:
        pipe.save_pretrained(str(out))
        atomic_write_json(out / MERGED_ADAPTERS, merged)
    moved_note(moved)
    print(f"merged pipeline written to {out} (the adapters folded in: {MERGED_ADAPTERS})")
    return 0


def _cmd_save_single_file(a) -> int:
    from .models import load_pipeline, save_single_file  # lazy: torch (--help stays torch-free)
    found = check_output(a.out, inputs=[a.model], overwrite=a.overwrite, flag="save-single-file OUT")
    pipe = load_pipeline(a.model, a.model_config)
    with room_for(found) as moved:
        r = save_single_file(pipe, a.out, half=a.half)
    moved_note(moved)
    print(f"wrote {r['out']} ({r['arch']}, original single-file layout, {r['tensors']} tensors, {r['bytes']:,} bytes)")
    return 0


def _cmd_convert(a) -> int:
    found = check_output(a.output, inputs=[a.input], overwrite=a.overwrite, flag="convert OUTPUT")
    from lora_core.dtypes import torch_dtype  # lazy: torch (--help stays torch-free)
    from .formats import convert  # lazy: torch (--help stays torch-free)
    with room_for(found) as moved:
        r = convert(a.input, a.output, a.to, torch_dtype(a.dtype))
    moved_note(moved)
    print(f"converted {r['modules']} modules: {r['from']} -> {r['to']}: {r['out']}")
    return 0


def _cmd_inspect(a) -> int:
    s = inspect(a.file)
    if a.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"file:        {a.file}\nformat:      {s['format']} ({s['title']}); read by {s['tool']} "
          f"({', '.join(s['commands'])})\nbase model:  {s['base_model'] or '-'}")
    print(f"modules:     {s['targets']} {s.get('modules_by_component', '')}\nrank:        {s['ranks']}\n"
          f"alpha:       {s['alphas']}\nblocks:      {', '.join(s['blocks'])}\n"
          f"parameters:  {s['parameters']:,} in {s['tensors']} tensors ({s['dtype']})")
    if s.get("architecture"):
        sgm = s.get("blocks_original")
        print(f"arch:        {s['architecture']}" + (f"; UNet blocks in the SGM layout: {', '.join(sgm)}" if sgm else ""))
    if s.get("target_leaves"):
        print(f"targets:     {', '.join(s['target_leaves'])} in {', '.join(s.get('attention') or []) or '-'}")
    if s.get("streams"):   # SD 3.x / Flux: the transformer modules per stream
        print(f"streams:     {', '.join(f'{k} {n}' for k, n in sorted(s['streams'].items()))}")
    if s["convert_to"]:
        print(f"convert to:  {', '.join(s['convert_to'])}")
    if s["metadata"]:
        print("metadata:")
        for k, v in s["metadata"].items():
            v = v if len(v) <= 100 else v[:97] + "..."
            print(f"  {k} = {v}")
    return 0


def _cmd_check_dataset(a) -> int:
    from .data import make_buckets, scan  # lazy: torch (--help stays torch-free)
    rep = scan(a.dir, a.caption_extension)
    d = rep.to_dict(need_captions=not a.no_captions_needed)
    if a.json:
        if a.resolution and (a.resolution < 8 or a.bucket_step < 8) or a.resolution < 0:
            raise ValueError(f"--resolution {a.resolution} --bucket-step {a.bucket_step}: both at least 8 "
                             "(--resolution 0: no buckets)")
        buckets = make_buckets(a.resolution, a.bucket_step) if a.resolution else None
        d.update(entries=rep.entries(buckets), corrupt_files=rep.corrupt)
        print(json.dumps(d, indent=2))
    else:
        print(f"{d['root']}: {d['images']} images, {d['captioned']} captioned, {d['corrupt']} corrupt, "
              f"{d['samples_per_epoch']} samples per epoch (with repeats)")
        if d["masks"]:
            print(f"  {d['masks']} image(s) with a _mask.png (data.masked_loss)")
        for folder, rep_n in d["folders"].items():
            print(f"  {folder}: repeats {rep_n}")
        for p in d["problems"]:
            print(f"  problem: {p}")
        print("ok" if d["ok"] else "NOT trainable as is")
    if not d["ok"]:
        problems = d["problems"] or ["0 samples per epoch"]
        print(f"lora-sd check-dataset: error: {a.dir}: not trainable as is ({len(problems)} problem(s)), "
              f"e.g. {problems[-1]}", file=sys.stderr)
    return 0 if d["ok"] else 1   # a report that finds problems (as the existing tests expect)


def _cmd_caption(a) -> int:
    from .caption import MISSING_ONLY, NEW, OVERWRITE, caption_folder  # lazy: torch, transformers (--help stays torch-free)
    mode = OVERWRITE if a.overwrite else MISSING_ONLY if a.missing_only else NEW
    rep = caption_folder(a.dir, a.model, mode=mode, prefix=a.prefix, caption_extension=a.caption_extension,
                         max_tokens=a.max_tokens, device=a.device, report=lambda line: print(line, flush=True))
    print(f"captioned {rep['captioned']} image(s) of {a.dir}" +
          (f"; {rep['moved_aside']} earlier caption(s) moved aside as NAME.old-<time>" if rep["moved_aside"] else "") +
          (f"; {len(rep['empty'])} left without one (the model wrote nothing)" if rep["empty"] else ""))
    return 0


def _score_outputs(a, scales: list[float]) -> tuple[Path, list[Path]]:
    """(the JSON report's path, the earlier results that --overwrite replaces): --out, else
    <adapter>.score.json beside the first --lora (or --embedding); never the shell's current folder."""
    beside = (a.lora or a.embedding or [None])[0]
    if not a.out and beside is None:
        raise ValueError("--out: give the JSON report's path (with no --lora or --embedding there is no adapter "
                         "to write it beside)")
    out = Path(a.out) if a.out else Path(beside).with_suffix(".score.json")
    inputs = [*(a.lora or []), *(a.embedding or [])]
    found = check_output(out, inputs=inputs, overwrite=a.overwrite, flag="--out")
    if a.save_images:
        found += check_output(a.save_images, inputs=inputs, overwrite=a.overwrite, flag="--save-images",
                              results=[f"scale_{s:g}" for s in scales])
    return out, found


def _cmd_score(a) -> int:
    from .generate import load_adapters, sampler_name  # lazy: torch (--help stays torch-free)
    from .models import is_random_weights, load_pipeline, pick_device  # lazy: torch (--help stays torch-free)
    try:
        groups = [(c, synth.prompts_for(c, tuple(a.background or synth.BACKGROUNDS)))
                  for c in a.concept or ([] if a.prompt else ["base"])]
        scales = [float(s) for s in a.scales.split(",")] if a.lora or a.embedding else [0.0]
    except ValueError as e:
        print(f"lora-sd score: error: {e} (--concept, --background, --scales)", file=sys.stderr)
        return 2
    groups += [("prompts", a.prompt)] if a.prompt else []
    out, found = _score_outputs(a, scales)
    choice = _embedding_choice(a, a.lora or [])
    pipe = load_pipeline(a.model, a.model_config)
    if is_random_weights(pipe):
        raise ValueError(noise_refusal(f"--model {a.model}"))
    pipe.to(pick_device(a.device))
    report = load_adapters(pipe, [(f, 1.0) for f in a.lora or []], embeddings=a.embedding or (), **choice)
    seeds = list(range(a.seed, a.seed + a.seeds))
    with room_for(found) as moved:
        rows = _score_rows(a, pipe, report, groups, scales, seeds)
        atomic_write_json(out, {"model": a.model, "adapters": report, "seeds": seeds, "steps": a.steps,
                                "guidance_scale": a.guidance, "size": a.size, "scheduler": sampler_name(pipe, a.scheduler),
                                "rows": rows})
    moved_note(moved)
    print(format_table(rows))
    print(f"wrote {out}")
    return 0


def _score_rows(a, pipe, report, groups, scales, seeds) -> list[dict]:
    from .generate import pipeline_images, set_adapter_scale  # lazy: torch (--help stays torch-free)
    rows = []
    for scale in scales:
        if report:
            set_adapter_scale(pipe, [f"adapter_{i}" for i in range(len(a.lora or []))], scale)
        save = Path(a.save_images) / f"scale_{scale:g}" if a.save_images else None
        make = pipeline_images(pipe, steps=a.steps, guidance_scale=a.guidance, side=a.size, scheduler=a.scheduler,
                               save_dir=save)
        for name, prompts in groups:
            rows.append({"scale": scale, "group": name, "prompts": prompts, **score_generator(make, prompts, seeds)})
    return rows


def _cmd_pretrain_tiny(a) -> int:
    from .pretrain import PretrainSettings, pretrain  # lazy: torch (--help stays torch-free)
    given = {"seed": a.seed, "side": a.size, "n_images": a.images, "steps_vae": a.steps_vae,
             "steps_decoder": a.steps_decoder, "steps_unet": a.steps_unet, "steps_offset": a.steps_offset,
             "batch_size": a.batch_size}
    s = PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    try:
        out = pretrain(a.out, s, run_dir=a.run_dir or None, resume=a.resume)
    except FileExistsError as e:
        print(f"lora-sd pretrain-tiny: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:   # a phase stopped or failed: its run folder keeps the checkpoints
        print(f"lora-sd pretrain-tiny: {e}; continue with --resume latest", file=sys.stderr)
        return 1
    print(f"wrote {out} (model card: {out / 'README.md'})")
    return 0


def _add_score_parsers(sub) -> None:
    """`score` and `pretrain-tiny` (the synthetic shapes world, lora_sd.synth)."""
    sc = sub.add_parser("score", help="concept score (prompted colour / shape / background) of a model, with adapters at scales")
    sc.add_argument("--model", default="tiny", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    sc.add_argument("--model-config", default="", help="configs folder/hub id for a single-file checkpoint")
    sc.add_argument("--lora", action="append", metavar="FILE", help="adapter file (repeatable; all get each scale)")
    sc.add_argument("--embedding", action="append", metavar="FILE", help="textual-inversion file (repeatable; at each "
                    "scale too: 0 = the base's row); an adapter's own <name>_emb.safetensors loads with it")
    _add_embedding_choice(sc)
    sc.add_argument("--scales", default="0,1", help="comma-separated adapter scales; 0 = the base model")
    sc.add_argument("--concept", action="append", help="prompt set: base, or a held-out word (purple, star); repeatable")
    sc.add_argument("--background", action="append", default=None, help="backgrounds of the concept prompts (repeatable; default all)")
    sc.add_argument("--prompt", action="append", help="an extra prompt (repeatable)")
    sc.add_argument("--seeds", type=int, default=4, help="how many seeds per prompt")
    sc.add_argument("--seed", type=int, default=0, help="the first seed")
    sc.add_argument("--steps", type=int, default=20)
    sc.add_argument("--guidance", type=float, default=5.0)
    sc.add_argument("--size", type=int, default=64, help="image side in pixels")
    sc.add_argument("--scheduler", default=AUTO_SAMPLER, help=SAMPLER_HELP)
    sc.add_argument("--device", default="", help="default: cuda when available, else cpu")
    sc.add_argument("--save-images", default="", help="folder for the images (scale_<s>/p<i>_s<seed>_0.png)")
    sc.add_argument("--out", default="", help="JSON report (default: <adapter>.score.json beside the first --lora "
                    "or --embedding)")
    add_overwrite_flag(sc, "the report and earlier scale_<s> image folders")
    sc.set_defaults(fn=_cmd_score)

    pt = sub.add_parser("pretrain-tiny", help="train the tiny SD pipeline from scratch on the synthetic shapes world")
    pt.add_argument("--out", required=True, help="new folder for the diffusers pipeline")
    pt.add_argument("--run-dir", default="", help="run folders of the phases (default: OUT.run)")
    pt.add_argument("--resume", help="'latest': continue a stopped pretraining from its checkpoints")
    pt.add_argument("--seed", type=int, help="default 0; everything follows from it")
    pt.add_argument("--size", type=int, help="image side in pixels (default 64)")
    pt.add_argument("--images", type=int, help="synthetic training images (default 8192)")
    pt.add_argument("--steps-vae", type=int, help="VAE steps (default 600)")
    pt.add_argument("--steps-decoder", type=int, help="VAE decoder steps on every concept's images (default 300)")
    pt.add_argument("--steps-unet", type=int, help="UNet + text encoder steps (default 6500)")
    pt.add_argument("--steps-offset", type=int, help="UNet + text encoder steps continued with offset noise (default "
                    "2000; 0 = none)")
    pt.add_argument("--batch-size", type=int, help="default 32")
    pt.set_defaults(fn=_cmd_pretrain_tiny)


def _add_data_parsers(sub) -> None:
    """The data-set subcommands: check-dataset and caption."""
    d = sub.add_parser("check-dataset", help="count images and captions, list problems")
    d.add_argument("dir")
    d.add_argument("--caption-extension", default=".txt")
    d.add_argument("--no-captions-needed", action="store_true", help="the caption template has no {caption}")
    d.add_argument("--json", action="store_true", help="the report as JSON, with every image (file, caption, size, "
                   "bucket, mask) and the unreadable ones with their reason")
    d.add_argument("--resolution", type=int, default=0, help="with --json: each image's aspect bucket at this "
                   "data.resolution (data.buckets)")
    d.add_argument("--bucket-step", type=int, default=64, help="data.bucket_step of those buckets")
    d.set_defaults(fn=_cmd_check_dataset)

    cp = sub.add_parser("caption", help="caption a data folder's images with a local BLIP captioning model")
    cp.add_argument("dir", help="the data folder (its images get <image>.txt captions)")
    cp.add_argument("--model", required=True, help="a local folder holding a BLIP captioning model "
                    "(transformers' BlipForConditionalGeneration, .safetensors weights); nothing is downloaded")
    keep = cp.add_mutually_exclusive_group()
    keep.add_argument("--missing-only", action="store_true", help="caption only the images without a caption")
    keep.add_argument("--overwrite", action="store_true", help="caption every image; the old captions are moved "
                      "aside as NAME.old-<time> (without either flag a folder with captions is refused)")
    cp.add_argument("--prefix", default="", help="a trigger word put first in every caption ('WORD, caption')")
    cp.add_argument("--caption-extension", default=".txt")
    cp.add_argument("--max-tokens", type=int, default=30, help="the longest caption, in tokens")
    cp.add_argument("--device", default="", help="default: cuda when available, else cpu")
    cp.set_defaults(fn=_cmd_caption)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-sd", description="Stable Diffusion LoRA: train, generate, convert, inspect.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)

    add_train_parser(sub, "train a LoRA from a TOML config (works under accelerate launch)",
                     "lora_sd.config:SDTrainConfig", "configs/sd_*.toml", _cmd_train)
    tm = add_tiny_model_parser(sub, "write a tiny SD pipeline with RANDOM weights (offline tests/demos)", _cmd_tiny_model)
    tm.add_argument("--arch", choices=ARCHS, default="sd1",
                    help="sd1, sd2 (v-prediction), sdxl (two text encoders), sd3 (SD 3.5 MMDiT) or flux (FLUX.1 dev)")

    g = sub.add_parser("generate", help="generate images, optionally with LoRA adapters")
    g.add_argument("--model", default="tiny", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    g.add_argument("--model-config", default="", help="configs folder/hub id for a single-file checkpoint")
    g.add_argument("--prompt", action="append", help="repeatable; one image per prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="kohya or diffusers file (repeatable)")
    g.add_argument("--embedding", action="append", metavar="FILE", help="textual-inversion file for its word "
                   "(repeatable); an adapter's own <name>_emb.safetensors ([embedding] training) loads with it")
    _add_embedding_choice(g)
    g.add_argument("--fuse", action="store_true", help="merge the adapters into the base weights")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--scheduler", default=AUTO_SAMPLER, help=SAMPLER_HELP)
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--device", default="", help="default: cuda when available, else cpu")
    g.add_argument("--out", default="outputs", help="folder for image_<i>.png")
    add_overwrite_flag(g, "earlier image_<i>.png files there")
    g.set_defaults(fn=_cmd_generate)

    mg = sub.add_parser("merge", help="fold adapters into the base model and save it as a diffusers folder")
    mg.add_argument("--model", default="tiny", help="hub id, diffusers folder, .safetensors file, or 'tiny'")
    mg.add_argument("--model-config", default="", help="configs folder/hub id for a single-file checkpoint")
    mg.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]", help="repeatable")
    mg.add_argument("--out", required=True, help="new folder for the merged pipeline")
    _add_embedding_choice(mg)
    add_overwrite_flag(mg, "the --out folder")
    mg.set_defaults(fn=_cmd_merge)

    sf = sub.add_parser("save-single-file", help="write a model as one .safetensors file in the original "
                        "(LDM / SGM) layout that AUTOMATIC1111 and ComfyUI load")
    sf.add_argument("model", help="hub id, diffusers folder, single-file checkpoint, or 'tiny'")
    sf.add_argument("out", help="the new .safetensors file")
    sf.add_argument("--model-config", default="", help="configs folder/hub id for a single-file checkpoint")
    sf.add_argument("--half", action="store_true", help="store the weights as float16")
    add_overwrite_flag(sf, "the output file")
    sf.set_defaults(fn=_cmd_save_single_file)

    c = sub.add_parser("convert", help="convert between kohya and diffusers LoRA files (refuses inf/NaN tensors)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    c.add_argument("--dtype", default="keep", choices=["keep", "fp32", "fp16", "bf16"])
    add_overwrite_flag(c, "the output file")
    c.set_defaults(fn=_cmd_convert)

    add_inspect_parser(sub, "rank, alpha, targets, metadata and size of a LoRA file", _cmd_inspect, "lora-sd",
                       "lora_sd.cli_decide:inspect_base")

    _add_data_parsers(sub)
    _add_score_parsers(sub)
    add_commands(sub)   # grid, sweep, check
    add_debug_flag(p, sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"lora-sd {args.command}", lambda: args.fn(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
