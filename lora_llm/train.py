"""`lora-llm train`: LoRA fine-tuning of a causal LM (WikiText-2) or of a last-token classifier
(SST-2, CoLA, IMDB, AG-News), on lora_core's training loop and run folder. train_from_config is the
entry of every job kind that trains (train, eval-suite, check, sweep); backend = "mindspore" hands the
job to lora_llm.mindspore.train."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from lora_core.files import atomic_write_json, atomic_write_text
from lora_core.errors import MissingPackageError
from lora_core.model import add_lora, refuse_non_finite_base
from lora_core.run import RunDir, run_job
from lora_core.training import EpochSampler, train

from . import data as D
from .adapter_io import adapter_info, save_adapter
from .config import LLMTrainConfig
from .errors import MINDSPORE_MISSING
from .evaluate import evaluate_job, generate
from .models import count_parameters, load_model, load_tokenizer, loss_function, resolve_lora
from .prefix_cache import wrap_for_training
from .resume_rules import LLM_RESUME

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


# ------------------------------------------------------------------------------ model
def build_model(cfg: LLMTrainConfig, tokenizer):
    """(model, resolved LoraConfig): the base model of the task with the adapter added."""
    n = 0 if cfg.data.is_lm else D.num_labels(cfg.data.task)
    model = load_model(cfg.model, n, tokenizer.pad_token_id)
    refuse_non_finite_base({"model": model}, cfg.model.pretrained)
    lcfg = resolve_lora(cfg.lora, model, classification=n > 0)
    add_lora(model, lcfg, strict="lora")
    return model, lcfg


# ------------------------------------------------------------------------------ the job
def make_accelerator(cfg: LLMTrainConfig) -> Accelerator:
    """The Accelerator of a job (its mixed precision and gradient accumulation)."""
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
        try:
            from .mindspore.train import train_from_config as ms_train   # lazy: mindspore is an optional extra
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "mindspore":
                raise
            raise MissingPackageError(MINDSPORE_MISSING) from None
        return ms_train(cfg, run_dir, resume, overwrite=overwrite)
    accelerator = make_accelerator(cfg)

    def body(run: RunDir, _) -> dict:
        return _train_torch(cfg, run, accelerator, resume)

    return run_job("llm-train", run_dir or cfg.run_dir, body, config=cfg, resume=resume, overwrite=overwrite,
                   resume_rules=LLM_RESUME, main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                   data_files=lambda _: D.data_files(cfg))


def _train_torch(cfg: LLMTrainConfig, run: RunDir, accelerator, resume: Optional[str]) -> dict:
    t_start = time.time()
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model, lcfg = build_model(cfg, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = count_parameters(model)
    log.info("task %s, model %s: %d trainable of %d parameters (%.3f%%), LoRA targets %s",
             cfg.data.task, cfg.model.pretrained, trainable, total, 100 * trainable / total, lcfg.target_modules)
    items = D.train_items(cfg, tokenizer)
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
