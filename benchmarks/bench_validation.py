"""An exported model on the validation split, judged as honestly as the split allows:
calibration as the literature asks it reported (calibration slope and intercept, Brier score
and ECE with patient-bootstrap 95% CIs), and the operating point with its threshold chosen on
other patients than those it is judged on.

    python benchmarks/bench_validation.py [--model M]

The model's recalibration (Platt scaling of the logit margin, in its metadata) was fitted on
these same validation images, and fitted on them it has slope 1 and intercept 0 by
construction: the figures that say something are the cross-fitted ones, where each half of
the validation patients is recalibrated with what was fitted on the other half (the margin
before recalibration is recovered from the model's calibrated logits: margin = (m - b) T).
`pneumoscan eval` prints the same figures for any labelled set (in-sample here).
The threshold was chosen on these images too (the highest with sensitivity >= 0.95), which
flatters the operating point: the cross-fitted one takes each half of the patients at the
threshold the rule picks on the other half (50 random cuts).

Last, the operating point by series (Kermany numbers the NORMAL patients in two series, `IM`
and `NORMAL2-IM`, and the PNEUMONIA ones as `person`) and, within each, for the earlier and
the later half of its patient numbers: where the errors gather. `--val-split latest` judges
a model trained with that split on its own validation patients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Kermany's patient series by what patient_order makes of their ids.
SERIES = {"": "IM", "NORMAL2-": "NORMAL2-IM", "person": "person"}
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    from bench_robustness_224 import KERMANY224, Scorer

    from pneumoscan.evaluation.datasets import list_samples
    from pneumoscan.evaluation.metrics import (
        binary_metrics,
        bootstrap_intervals,
        calibration_intervals,
        calibration_metrics,
        cross_fitted_operating_point,
    )
    from pneumoscan.inference.model import default_model_path
    from pneumoscan.inference.pipeline import read_model_pixels
    from pneumoscan.evaluation.datasets import VAL_SPLITS, patient_order, split_by_patient
    from training.train import cross_fitted_probabilities

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--val-split", choices=VAL_SPLITS, default="random",
                   help="the validation patients the model was trained with")
    args = p.parse_args(argv)
    scorer = Scorer(args.model or default_model_path())
    calibration = json.loads(scorer.info.extra.get("calibration", "{}"))
    temperature, bias = calibration.get("temperature", 1.0), calibration.get("bias", 0.0)
    _, val = split_by_patient(list_samples(KERMANY224), 0.15, 42, how=args.val_split)
    pixels = np.stack([read_model_pixels(s.path, scorer.info.preprocessing) for s in val])
    labels = np.array([s.label for s in val])
    patients = np.array([s.patient for s in val])
    margins, _ = scorer(pixels)
    raw = (margins - bias) * temperature
    logits = np.stack([np.zeros_like(raw), raw], axis=1)  # margin = logit 1 - logit 0
    sets = {"as shipped (recalibration fitted on these images)": 1 / (1 + np.exp(-margins)),
            "cross-fitted by patient halves": cross_fitted_probabilities(logits, labels,
                                                                         patients, 42)}
    print(f"model {scorer.info.name} {scorer.info.version}; {len(labels)} validation images "
          f"of {len(set(patients))} patients; T {temperature:.4f}, b {bias:+.3f}")
    for name, probs in sets.items():
        figures = calibration_metrics(labels, probs)
        intervals = calibration_intervals(labels, probs, groups=patients)
        print(f"{name}: " + ", ".join(
            f"{key} {value:.4f} [{intervals[key][0]:.4f}, {intervals[key][1]:.4f}]"
            for key, value in figures.items()))
    probs = sets["as shipped (recalibration fitted on these images)"]
    at = binary_metrics(labels, probs, scorer.threshold)
    intervals = bootstrap_intervals(labels, probs, scorer.threshold, groups=patients)
    print(f"at the model's threshold {scorer.threshold:.4f} (patient-bootstrap 95% CIs): " +
          ", ".join(f"{k} {at[k]:.4f} [{intervals[k][0]:.4f}, {intervals[k][1]:.4f}]"
                    for k in ("auc", "sensitivity", "specificity", "accuracy")))
    point = cross_fitted_operating_point(labels, probs, patients, 0.95)
    print("threshold rule cross-fitted by patient halves (mean, 2.5-97.5% over 50 cuts): " +
          ", ".join(f"{k} {v['mean']:.4f} ({v['p2.5']:.4f}-{v['p97.5']:.4f})"
                    for k, v in point.items()))
    print("by series, at the model's threshold (earlier / later half of the patient numbers):")
    order = [patient_order(p) for p in patients]
    for label, name, measure in ((0, "NORMAL", "specificity"), (1, "PNEUMONIA", "sensitivity")):
        for series in sorted({o[0] for o, y in zip(order, labels) if y == label}):
            mine = np.array([o[0] == series and y == label for o, y in zip(order, labels)])
            numbers = np.array([o[1] for o in order])
            cut = np.median(numbers[mine])
            parts = {"all": mine, "earlier": mine & (numbers <= cut),
                     "later": mine & (numbers > cut)}
            print(f"  {name} {SERIES.get(series, series)}: " + "; ".join(
                f"{part} {mask.sum()} images, {measure} "
                f"{np.mean((probs[mask] >= scorer.threshold) == bool(label)):.3f}, "
                f"mean p {probs[mask].mean():.3f}" for part, mask in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
