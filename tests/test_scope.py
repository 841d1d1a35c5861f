"""The scope guard: metadata rules, the model's own out-of-distribution score (fitted at
export time), what the shipped model says of real in- and out-of-scope images, and how
results, studies and the JSON schema carry it."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
from conftest import REPO, SAMPLES, invoke_cli, shared_path
from PIL import Image

from pneumoscan import api
from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.pipeline import read_model_input
from pneumoscan.inference.scope import (
    assess,
    metadata_reasons,
    patient_age_years,
    scope_threshold,
)
from pneumoscan.modelling.scope_guard import (
    DIRECT_LAYERS,
    SCORE_OUTPUT,
    combined_scores,
    fit_layer,
    flag_threshold,
    guard_of,
    standardise,
    tapped_layers,
)
from pneumoscan.records import FileResult
from pneumoscan.results.summary import NEGATIVE, OUT_OF_SCOPE, POSITIVE, Counts, Study


@pytest.mark.parametrize("metadata, years", [
    ({"PatientAge": "004Y"}, 4.0),
    ({"PatientAge": "018M"}, 1.5),
    ({"PatientAge": "010W"}, 70 / 365.25),
    ({"PatientAge": "100D"}, 100 / 365.25),
    ({"PatientBirthDate": "20200301", "StudyDate": "20230301"}, 3.0),
    ({"PatientAge": "", "PatientBirthDate": "19600101", "StudyDate": "20200101"}, 60.0),
    ({"PatientAge": "4 years"}, None),
    ({"PatientBirthDate": "2020-03-01", "StudyDate": "20230301"}, None),
    ({"PatientBirthDate": "20230301", "StudyDate": "20200301"}, None),  # study before birth
    ({}, None),
])
def test_patient_age_from_age_or_dates(metadata, years):
    age = patient_age_years(metadata)
    assert age == pytest.approx(years, abs=0.01) if years is not None else age is None


@pytest.mark.parametrize("metadata, out_of_scope", [
    ({"PatientAge": "003Y", "ViewPosition": "AP"}, False),
    ({"PatientAge": "006Y", "ViewPosition": "PA"}, False),  # within the tolerance
    ({"PatientAge": "007M"}, False),
    ({"PatientAge": "005M"}, True),  # an infant
    ({"PatientAge": "007Y"}, True),
    ({"PatientAge": "064Y"}, True),
    ({"ViewPosition": "LLD"}, True),  # decubitus: frontal, but not how the model was trained
    ({"ViewPosition": ""}, False),
    ({}, False),
])
def test_metadata_rules(metadata, out_of_scope):
    reasons = metadata_reasons(metadata)
    assert bool(reasons) == out_of_scope
    assert all("\n" not in r and r for r in reasons)


def test_reasons_say_what_and_why():
    in_scope, reasons = assess({"PatientAge": "064Y", "ViewPosition": "LLD"}, 3.0, 1.0)
    assert not in_scope
    assert reasons == ["patient aged 64 years: the model is made for children aged 1-5",
                       "view position LLD: the model is made for PA or AP views",
                       "image unlike the model's training images (out-of-distribution "
                       "score 3.00 > 1.00)"]
    assert assess({"PatientAge": "004Y"}, 0.5, 1.0) == (True, [])
    assert assess({}, None, None) == (True, [])  # a model without a guard: metadata only


def test_threshold_flags_at_most_the_rate():
    scores = np.arange(100.0)
    threshold = flag_threshold(scores, 0.05)
    assert (scores > threshold).sum() == 5
    assert threshold == 94.5  # midway: no score sits on it, to be tipped by float rounding
    tied = np.array([*range(94), 94, 94, 96, 97, 98, 99], float)  # the 95th and 96th tie
    assert flag_threshold(tied, 0.05) == 95.0 and (tied > 95.0).sum() == 4
    for same in (np.full(40, 1.5), np.array([2.0])):
        assert flag_threshold(same, 0.05) > same.max()
    assert (scores[:19] > flag_threshold(scores[:19], 0.05)).sum() == 0  # 5% of 19 < 1


def test_the_exported_score_is_the_fitted_one(small_onnx, small_checkpoint, val_images):
    """export-onnx fitted the guard on the checkpoint's split, through its view (the small
    model has no round trip of its own: the view adds the training images' one, and averages
    it over 4x4 pixels); ONNX Runtime's scope_score is the numpy formula of the fit on the same
    statistics."""
    from pneumoscan.modelling.scope_guard import layer_statistics, read_split

    model = onnx.load(str(small_onnx))
    assert SCORE_OUTPUT in [o.name for o in model.graph.output]
    cam_model = OnnxCamModel(small_onnx, device="cpu")
    threshold = scope_threshold(cam_model.info)
    assert threshold is not None
    train, val = read_split(small_checkpoint.parent / "split.json")
    guard = json.loads(cam_model.info.extra["scope_guard"])
    layers = guard["layers"]
    assert (guard["view_jpeg_quality"], guard["view_reduction"]) == (75, 4)
    assert [name.removeprefix("scope/view/trunk/") for name in layers] == tapped_layers(model)
    assert guard["train_images"] == len(train) and guard["val_images"] == len(val)
    fits = [fit_layer(t, s) for t, s in zip(layers, layer_statistics(
        model, layers, train, lambda m: None))]
    for fit, stats in zip(fits, layer_statistics(model, layers, val, lambda m: None)):
        standardise(fit, stats)
    paths = sorted(val_images.rglob("*.jpeg"))
    expected = combined_scores(fits, layer_statistics(model, layers, paths, lambda m: None))
    prep = cam_model.info.preprocessing
    batch = np.stack([read_model_input(p, prep) for p in paths])
    got = cam_model.predict(batch).scope_scores
    # float32 in the graph against float64 here, on scores of order 1 (thresholds ~1.6)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_a_direct_guard_reads_the_networks_own_pass(small_checkpoint, val_images, tmp_path):
    """view="direct": the guard taps the network's activations, adds no copy of the trunk
    (no convolution), and its score is still the fit's formula on those activations."""
    from pneumoscan.modelling.export import export_checkpoint
    from pneumoscan.modelling.scope_guard import fit_scope_guard, layer_statistics, read_split

    bare = tmp_path / "bare.onnx"
    export_checkpoint(small_checkpoint, bare, check_images=val_images, version="test",
                      log=lambda msg: None, scope_guard=False)
    train, val = read_split(small_checkpoint.parent / "split.json")
    guarded = tmp_path / "direct.onnx"
    guard = fit_scope_guard(bare, train, val, out=guarded, log=lambda m: None, view="direct")
    before, after = onnx.load(str(bare)), onnx.load(str(guarded))
    assert guard.layers == tapped_layers(before)[-DIRECT_LAYERS:] and len(guard.layers) == 3
    assert (guard.view, guard.view_jpeg_quality, guard.view_reduction) == ("direct", None, 1)
    convolutions = [[n for n in m.graph.node if n.op_type == "Conv"] for m in (before, after)]
    assert len(convolutions[0]) == len(convolutions[1]) > 10

    fits = [fit_layer(t, s) for t, s in zip(guard.layers, layer_statistics(
        before, guard.layers, train, lambda m: None))]
    for fit, stats in zip(fits, layer_statistics(before, guard.layers, val, lambda m: None)):
        standardise(fit, stats)
    paths = sorted(val_images.rglob("*.jpeg"))
    expected = combined_scores(fits, layer_statistics(before, guard.layers, paths,
                                                      lambda m: None))
    cam_model = OnnxCamModel(guarded, device="cpu")
    batch = np.stack([read_model_input(p, cam_model.info.preprocessing) for p in paths])
    np.testing.assert_allclose(cam_model.predict(batch).scope_scores, expected, atol=2e-3)


