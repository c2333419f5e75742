"""Classification metrics in numpy (shared by both backends): accuracy, macro-F1, Matthews correlation,
and the labels of the baseline rows (torch-free: the eval-suite table uses them)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

BASELINE_LABEL = "base model + untrained head"   # classification: the original head, no LoRA
BASELINE_LABEL_LM = "base model, no LoRA"


def confusion(labels: Sequence[int], preds: Sequence[int], n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return m


def accuracy(labels, preds) -> float:
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float((labels == preds).mean()) if len(labels) else 0.0


def macro_f1(labels, preds, n: int) -> float:
    """Mean over classes of F1 (a class never predicted nor present counts 0, as scikit-learn)."""
    c = confusion(labels, preds, n)
    tp = np.diag(c).astype(float)
    denom = c.sum(0) + c.sum(1)
    f1 = np.divide(2 * tp, denom, out=np.zeros(n), where=denom > 0)
    return float(f1.mean())


def matthews(labels, preds, n: int) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; 0 when undefined)."""
    c = confusion(labels, preds, n).astype(float)
    t, p = c.sum(1), c.sum(0)
    s, correct = c.sum(), np.trace(c)
    num = correct * s - t @ p
    den = np.sqrt(s * s - p @ p) * np.sqrt(s * s - t @ t)
    return float(num / den) if den > 0 else 0.0


def classification_metrics(labels, preds, n: int) -> dict:
    return {"accuracy": accuracy(labels, preds), "macro_f1": macro_f1(labels, preds, n),
            "mcc": matthews(labels, preds, n), "n": int(len(labels)),
            "majority_accuracy": float(np.bincount(np.asarray(labels, dtype=np.int64), minlength=n).max()
                                       / max(len(labels), 1))}
