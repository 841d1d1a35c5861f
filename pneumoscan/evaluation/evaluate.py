"""`pneumoscan eval`: the model's metrics on a labelled dataset, with bootstrap CIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.evaluation.datasets import CLASS_NAMES, list_samples
from pneumoscan.evaluation.metrics import (
    binary_metrics,
    bootstrap_intervals,
    calibration_intervals,
    calibration_metrics,
    confusion,
)
from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, classify
from pneumoscan.inputs.discover import identify_file

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "auc", "f1", "precision")
CALIBRATION_NAMES = {"calibration_slope": "slope", "calibration_intercept": "intercept",
                     "brier": "Brier", "ece": "ECE"}


def evaluate_dataset(data: Path, model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE,
                     workers: int | None = None, threshold: float | None = None,
                     n_boot: int = 1000) -> dict:
    samples = list_samples(Path(data))
    if not samples:
        raise ValueError(f"no labelled images under {data}")
    threshold = model.info.threshold if threshold is None else threshold
    results = list(classify((identify_file(s.path) for s in samples), model,
                            batch_size=batch_size, workers=workers, threshold=threshold))
    ok = [(s, r) for s, r in zip(samples, results) if r.status == "ok"]
    if not ok:
        raise ValueError(f"none of the {len(samples)} images under {data} could be classified")
    labels = np.array([CLASS_NAMES[s.label] == "PNEUMONIA" for s, _ in ok], dtype=np.int64)
    probs = np.array([r.probability for _, r in ok])
    # Resampled by patient: one patient's images are not independent of each other.
    patients = np.array([s.patient for s, _ in ok])
    return {
        "data": str(data),
        "model": {"name": model.info.name, "version": model.info.version,
                  "sha256": model.info.sha256},
        "threshold": threshold,
        "n": len(ok),
        "n_pneumonia": int(labels.sum()),
        "n_normal": int(len(labels) - labels.sum()),
        "not_classified": [{"path": str(r.path), "status": r.status, "reason": r.reason}
                           for r in results if r.status != "ok"],
        "metrics": binary_metrics(labels, probs, threshold),
        "ci95": bootstrap_intervals(labels, probs, threshold, n_boot=n_boot, groups=patients),
        "confusion": confusion(labels, probs, threshold),
        "calibration": calibration_metrics(labels, probs),
        "calibration_ci95": calibration_intervals(labels, probs, n_boot=n_boot,
                                                  groups=patients),
        "n_patients": len(set(patients.tolist())),
        "predictions": [{"path": str(s.path), "label": CLASS_NAMES[s.label],
                         "probability": r.probability} for s, r in ok],
    }


def format_report(report: dict) -> str:
    c = report["confusion"]
    lines = [f"{report['data']}: {report['n']} images ({report['n_pneumonia']} PNEUMONIA, "
             f"{report['n_normal']} NORMAL), threshold {report['threshold']:.4f}",
             f"{'metric':<12} {'value':>7}   95% CI (bootstrap over the "
             f"{report['n_patients']} patients)"]
    for name in METRIC_NAMES:
        lo, hi = report["ci95"][name]
        lines.append(f"{name:<12} {report['metrics'][name]:>7.4f}   [{lo:.4f}, {hi:.4f}]")
    lines.append("calibration of the probability of pneumonia (ideal: slope 1, intercept 0):")
    for name, label in CALIBRATION_NAMES.items():
        lo, hi = report["calibration_ci95"][name]
        lines.append(f"{label:<12} {report['calibration'][name]:>7.4f}   [{lo:.4f}, {hi:.4f}]")
    lines += ["confusion matrix (rows true, columns predicted):",
              f"{'':<10} {'NORMAL':>9} {'PNEUMONIA':>9}",
              f"{'NORMAL':<10} {c['tn']:>9} {c['fp']:>9}",
              f"{'PNEUMONIA':<10} {c['fn']:>9} {c['tp']:>9}"]
    for item in report["not_classified"]:
        lines.append(f"not classified: {item['path']}: {item['status']}: {item['reason']}")
    return "\n".join(lines)


def _labelled_probabilities(report: dict) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([p["label"] == "PNEUMONIA" for p in report["predictions"]])
    return labels, np.array([p["probability"] for p in report["predictions"]])


def write_roc(report: dict, path: Path) -> None:
    from pneumoscan.evaluation.plots import plot_roc

    labels, probs = _labelled_probabilities(report)
    plot_roc(labels, probs, report["threshold"], Path(path))


def write_reliability(report: dict, path: Path) -> None:
    """The reliability diagram (calibration curve, 10 equal-width bins)."""
    from pneumoscan.evaluation.plots import plot_calibration

    labels, probs = _labelled_probabilities(report)
    plot_calibration(labels.astype(np.float64), {report["model"]["name"]: probs}, Path(path))