def test_one_tapped_layer_per_resolution(small_onnx):
    """The last activation before each change of resolution, and the last of all."""
    model = onnx.load(str(small_onnx))
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)[2:]
             for v in (*inferred.graph.value_info, *inferred.graph.output)}
    layers = tapped_layers(model)
    resolutions = [sizes[name] for name in layers]
    assert len(set(resolutions)) == len(resolutions) >= 4
    assert resolutions == sorted(resolutions, reverse=True)  # from the stem down
    assert layers[-1] == "features"
    activations = [node.output[0] for node in model.graph.node
                   if node.op_type in ("Clip", "Relu") and len(sizes.get(node.output[0], ())) == 2]
    for name in layers[:-1]:  # the next activation is at the next resolution
        assert sizes[activations[activations.index(name) + 1]] != sizes[name]


@pytest.fixture(scope="module")
def shipped():
    model = api.open_model(None, "cpu")
    if scope_threshold(model.info) is None:
        pytest.fail("the shipped model has no scope guard (pneumoscan scope-guard)")
    return model


def test_shipped_model_flags_an_adult_dicom_and_a_photo(shipped, tmp_path):
    from skimage import data as images

    rg1 = SAMPLES / "dicom" / "RG1_UNCR.dcm"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(rg1, scans / rg1.name)
    Image.fromarray(images.astronaut()).save(scans / "photo.png")
    results = {r.path.name: r for r in api.scan(scans, shipped, render=False).results}
    adult, photo = results[rg1.name], results["photo.png"]
    assert adult.status == "ok" and adult.in_scope is False
    assert any(r.startswith("patient aged 6") for r in adult.scope_reasons)
    assert any("unlike the model's training images" in r for r in adult.scope_reasons)
    assert photo.status == "ok" and photo.in_scope is False
    assert any("unlike the model's training images" in r for r in photo.scope_reasons)
    # Still classified: the probability and decision are given.
    assert all(r.probability is not None and r.label for r in (adult, photo))


