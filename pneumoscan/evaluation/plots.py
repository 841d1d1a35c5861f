"""PNG plots of a training run: learning curves, ROC, confusion matrix, calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pneumoscan.evaluation.metrics import (
    confusion,
    expected_calibration_error,
    roc_auc,
    roc_curve,
)


def subplots(*grid: int, figsize: tuple[float, float]):
    """(figure, axes) drawn without pyplot: no backend chosen for the whole process, no
    global list of open figures (`savefig` renders PNG with Agg by itself)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def plot_learning_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        ax2.plot(epochs, [h[key] for h in history], "o-", label=f"val {key}")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0.5, 1.0)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_roc(labels: np.ndarray, probs: np.ndarray, threshold: float, path: Path) -> None:
    fpr, tpr, _ = roc_curve(labels, probs)
    c = confusion(labels, probs, threshold)
    fig, ax = subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc(labels, probs):.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot(c["fp"] / max(1, c["fp"] + c["tn"]), c["tp"] / max(1, c["tp"] + c["fn"]), "ro",
            label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(labels: np.ndarray, probs: np.ndarray, threshold: float, path: Path,
                   class_names=("NORMAL", "PNEUMONIA")) -> None:
    c = confusion(labels, probs, threshold)
    matrix = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black", fontsize=14)
    ax.set_xticks([0, 1], class_names)
    ax.set_yticks([0, 1], class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_calibration(labels: np.ndarray, curves: dict[str, np.ndarray], path: Path,
                     bins: int = 10) -> None:
    """Reliability diagram: one line per named set of probabilities, ECE in the legend."""
    edges = np.linspace(0, 1, bins + 1)
    fig, ax = subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for name, probs in curves.items():
        which = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ece = expected_calibration_error(labels, probs, bins)
        ax.plot([probs[which == b].mean() for b in filled],
                [labels[which == b].mean() for b in filled], "o-",
                label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("mean predicted probability of pneumonia")
    ax.set_ylabel("fraction with pneumonia")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_plots(history: list[dict], labels: np.ndarray, probs: np.ndarray, threshold: float,
                out: Path, uncalibrated: np.ndarray | None = None) -> None:
    """`probs` as the model gives them; `uncalibrated`, when given, before temperature
    scaling, drawn beside them in the reliability diagram."""
    plot_learning_curves(history, out / "learning_curves.png")
    plot_roc(labels, probs, threshold, out / "roc.png")
    plot_confusion(labels, probs, threshold, out / "confusion.png")
    curves = {"model": probs} if uncalibrated is None \
        else {"before scaling": uncalibrated, "temperature-scaled": probs}
    plot_calibration(labels, curves, out / "calibration.png")
