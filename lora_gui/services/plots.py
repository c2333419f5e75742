"""Plotting: the loss curve of a run and the evaluation suite's accuracy chart (matplotlib, Agg)."""
from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure

from ..runview import RunSnapshot
from .evals import SEED_NUMBERS


matplotlib.use("Agg")   # figures are drawn off-screen, into the page


def _figure():
    fig = Figure(figsize=(6, 3), dpi=90)
    return fig, fig.add_subplot()


def loss_figure(snap: RunSnapshot):
    """A matplotlib figure of the loss per step (None when there is no metric yet)."""
    if not snap.steps:
        return None
    fig, ax = _figure()
    ax.plot(snap.steps, snap.losses, lw=1.2, color="#2563eb", label="loss")
    if len(snap.losses) >= 10:
        k = max(2, len(snap.losses) // 20)
        smooth = [sum(snap.losses[max(0, i - k + 1):i + 1]) / len(snap.losses[max(0, i - k + 1):i + 1])
                  for i in range(len(snap.losses))]
        ax.plot(snap.steps, smooth, lw=2, color="#dc2626", label=f"mean of {k}")
    if snap.val_steps:   # the held-out validation loss beside the training loss, the best step marked
        ax.plot(snap.val_steps, snap.val_losses, "o-", lw=1.5, color="#16a34a", label="validation loss")
        if snap.best_val_step in snap.val_steps:
            best = snap.val_losses[snap.val_steps.index(snap.best_val_step)]
            ax.plot([snap.best_val_step], [best], "*", ms=12, color="#f59e0b", label=f"best (step {snap.best_val_step})")
    if len(snap.losses) >= 10 or snap.val_steps:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{snap.path.name}: training loss", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def eval_figure(rows: list[list]):
    """Bar chart: this run's accuracy per task next to the seed project's number."""
    acc = [(r[0], r[2]) for r in rows if r[1] == "accuracy"]
    if not acc:
        return None
    fig, ax = _figure()
    xs = range(len(acc))
    ax.bar([x - 0.2 for x in xs], [v for _, v in acc], width=0.4, label="this run", color="#2563eb")
    ax.bar([x + 0.2 for x in xs], [SEED_NUMBERS.get(t, 0) for t, _ in acc], width=0.4, label="seed", color="#9ca3af")
    ax.set_xticks(list(xs), [t for t, _ in acc])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(curves: list[tuple[str, list, list]], ylabel: str, title: str, marker: str = ""):
    """Several runs' curves overlaid: [(run, steps, values)] (None when none has a point)."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = _figure()
    for name, xs, ys in curves:
        ax.plot(xs, ys, lw=1.2, marker=marker or None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