def test_the_shipped_guard_reads_the_networks_own_coarsest_activations(shipped):
    """The 2026.12.07 model has an input low-pass, so its guard reads its own activations
    (`export-onnx --scope-view direct`: no copy of the trunk; docs/MODEL_CARD.md)."""
    from pneumoscan.modelling.scope_guard import DIRECT_LAYERS

    guard = guard_of(onnx.load(str(shipped.info.path)))
    assert (guard.view, guard.view_jpeg_quality, guard.view_reduction) == ("direct", None, 1)
    assert len(guard.layers) == DIRECT_LAYERS
    assert not any(layer.startswith("scope/view/") for layer in guard.layers)
    assert guard.threshold == json.loads(shipped.info.extra["scope_guard"])["threshold"]


def test_a_guard_fitted_before_views_existed_reads_as_the_stored_view(shipped):
    """Guards fitted before the direct view existed do not name their view in the model's
    metadata (the 2026.12.01 model as first shipped): they read the stored view."""
    model = onnx.load(str(shipped.info.path))
    entry = next(m for m in model.metadata_props if m.key == "pneumoscan.scope_guard")
    old = {k: v for k, v in json.loads(entry.value).items() if k != "view"}
    entry.value = json.dumps(old)
    guard = guard_of(model)
    assert guard.view == "stored" and guard.threshold == old["threshold"]


def test_scope_guard_refuses_a_guarded_model_unless_told_to_replace_its_guard(small_onnx,
                                                                                tmp_path):
    from conftest import KERMANY224

    copy = tmp_path / "model.onnx"
    shutil.copy(small_onnx, copy)
    refused = invoke_cli("scope-guard", copy, "--data", KERMANY224)
    assert refused.exit_code == 1 and "already has a scope guard" in refused.output
    replaced = invoke_cli("scope-guard", copy, "--data", KERMANY224, "--replace",
                          "--view-reduction", "1")
    assert replaced.exit_code == 0, replaced.output
    model = onnx.load(str(copy))
    assert [o.name for o in model.graph.output].count(SCORE_OUTPUT) == 1
    assert guard_of(model).view_reduction == 1
    assert [m.key for m in model.metadata_props].count("pneumoscan.scope_guard") == 1
    assert OnnxCamModel(copy, "cpu").predict(
        np.zeros((1, 3, 128, 128), np.float32)).scope_scores.shape == (1,)


