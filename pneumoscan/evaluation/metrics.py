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


def _ratio(a: float, b: float) -> float:
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


def resampled_intervals(statistic, labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95,
                        groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence interval of every figure `statistic(labels, scores)`
    returns (a dict). With `groups` (e.g. patient ids), whole groups are resampled: images of
    one patient are not independent, and resampling them one by one narrows the interval."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(labels))]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for name, value in statistic(labels[idx], scores[idx]).items():
            draws.setdefault(name, []).append(value)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {name: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi)))
            for name, v in draws.items()}


def bootstrap_intervals(labels: np.ndarray, scores: np.ndarray, threshold: float,
                        n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                        groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence interval of every metric in `binary_metrics`."""
    return resampled_intervals(lambda y, s: binary_metrics(y, s, threshold), labels, scores,
                               n_boot, seed, level, groups)


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


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE of the pneumonia probability: over equal-width probability bins, the
    image-weighted mean gap between the mean probability and the fraction with pneumonia."""
    labels, probs = np.asarray(labels, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    which = np.clip((probs * bins).astype(int), 0, bins - 1)
    gaps = [abs(probs[which == b].mean() - labels[which == b].mean()) * (which == b).sum()
            for b in range(bins) if (which == b).any()]
    return float(sum(gaps) / len(labels))


def _logistic_fit(x: np.ndarray, y: np.ndarray, slope: bool,
                  iterations: int = 50) -> tuple[float, float]:
    """Maximum-likelihood (intercept, slope) of P(y=1) = sigmoid(a + b x) by Newton's
    method; with `slope` False, b is fixed at 1 (x is an offset). NaNs when the fit has no
    finite optimum (one class only, or perfectly separated)."""
    design = np.stack([np.ones_like(x), x], axis=1) if slope else np.ones((len(x), 1))
    offset = np.zeros_like(x) if slope else x
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = np.exp(-np.logaddexp(0, -(design @ beta + offset)))  # sigmoid, no overflow
        gradient = design.T @ (y - p)
        hessian = (design * (p * (1 - p))[:, None]).T @ design
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return float("nan"), float("nan")
        beta += step
        if not np.all(np.isfinite(beta)) or np.abs(beta).max() > 1e6:
            return float("nan"), float("nan")
        if np.abs(step).max() < 1e-10:
            break
    else:
        return float("nan"), float("nan")
    return float(beta[0]), float(beta[1]) if slope else 1.0


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, float]:
    """How far the probabilities are from risks, as the reporting literature asks
    (Van Calster et al. 2019, "Calibration: the Achilles heel of predictive analytics"):
    the calibration slope (logistic regression of the outcome on the probability's logit;
    1 is ideal, below 1 means too extreme), the calibration intercept or
    calibration-in-the-large (the same regression with the slope fixed at 1; 0 is ideal,
    above 0 means risks underestimated), the Brier score and the ECE (`bins` equal-width
    bins). Probabilities of exactly 0 or 1 (float32 saturates) are taken as 1e-7 from them."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    logits = np.log(clipped / (1 - clipped))
    _, slope = _logistic_fit(logits, labels, slope=True)
    intercept, _ = _logistic_fit(logits, labels, slope=False)
    return {"calibration_slope": slope, "calibration_intercept": intercept,
            "brier": float(((probs - labels) ** 2).mean()),
            "ece": expected_calibration_error(labels, probs, bins)}


def calibration_intervals(labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000,
                          seed: int = 0, level: float = 0.95,
                          groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence interval of every figure in `calibration_metrics`."""
    return resampled_intervals(calibration_metrics, labels, probs, n_boot, seed, level, groups)


def cross_fitted_operating_point(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray,
                                 min_sensitivity: float, repeats: int = 50,
                                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Sensitivity, specificity and accuracy when the threshold rule is judged on images it
    was not fitted on: the groups (patients) are cut in two halves at random, each half is
    classified at the threshold `choose_threshold` picks on the other, `repeats` times. The
    threshold picked and judged on the same images flatters the figures it was picked for
    (sensitivity sits on its floor by construction). Returns each figure's mean over the
    repeats and its 2.5-97.5 percentiles (the spread from the cut alone, not a CI)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    figures: dict[str, list[float]] = {}
    for _ in range(repeats):
        half = (rng.permutation(inverse.max() + 1) % 2)[inverse].astype(bool)
        predicted = np.empty(len(labels), dtype=bool)
        for fit, judge in ((half, ~half), (~half, half)):
            threshold = choose_threshold(labels[fit], probs[fit], min_sensitivity)
            predicted[judge] = probs[judge] >= threshold
        # `predicted` as scores: at threshold 0.5 they are the decisions themselves.
        metrics = binary_metrics(labels, predicted.astype(np.float64), 0.5)
        for name in ("sensitivity", "specificity", "accuracy"):
            figures.setdefault(name, []).append(metrics[name])
    return {name: {"mean": float(np.mean(v)), "p2.5": float(np.percentile(v, 2.5)),
                   "p97.5": float(np.percentile(v, 97.5))} for name, v in figures.items()}
