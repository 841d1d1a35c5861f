"""Binary classification metrics (positive class = pneumonia), numpy only."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False positive rates, true positive rates and the thresholds (score >= t is positive)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(scores)[::-1]
    tpr = np.array([(scores[labels] >= t).mean() for t in thresholds])
    fpr = np.array([(scores[~labels] >= t).mean() for t in thresholds])
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    return {"tp": int((predicted & labels).sum()), "fn": int((~predicted & labels).sum()),
            "tn": int((~predicted & ~labels).sum()), "fp": int((predicted & ~labels).sum())}


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    c = confusion(labels, scores, threshold)
    sensitivity = _ratio(c["tp"], c["tp"] + c["fn"])
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], sum(c.values())),
        "sensitivity": sensitivity,
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
        "auc": roc_auc(labels, scores),
    }


def bootstrap_intervals(labels: np.ndarray, scores: np.ndarray, threshold: float,
                        n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence interval of every metric in `binary_metrics`."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        for name, value in binary_metrics(labels[idx], scores[idx], threshold).items():
            draws.setdefault(name, []).append(value)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {name: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi)))
            for name, v in draws.items()}


def choose_threshold(labels: np.ndarray, scores: np.ndarray, min_sensitivity: float) -> float:
    """The highest threshold whose sensitivity is still >= min_sensitivity: the most
    specific operating point that keeps the wanted sensitivity."""
    labels = np.asarray(labels).astype(bool)
    positives = np.sort(np.asarray(scores, dtype=np.float64)[labels])[::-1]
    if len(positives) == 0:
        return 0.5
    # Keeping the k highest-scoring positives above the threshold gives sensitivity k/n.
    k = int(np.ceil(min_sensitivity * len(positives)))
    return float(positives[max(k, 1) - 1])


def format_validation(metrics: dict) -> str:
    """A model's recorded validation metrics (ModelInfo.validation_metrics) in one line:
    at its threshold, with the 95% intervals where recorded."""
    at = metrics.get("at_threshold") or {}
    if not at:
        return "no validation metrics recorded"
    intervals = metrics.get("ci95") or {}

    def shown(name: str, label: str) -> str:
        low_high = intervals.get(name)
        interval = f" ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else ""
        return f"{label} {at[name]:.3f}{interval}"

    figures = [shown(name, label) for name, label in (
        ("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
        ("accuracy", "accuracy"), ("f1", "F1")) if name in at]
    count = f"{metrics['n_val']} images, " if "n_val" in metrics else ""
    return f"{count}at the model's threshold: " + ", ".join(figures)