def test_shipped_model_keeps_the_official_val_images_in_scope(shipped):
    results = api.scan(SAMPLES, shipped, render=False).results
    kermany = [r for r in results if r.status == "ok" and r.path.suffix == ".jpeg"]
    assert len(kermany) == 16
    assert [r.path.name for r in kermany if not r.in_scope] == []


@pytest.mark.parametrize("folder, images, flagged_at_least, flagged_at_most", [
    ("adult-dev", 54, 0.85, 1.0),  # adult chest X-rays of another hospital: issue 10's >= 85%
    ("kermany-original", 100, 0.0, 0.05),  # the training population at original resolution
])
def test_shipped_guard_on_real_sets(shipped, folder, images, flagged_at_least, flagged_at_most):
    """The shipped guard's flag rates on the shared sets (docs/MODEL_CARD.md, "Scope
    guard"): adult-dev is out of scope, the Kermany originals in, by the pixels alone."""
    results = [r for r in api.scan(shared_path(folder), shipped, render=False).results
               if r.status == "ok"]
    assert len(results) == images
    flagged = np.mean([any(reason.startswith("image unlike") for reason in r.scope_reasons)
                       for r in results])
    assert flagged_at_least <= flagged <= flagged_at_most, flagged


def _result(label: str, in_scope: bool) -> FileResult:
    return FileResult(REPO / f"{label}-{in_scope}.png", "study", "ok", probability=0.3,
                      label=label, threshold=0.5, in_scope=in_scope,
                      scope_reasons=[] if in_scope else ["image unlike ..."])


def test_a_study_all_out_of_scope_is_never_normal():
    assert Study("s", (_result(NEGATIVE, False), _result(NEGATIVE, False))).decision \
        == OUT_OF_SCOPE == "review: outside the model's intended use"
    assert Study("s", (_result(POSITIVE, False),)).decision == OUT_OF_SCOPE
    # One image in scope: the study is decided as before, on all its images.
    assert Study("s", (_result(NEGATIVE, False), _result(NEGATIVE, True))).decision == NEGATIVE
    assert Study("s", (_result(POSITIVE, False), _result(NEGATIVE, True))).decision == POSITIVE
    counts = Counts.of([_result(NEGATIVE, False), _result(POSITIVE, True)])
    assert (counts.classified, counts.out_of_scope, counts.pneumonia, counts.normal) == (
        2, 1, 1, 0)  # the one out of scope counted apart, not as NORMAL


def test_json_schema_doc_shows_every_field():
    doc = (REPO / "docs" / "RESULTS_JSON.md").read_text()
    record = _result(NEGATIVE, False).to_json()
    assert {"in_scope", "scope_reasons"} <= record.keys()
    documented = set(re.findall(r'^\s*"(\w+)":', doc, re.MULTILINE))
    assert record.keys() <= documented, record.keys() - documented
    counts = doc[doc.index('"counts"'):doc.index('"results"')]
    assert all(f'"{name}"' in counts for name in Counts.of([]).__dict__)


def test_the_summary_counts_out_of_scope_images_apart(tmp_path):
    """The samples' three adult radiographs are outside the intended use: counted apart,
    not among the NORMAL ones. (The Kermany images are 8 and 8; the model calls two of the
    NORMAL ones PNEUMONIA: docs/MODEL_CARD.md.)"""
    done = invoke_cli("run", SAMPLES, "--json", tmp_path / "r.json")
    assert done.exit_code == 0, done.stderr
    assert ("19 classified (3 outside the model's intended use, 10 PNEUMONIA, 6 NORMAL)"
            in done.stderr)
    counts = json.loads((tmp_path / "r.json").read_text())["counts"]
    assert (counts["classified"], counts["out_of_scope"], counts["pneumonia"],
            counts["normal"]) == (19, 3, 10, 6)
