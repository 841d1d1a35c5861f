"""The model shipped inside the package: `pneumoscan run` uses it without --model."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_JPEGS, SAMPLES, invoke_cli

from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.model import default_model_path


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    assert path.is_file(), f"the default model is missing from the package: {path}"
    return OnnxCamModel(path, device="cpu")


def test_shipped_model_describes_itself(shipped):
    info = shipped.info
    assert info.arch == "efficientnet_lite0"
    assert info.class_names == ("NORMAL", "PNEUMONIA")
    assert (info.preprocessing.height, info.preprocessing.width) == (224, 224)
    assert info.preprocessing.resize == "bilinear"
    assert 0 < info.threshold < 1


def test_run_without_model_uses_the_shipped_one(shipped, tmp_path):
    """The 16 official Kermany VAL images: never seen in training nor in choosing the
    threshold, so this is a real (if tiny) held-out check."""
    out = tmp_path / "r.json"
    result = invoke_cli("run", SAMPLES, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["run"]["model"]["sha256"] == shipped.info.sha256
    assert data["run"]["model"]["cam_method"] == shipped.info.cam_method
    graded = [r for r in data["results"] if r["status"] == "ok" and r["path"].endswith(".jpeg")]
    assert len(graded) == 16
    truth = {r["path"]: "NORMAL" if "NORMAL" in r["path"].rsplit("/", 1)[-1] else "PNEUMONIA"
             for r in graded}
    correct = sum(r["label"] == truth[r["path"]] for r in graded)
    assert correct >= 14, f"{correct}/16 correct on the official validation images"
    rg1 = [r for r in data["results"] if "RG1_" in r["path"]]
    assert len(rg1) == 3 and all(r["status"] == "ok" for r in rg1)


# A score this close to the threshold may cross it when the scan is stored another way: the
# decision is compared only further away (its scores are compared for every image).
NEAR_THRESHOLD = 0.05


def test_the_score_does_not_depend_on_how_a_scan_was_stored(shipped, tmp_path):
    """Original Kermany scans (half the validation originals), each also stored three other
    ways (16-bit PNG, JPEG quality 95 at full size, squashed to 224 px with a bicubic
    filter): through `run`, each copy
    scores as its original does (benchmarks/bench_robustness.py measures ten ways on 116
    images; mean |dp| 0.009). The shipped model needs no JPEG round trip of its input: it
    was trained to ignore storage."""
    import numpy as np
    from PIL import Image

    from pneumoscan import api

    assert shipped.info.preprocessing.jpeg_quality is None
    originals = SAMPLE_JPEGS[::2]
    for path in originals:
        with Image.open(path) as img:
            grey = np.asarray(img.convert("L"))
        (tmp_path / f"{path.stem}.original.jpeg").symlink_to(path)
        Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / f"{path.stem}.png16.png")
        Image.fromarray(grey).save(tmp_path / f"{path.stem}.q95.jpeg", quality=95)
        Image.fromarray(grey).resize((224, 224), Image.Resampling.BICUBIC).save(
            tmp_path / f"{path.stem}.bicubic.png")
    results = api.scan(tmp_path, shipped, render=False).results
    assert all(r.status == "ok" for r in results) and len(results) == 4 * len(originals)
    by_name = {r.path.name: r for r in results}
    gaps = []
    for path in originals:
        reference = by_name[f"{path.stem}.original.jpeg"]
        for way in ("png16.png", "q95.jpeg", "bicubic.png"):
            stored = by_name[f"{path.stem}.{way}"]
            if abs(reference.probability - shipped.info.threshold) > NEAR_THRESHOLD:
                assert stored.label == reference.label, (path.name, way)
            gaps.append(abs(stored.probability - reference.probability))
    assert np.mean(gaps) < 0.02 and max(gaps) < 0.15, gaps


def test_run_scores_an_original_scan_as_training_and_eval_would(shipped, tmp_path):
    """Large scans are decoded once, at the model's own size, whether or not a report is
    rendered: `run`, with or without pictures, gives exactly the score that the training
    loader's pixels give."""
    import numpy as np

    from pneumoscan import api
    from pneumoscan.evaluation.datasets import Sample
    from pneumoscan.inference.preprocess import normalise
    from training.data import load_cached

    originals = SAMPLE_JPEGS[1::2]
    for path in originals:
        (tmp_path / path.name).symlink_to(path)
    prep = shipped.info.preprocessing
    pixels, _, problems = load_cached([Sample(p, 0, p.name) for p in originals], prep)
    assert not problems
    expected = shipped.predict(normalise(pixels, prep)).probabilities[:, 1]
    for render in (False, True):
        results = sorted(api.scan(tmp_path, shipped, render=render).results,
                         key=lambda r: r.path.name)
        assert [r.path.name for r in results] == [p.name for p in originals]
        assert all((r.picture is not None) == render for r in results)
        np.testing.assert_allclose([r.probability for r in results], expected, atol=1e-5)


def test_lossless_encodings_of_one_dicom_score_alike(shipped, tmp_path):
    """RG1 stored uncompressed and as JPEG 2000 lossless: the same stored values, so the
    same score (issue 10: within 0.002)."""
    from pneumoscan import api

    for name in ("RG1_UNCR", "RG1_J2KR"):
        (tmp_path / f"{name}.dcm").symlink_to(SAMPLES / "dicom" / f"{name}.dcm")
    scores = [r.probability for r in sorted(api.scan(tmp_path, shipped, render=False).results,
                                            key=lambda r: r.path.name)]
    assert None not in scores
    assert abs(scores[0] - scores[1]) <= 0.002, scores


def test_pictures_are_drawn_by_the_outputs_from_the_engines_views(shipped):
    """The engine draws nothing. Without a view size (a --json run) it keeps no view; with
    one, each classified image comes with its view (the X-ray reduced to at most that),
    from which with the result's CAM the output stage draws the same picture as from the
    full decode; the scores and CAMs are the same either way. `api.scan` with pictures
    drops the views once drawn."""
    import numpy as np

    from pneumoscan import api
    from pneumoscan.inference.pipeline import classify
    from pneumoscan.inputs.discover import discover
    from pneumoscan.inputs.loading import load
    from pneumoscan.report.pictures import DISPLAY_SIZE, render_picture

    items = list(discover(SAMPLES))
    plain = list(classify(items, shipped))
    viewed = list(classify(items, shipped, view_size=DISPLAY_SIZE))
    assert all(r.view is None and r.picture is None for r in plain)
    assert [(r.probability, r.cam) for r in viewed] == [(r.probability, r.cam) for r in plain]
    classified = [(item, r) for item, r in zip(items, viewed) if r.status == "ok"]
    assert len(classified) >= 16
    assert all(r.view is None for r in viewed if r.status != "ok")
    decode_size = shipped.info.preprocessing.decode_size
    for item, result in classified:
        view, cam = result.view, np.asarray(result.cam, np.float32)
        assert max(view.shape) <= DISPLAY_SIZE and view.dtype == np.uint8
        full = load(item, min_size=decode_size).pixels
        assert max(full.shape) > DISPLAY_SIZE  # the view is a reduction, not the decode
        assert render_picture(view, cam) == render_picture(full, cam)
    scanned = api.scan(SAMPLES, shipped, render=True).results
    assert all(r.view is None for r in scanned)
    assert all(bytes(r.picture)[:3] == b"\xff\xd8\xff" for r in scanned if r.status == "ok")
