"""`pneumoscan eval`'s metrics against scikit-learn's, on the shipped model's real scores.

The metrics are numpy code of our own because `eval` runs in the plain install, where
scikit-learn and SciPy (about 160 MB installed) would be there for some forty lines of
arithmetic; scikit-learn is a test dependency, the reference they are held to here."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE_JPEGS, kermany_label
from sklearn import metrics as sk

from pneumoscan.evaluation.evaluate import evaluate_dataset
from pneumoscan.evaluation.metrics import (
    binary_metrics,
    bootstrap_intervals,
    calibration_intervals,
    calibration_metrics,
    confusion,
    cross_fitted_operating_point,
    expected_calibration_error,
    roc_auc,
    roc_curve,
)
from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.model import default_model_path


@pytest.fixture(scope="module")
def scored(kermany224, tmp_path_factory):
    """(labels, probabilities, threshold) of the shipped model on the 16 Kermany validation
    images, each as its original and at the model's 224 px (listed in a CSV, as `eval` takes
    them)."""
    listing = tmp_path_factory.mktemp("metrics") / "images.csv"
    images = sorted(kermany224.rglob("*.jpeg")) + SAMPLE_JPEGS
    rows = [f"{path},{kermany_label(path)}" for path in images]
    listing.write_text("path,label\n" + "\n".join(rows) + "\n")
    model = OnnxCamModel(default_model_path(), device="cpu")
    report = evaluate_dataset(listing, model, n_boot=100)
    labels = np.array([p["label"] == "PNEUMONIA" for p in report["predictions"]])
    probabilities = np.array([p["probability"] for p in report["predictions"]])
    assert len(labels) == len(rows) and 0 < labels.sum() < len(rows)
    return labels, probabilities, report["threshold"]


def test_auc_and_roc_curve_match_scikit_learn(scored):
    labels, probabilities, _ = scored
    assert roc_auc(labels, probabilities) == pytest.approx(sk.roc_auc_score(labels, probabilities),
                                                         abs=1e-12)
    # Rounded scores tie across classes: ties count half, as in scikit-learn.
    coarse = np.round(probabilities, 1)
    assert roc_auc(labels, coarse) == pytest.approx(sk.roc_auc_score(labels, coarse), abs=1e-12)
    ours = roc_curve(labels, coarse)
    fpr, tpr, thresholds = sk.roc_curve(labels, coarse, drop_intermediate=False)
    np.testing.assert_allclose(ours[0], fpr)
    np.testing.assert_allclose(ours[1], tpr)
    np.testing.assert_allclose(ours[2][1:], thresholds[1:])


def test_metrics_at_the_threshold_match_scikit_learn(scored):
    labels, probabilities, threshold = scored
    predicted = probabilities >= threshold
    ours = binary_metrics(labels, probabilities, threshold)
    tn, fp, fn, tp = sk.confusion_matrix(labels, predicted).ravel()
    assert confusion(labels, probabilities, threshold) == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(labels, predicted))
    assert ours["sensitivity"] == pytest.approx(sk.recall_score(labels, predicted))
    assert ours["specificity"] == pytest.approx(sk.recall_score(~labels, ~predicted))
    assert ours["precision"] == pytest.approx(sk.precision_score(labels, predicted))
    assert ours["f1"] == pytest.approx(sk.f1_score(labels, predicted))


def drawn_outcomes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) where the probabilities are too extreme and too low: the
    outcomes are drawn with log-odds 0.8 + 0.5 x while the model says x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2.5, 2000)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-(0.8 + 0.5 * x)))).astype(np.int64)
    return labels, 1 / (1 + np.exp(-x))


def test_calibration_slope_and_brier_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    labels, probabilities = drawn_outcomes()
    ours = calibration_metrics(labels, probabilities)
    logits = np.log(probabilities / (1 - probabilities))
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(
        logits[:, None], labels)
    assert ours["calibration_slope"] == pytest.approx(reference.coef_[0, 0], abs=1e-5)
    assert ours["calibration_slope"] == pytest.approx(0.5, abs=0.1)  # as the outcomes were drawn
    assert ours["brier"] == pytest.approx(sk.brier_score_loss(labels, probabilities), abs=1e-12)
    assert ours["ece"] == expected_calibration_error(labels, probabilities)


def test_calibration_intercept_is_the_likelihood_optimum_with_slope_one():
    labels, probabilities = drawn_outcomes()
    intercept = calibration_metrics(labels, probabilities)["calibration_intercept"]
    logits = np.log(probabilities / (1 - probabilities))
    # The maximum-likelihood condition of the offset model: predicted and observed events agree.
    fitted = 1 / (1 + np.exp(-(intercept + logits)))
    assert fitted.sum() == pytest.approx(labels.sum(), abs=1e-6)
    assert intercept > 0.3  # risks were underestimated where the outcomes are common


def test_calibration_of_calibrated_probabilities_is_ideal_within_its_interval():
    rng = np.random.default_rng(1)
    probabilities = rng.random(3000)
    labels = (rng.random(3000) < probabilities).astype(np.int64)
    figures = calibration_metrics(labels, probabilities)
    intervals = calibration_intervals(labels, probabilities, n_boot=200)
    assert intervals["calibration_slope"][0] < 1 < intervals["calibration_slope"][1]
    assert intervals["calibration_intercept"][0] < 0 < intervals["calibration_intercept"][1]
    for name in ("calibration_slope", "calibration_intercept", "brier"):
        assert intervals[name][0] <= figures[name] <= intervals[name][1]
    # The ECE's bootstrap runs above it (a resample's bins hold fewer images: more noise).
    assert figures["ece"] <= intervals["ece"][1] < 0.05


def test_calibration_of_one_class_is_not_a_number_not_an_error():
    figures = calibration_metrics(np.ones(20, np.int64), np.linspace(0.5, 0.99, 20))
    assert np.isnan(figures["calibration_slope"]) and np.isnan(figures["calibration_intercept"])
    assert figures["brier"] > 0


def test_patient_bootstrap_is_wider_when_a_patients_images_agree():
    rng = np.random.default_rng(2)
    patients = np.repeat(np.arange(60), 5)  # five images of each patient, scored alike
    labels = np.repeat(rng.random(60) < 0.6, 5).astype(np.int64)
    probs = np.repeat(np.clip(labels[::5] * 0.4 + rng.random(60) * 0.6, 0, 1), 5)
    by_image = bootstrap_intervals(labels, probs, 0.5, n_boot=300)
    by_patient = bootstrap_intervals(labels, probs, 0.5, n_boot=300, groups=patients)
    width = {name: (hi - lo) for name, (lo, hi) in by_image.items()}
    for name in ("accuracy", "sensitivity", "specificity", "auc"):
        assert by_patient[name][1] - by_patient[name][0] > 1.5 * width[name]


def test_cross_fitted_operating_point_has_no_skill_on_scores_without_any():
    rng = np.random.default_rng(3)
    labels = (rng.random(2000) < 0.7).astype(np.int64)
    probs, patients = rng.random(2000), np.arange(2000)
    point = cross_fitted_operating_point(labels, probs, patients, 0.95, repeats=10)
    assert point["sensitivity"]["mean"] == pytest.approx(0.95, abs=0.02)
    assert point["sensitivity"]["mean"] + point["specificity"]["mean"] == pytest.approx(1, abs=0.05)
    separable = cross_fitted_operating_point(labels, labels * 0.5 + probs * 0.4, patients, 0.95,
                                             repeats=5)
    assert separable["specificity"]["mean"] == 1.0
    assert separable["sensitivity"]["p2.5"] >= 0.9
