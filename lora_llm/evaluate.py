"""Evaluation: sliding-window perplexity, classification metrics, and text generation."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .data import pad_batch
from .metrics import classification_metrics


def _device(model) -> torch.device:
    return next(model.parameters()).device


def max_positions(model) -> Optional[int]:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


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
    from tqdm.auto import tqdm
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
    from tqdm.auto import tqdm
    for i in tqdm(range(0, len(seqs), batch_size), desc="predict", disable=not progress):
        idx = order[i:i + batch_size]
        ids, mask = pad_batch([seqs[j] for j in idx], pad_id)
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
