"""`lora-llm train`: LoRA fine-tuning of a causal LM (WikiText-2) or of a last-token classifier
(SST-2, CoLA, IMDB, AG-News), on lora_core's training loop and run folder."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from lora_core.files import atomic_write_json, atomic_write_text
from lora_core.model import add_lora
from lora_core.run import RunDir, run_job
from lora_core.training import EpochSampler, train

from . import data as D
from .adapters import ADAPTER_FILE, read_adapter_info, load_adapter, save_adapter
from .config import LLMTrainConfig, ModelSection
from .evaluate import evaluate_classifier, generate, perplexity
from .models import count_parameters, load_model, load_tokenizer, loss_function, resolve_lora
from .prefix_cache import wrap_for_training

log = logging.getLogger("lora.llm")


# ------------------------------------------------------------------------------ data
class Collator:
    """Dynamic padding: right-pads each batch to its longest sequence. LM batches get labels =
    input_ids with -100 on padding; classification batches get the class labels."""

    def __init__(self, pad_id: int, lm: bool):
        self.pad_id, self.lm = pad_id, lm

    def __call__(self, items: list[dict]) -> dict:
        ids, mask = D.pad_batch([it["input_ids"] for it in items], self.pad_id)
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.lm:
            labels = ids_t.masked_fill(mask_t == 0, -100)
        else:
            labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return {"input_ids": ids_t, "attention_mask": mask_t, "labels": labels}


def train_items(cfg: LLMTrainConfig, tokenizer) -> list[dict]:
    """The tokenized training set: {"input_ids": [...], "label": int} (label absent for LM)."""
    d = cfg.data
    info = D.task_info(d.task)
    split = d.train_split or info.train_split
    if d.is_lm:
        text = D.load_text(d.task, split, d.data_dir, d.train_file, d.detokenize)
        blocks = D.lm_blocks(D.tokenize_text(text, tokenizer), d.block_size, d.max_train_examples)
        return [{"input_ids": b} for b in blocks]
    ex = D.load_examples(d.task, split, d.data_dir, d.train_file, d.max_train_examples)
    ids, labels = D.tokenize_examples(ex, tokenizer, d.max_length, d.truncation)
    return [{"input_ids": i, "label": y} for i, y in zip(ids, labels)]


# ------------------------------------------------------------------------------ model
def build_model(cfg: LLMTrainConfig, tokenizer, with_lora: bool = True):
    """(model, resolved LoraConfig): the base model of the task with the adapter added."""
    n = 0 if cfg.data.is_lm else D.num_labels(cfg.data.task)
    model = load_model(cfg.model, n, tokenizer.pad_token_id)
    lcfg = resolve_lora(cfg.lora, model, classification=n > 0)
    if with_lora:
        add_lora(model, lcfg)
    return model, lcfg


def adapter_info(cfg: LLMTrainConfig, **extra) -> dict:
    return {"task": cfg.data.task, "num_labels": 0 if cfg.data.is_lm else D.num_labels(cfg.data.task),
            "model": asdict(cfg.model), "pretrained": cfg.model.pretrained, **extra}


def load_trained(path: str | Path, device: str = "cpu", model_section: Optional[ModelSection] = None):
    """(model with adapter, tokenizer, info) from a run folder or adapter.safetensors.
    model_section overrides where the base model is found (e.g. another machine's path)."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    info = read_adapter_info(file)
    ms = model_section or ModelSection(**info["model"])
    tokenizer = load_tokenizer(ms)
    with torch.random.fork_rng(devices=[]):   # a reproducible untrained head (the --baseline one)
        torch.manual_seed(0)
        model = load_model(ms, info.get("num_labels", 0), tokenizer.pad_token_id)
    load_adapter(file, model)
    return model.to(device).eval(), tokenizer, info


# ------------------------------------------------------------------------------ evaluation
BASELINE_LABEL = "base model + untrained head"   # classification: the original head, no LoRA
BASELINE_LABEL_LM = "base model, no LoRA"


def evaluate_job(cfg: LLMTrainConfig, model, tokenizer, progress: bool = True, baseline: bool = False) -> dict:
    """Metrics of the task's eval split: perplexity (+ generations) for LM, accuracy/F1/MCC otherwise.
    baseline=True also scores the base model with adapters switched off, which for a classifier
    runs its original, untrained head (not the adapter's trained copy): out["baseline"] holds the
    label, the metrics and, for classification, the majority-class rate beside them."""
    from lora_core.model import lora_disabled
    d, e = cfg.data, cfg.eval
    info = D.task_info(d.task)
    split = d.eval_split or info.eval_split
    out: dict = {"task": d.task, "split": split}
    t0 = time.time()
    if d.is_lm:
        text = D.load_text(d.task, split, d.data_dir, d.eval_file, d.detokenize)
        ids = D.tokenize_text(text, tokenizer)
        out["subset"] = bool(e.max_eval_tokens) and e.max_eval_tokens < len(ids)
        if e.max_eval_tokens:
            ids = ids[:e.max_eval_tokens]
        out["tokenizer"] = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        out.update(perplexity(model, ids, e.ppl_max_length, e.ppl_stride, progress))
        if baseline:
            with lora_disabled(model):
                ppl = perplexity(model, ids, e.ppl_max_length, e.ppl_stride, progress)["perplexity"]
            out["baseline_perplexity"] = ppl
            out["baseline"] = {"label": BASELINE_LABEL_LM, "perplexity": ppl}
        if e.prompts:
            out["generations"] = [{"prompt": p, "text": t} for p, t in zip(e.prompts, generate(
                model, tokenizer, e.prompts, e.max_new_tokens, e.do_sample, e.temperature, e.top_k, e.top_p, e.seed))]
    else:
        everything = D.load_examples(d.task, split, d.data_dir, d.eval_file)
        ex = D.subset(everything, d.max_eval_examples)
        out["subset"] = len(ex) < len(everything)
        seqs, labels = D.tokenize_examples(ex, tokenizer, d.max_length, d.truncation)
        n = D.num_labels(d.task)
        out.update(evaluate_classifier(model, seqs, labels, n, tokenizer.pad_token_id, e.batch_size, progress))
        out["n_examples"] = len(seqs)
        if baseline:
            with lora_disabled(model):
                b = evaluate_classifier(model, seqs, labels, n, tokenizer.pad_token_id, e.batch_size, progress)
            out["baseline_accuracy"] = b["accuracy"]
            out["baseline"] = {"label": BASELINE_LABEL, **{k: b[k] for k in ("accuracy", "macro_f1", "mcc")},
                               "majority_accuracy": b["majority_accuracy"]}
    out["eval_seconds"] = time.time() - t0
    return out


# ------------------------------------------------------------------------------ the job
def _accelerator(cfg: LLMTrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    # Accelerate keeps one process-wide state and refuses another mixed precision in the same
    # process (several jobs in one Python: eval-suite, tests); the distributed state is kept
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.gradient_accumulation_steps)


def train_from_config(cfg: LLMTrainConfig, run_dir: Optional[str | Path] = None,
                      resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train (and evaluate) one job; everything lands in the run folder. Returns the final status
    dict (with "eval" when evaluation ran). The folder rules are lora_core.run.run_job's."""
    if cfg.backend == "mindspore":
        from lora_llm.mindspore import train_from_config as ms_train  # the MindSpore backend, imported lazily
        return ms_train(cfg, run_dir, resume, overwrite=overwrite)
    accelerator = _accelerator(cfg)

    def body(run: RunDir, _) -> dict:
        return _train_torch(cfg, run, accelerator, resume)

    return run_job("llm-train", run_dir or cfg.run_dir, body, config=cfg, resume=resume, overwrite=overwrite,
                   main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)


def _train_torch(cfg: LLMTrainConfig, run: RunDir, accelerator, resume: Optional[str]) -> dict:
    from accelerate.utils import set_seed
    t_start = time.time()
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model, lcfg = build_model(cfg, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    log.info("task %s, model %s: %d trainable of %d parameters (%.3f%%), LoRA targets %s",
             cfg.data.task, cfg.model.pretrained, trainable, total, 100 * trainable / total, lcfg.target_modules)
    items = train_items(cfg, tokenizer)
    log.info("%d training %s", len(items), "blocks" if cfg.data.is_lm else "examples")
    s = cfg.train
    dl = torch.utils.data.DataLoader(items, batch_size=s.batch_size, sampler=EpochSampler(len(items), s.seed),
                                     collate_fn=Collator(tokenizer.pad_token_id, cfg.data.is_lm),
                                     num_workers=s.num_workers, drop_last=len(items) >= s.batch_size)

    loss_fn = loss_function(cfg, items)
    model = wrap_for_training(cfg, model, lcfg, items, accelerator)   # frozen-prefix cache (lora.layers = "top:k")

    base_model_name = cfg.model.pretrained

    def export_fn(folder: Path, step: int):
        save_adapter(folder, accelerator.unwrap_model(model), adapter_info(cfg, steps=step), base_model_name)

    sample_fn = None
    if cfg.data.is_lm and cfg.eval.prompts:
        def sample_fn(step: int):
            e = cfg.eval
            texts = generate(accelerator.unwrap_model(model), tokenizer, e.prompts, e.max_new_tokens, e.do_sample,
                             e.temperature, e.top_k, e.top_p, e.seed)
            atomic_write_text(run.samples / f"step_{step:06d}.txt",
                              "".join(f"### {p}\n{p}{t}\n\n" for p, t in zip(e.prompts, texts)))

    def finish_fn(step: int) -> dict:
        if not cfg.eval.enabled:
            return {}
        result = evaluate_job(cfg, accelerator.unwrap_model(model), tokenizer, baseline=cfg.eval.baseline)
        result.update(trainable_params=trainable, steps=step, train_seconds=time.time() - t_loop,
                      setup_seconds=t_loop - t_start)
        atomic_write_json(run.path / "eval.json", result)
        log.info("evaluation: %s", {k: v for k, v in result.items() if k != "generations"})
        return {"eval": {k: v for k, v in result.items() if k != "generations"}}

    t_loop = time.time()
    return train(accelerator=accelerator, run=run, model=model, dataloader=dl, loss_fn=loss_fn,
                 settings=s, resume=resume, export_fn=export_fn, sample_fn=sample_fn, finish_fn=finish_fn)
