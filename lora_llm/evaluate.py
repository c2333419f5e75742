"""Evaluation: sliding-window perplexity, classification metrics, text generation, and the evaluation of
a job's eval split (evaluate_job: after training, `lora-llm eval`, eval-suite, the MindSpore backend)."""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lora_core.model import lora_disabled

from . import data as D
from .config import LLMTrainConfig
from .metrics import BASELINE_LABEL, BASELINE_LABEL_LM, classification_metrics
from .models import max_positions


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, ids: Sequence[int], max_length: int = 1024, stride: int = 512,
               progress: bool = False) -> dict:
    """Perplexity of a token stream by the sliding-window protocol (Hugging Face's documented one):
    windows of `max_length` tokens start every `stride` tokens; in each window only the tokens not
    scored by the previous window are scored, so no token is counted twice and, for stride <
    max_length, every token but the first is predicted exactly once with at least
    max_length - stride tokens of context (stride == max_length: disjoint windows, whose first
    tokens have no context and are not scored).
    Returns {"perplexity", "nll", "tokens", "windows", "max_length", "stride"}."""
    pos = max_positions(model)
    if pos:
        max_length = min(max_length, pos)
    stride = min(stride, max_length)
    was_training = model.training
    model.eval()
    device = _device(model)
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    n = len(ids_t)
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll, count, windows, scored_to = 0.0, 0, 0, 1  # token 0 has no context: never scored
    begins = list(range(0, n - 1, stride))
    for begin in tqdm(begins, desc="perplexity", disable=not progress):
        end = min(begin + max_length, n)
        window = ids_t[begin:end].to(device).unsqueeze(0)
        logits = model(input_ids=window).logits.float()[0, :-1]        # predicts positions begin+1..end-1
        targets = window[0, 1:]
        first = max(scored_to, begin + 1) - (begin + 1)                 # skip already-scored targets
        lp = torch.log_softmax(logits[first:], dim=-1).gather(1, targets[first:, None])
        nll -= lp.sum().item()
        count += len(lp)
        scored_to = end
        windows += 1
        if end == n:
            break
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows,
            "max_length": max_length, "stride": stride}


@torch.no_grad()
def predict(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
            progress: bool = False) -> np.ndarray:
    """Predicted class per token sequence; batches of similar length (dynamic padding)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    preds = np.zeros(len(seqs), dtype=np.int64)
    for i in tqdm(range(0, len(seqs), batch_size), desc="predict", disable=not progress):
        idx = order[i:i + batch_size]
        ids, mask = D.pad_batch([seqs[j] for j in idx], pad_id)
        logits = model(input_ids=torch.from_numpy(ids).to(device),
                       attention_mask=torch.from_numpy(mask).to(device)).logits
        preds[idx] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    return preds


def evaluate_classifier(model, seqs, labels, num_labels: int, pad_id: int, batch_size: int = 16,
                        progress: bool = False) -> dict:
    preds = predict(model, seqs, pad_id, batch_size, progress)
    return classification_metrics(labels, preds, num_labels)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Continue each prompt: greedy, or sampling with temperature / top-k / top-p. Uses its own seed
    inside a forked RNG, so calling it during training leaves the training RNG untouched."""
    was_training = model.training
    model.eval()
    device = _device(model)
    outs = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
            if do_sample:
                kw.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            else:
                kw.update(temperature=None, top_k=None, top_p=None)
            out = model.generate(**enc, **kw)
            outs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return outs


def evaluate_job(cfg: LLMTrainConfig, model, tokenizer, progress: bool = True, baseline: bool = False) -> dict:
    """Metrics of the task's eval split: perplexity (+ generations) for LM, accuracy/F1/MCC otherwise.
    baseline=True also scores the base model with adapters switched off, which for a classifier
    runs its original, untrained head (not the adapter's trained copy): out["baseline"] holds the
    label, the metrics and, for classification, the majority-class rate beside them."""
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
