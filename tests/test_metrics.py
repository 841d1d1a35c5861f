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
from pneumoscan.evaluation.metrics import binary_metrics, confusion, roc_auc, roc_curve
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
