"""The ONNX Runtime session: the optimised graph cached on disk, IO binding, and finding out
whether CUDA loads."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort
from conftest import KERMANY224
from PIL import Image

from pneumoscan.inference.cam.base import Predictions
from pneumoscan.inference.cam.onnx_cam import MAX_CONCURRENT_BATCHES, OnnxCamModel
from pneumoscan.inference.model import (
    CUDA_PROBE,
    cuda_loads,
    open_session,
    optimized_model_path,
    preload_cuda_libraries,
)
from pneumoscan.inference.pipeline import classify
from pneumoscan.inference.preprocess import normalise
from pneumoscan.inputs.discover import discover
from pneumoscan.workers import available_cores


def real_batch(model: OnnxCamModel) -> np.ndarray:
    """The committed 224 px chest X-rays, as the model takes them."""
    prep = model.info.preprocessing
    pixels = [np.asarray(Image.open(path).convert("L").resize((prep.width, prep.height)))
              for path in sorted(KERMANY224.rglob("*.jpeg"))]
    return normalise(np.stack(pixels), prep)


def assert_same_predictions(ours: Predictions, reference: Predictions, atol: float) -> None:
    np.testing.assert_allclose(ours.probabilities, reference.probabilities, atol=atol)
    np.testing.assert_allclose(ours.cams, reference.cams, atol=atol)
    np.testing.assert_allclose(ours.scope_scores, reference.scope_scores, atol=atol)


def test_the_optimised_graph_is_cached_and_gives_the_same_outputs(shipped_model, tmp_path,
                                                                  monkeypatch):
    uncached = tmp_path / "a-file"
    uncached.write_text("")
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(uncached))
    reference = OnnxCamModel(shipped_model, "cpu")  # the graph as shipped, optimised in memory
    batch = real_batch(reference)
    expected = reference.predict(batch)
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path / "cache"))
    cached = optimized_model_path(shipped_model)
    assert cached is not None and cached.parent.parent == tmp_path / "cache"
    fresh = OnnxCamModel(shipped_model, "cpu")
    assert cached.is_file()
    cached_at = cached.stat().st_mtime_ns
    again = OnnxCamModel(shipped_model, "cpu")
    assert cached.stat().st_mtime_ns == cached_at  # read, not written again
    assert again.info == fresh.info == reference.info  # metadata and the model file's sha256
    assert_same_predictions(fresh.predict(batch), expected, atol=1e-5)
    assert_same_predictions(again.predict(batch), expected, atol=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_damaged_cache_entry_is_replaced(shipped_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path))
    cached = optimized_model_path(shipped_model)
    reference = OnnxCamModel(shipped_model, "cpu")
    cached.write_bytes(b"not a model")
    session, provider = open_session(shipped_model, "cpu")
    assert provider == "CPUExecutionProvider"
    assert cached.read_bytes() != b"not a model"
    batch = real_batch(reference)
    assert_same_predictions(OnnxCamModel(shipped_model, "cpu").predict(batch),
                            reference.predict(batch), atol=1e-5)


def test_an_unwritable_cache_is_no_error(shipped_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(blocker))
    assert optimized_model_path(shipped_model) is None
    session, provider = open_session(shipped_model, "cpu")
    assert provider == "CPUExecutionProvider"
    assert blocker.read_text() == ""


def test_io_binding_gives_the_same_outputs_as_run(shipped_model):
    """The CUDA path's IO binding, exercised here on the CPU provider."""
    model = OnnxCamModel(shipped_model, "cpu")
    batch = real_batch(model)
    bound = model.run_bound(batch, "cpu")
    plain = model.session.run(model.outputs, {model.input_name: batch})
    assert [a.shape for a in bound] == [a.shape for a in plain]
    assert bound[0].shape == (len(batch), 2) and len(bound) == 3  # logits, CAMs, scope score
    for ours, reference in zip(bound, plain):
        np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_batches_run_side_by_side_give_what_one_batch_at_a_time_gives(shipped_model):
    """On CPU the pipeline runs a batch a core at once, each on one ONNX Runtime thread (the
    default); every file gets the result a single all-core session gives, in input order."""
    side_by_side = OnnxCamModel(shipped_model, "cpu")
    assert side_by_side.concurrent_batches == min(available_cores(), MAX_CONCURRENT_BATCHES)
    side_by_side.concurrent_batches = 3  # more lanes than cores here, whatever the machine
    one_at_a_time = OnnxCamModel(shipped_model, "cpu", threads=available_cores())
    assert one_at_a_time.concurrent_batches == 1
    items = list(discover(KERMANY224))
    ours, reference = (list(classify(items, model, batch_size=2))
                       for model in (side_by_side, one_at_a_time))
    assert len(items) == 16
    assert [r.path for r in ours] == [i.path for i in items] == [r.path for r in reference]
    assert all(r.status == "ok" for r in ours + reference)
    np.testing.assert_allclose([r.probability for r in ours],
                               [r.probability for r in reference], atol=1e-5)
    np.testing.assert_allclose([r.cam for r in ours], [r.cam for r in reference], atol=1e-4)


def test_the_cuda_probe_names_only_the_provider_on_stdout():
    """The probe preloads NVIDIA's pip CUDA libraries first (ORT prints what it cannot
    load): stdout must still hold the provider alone, which cuda_loads reads."""
    probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() in {"CUDAExecutionProvider", "CPUExecutionProvider"}
    assert cuda_loads() == (probe.stdout.strip() == "CUDAExecutionProvider")


def test_what_preloading_cuda_prints_goes_to_the_log_not_stdout(monkeypatch, capsys, caplog):
    def preload_dlls():  # what ORT prints on a machine without NVIDIA's libraries
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls)
    with caplog.at_level(logging.INFO, logger="pneumoscan.inference.model"):
        preload_cuda_libraries()
    assert capsys.readouterr().out == ""
    assert "Failed to load libcublasLt.so.13" in caplog.text


def test_a_process_probes_cuda_once(shipped_model, monkeypatch):
    """The probe is a subprocess of up to CUDA_PROBE_SECONDS: opening more sessions (a run
    opens the model, the export checks open several) starts no second one. ORT is made to
    list its CUDA provider, so that the probe is due wherever the test runs."""
    probes = []

    def probe(command, **kwargs):
        probes.append(command)
        return subprocess.CompletedProcess(command, 0, "CPUExecutionProvider\n", "")

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(subprocess, "run", probe)
    cuda_loads.cache_clear()
    try:
        for _ in range(3):
            session, provider = open_session(shipped_model, "auto")
            assert provider == "CPUExecutionProvider"
    finally:
        cuda_loads.cache_clear()  # the real answer again for the other tests
    assert len(probes) == 1
