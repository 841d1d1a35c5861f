"""The ONNX Runtime session: the optimised graph cached on disk, IO binding, and finding out
whether CUDA loads."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort

from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.model import (
    CUDA_PROBE,
    cuda_loads,
    open_session,
    optimized_model_path,
    preload_cuda_libraries,
)


def test_the_optimised_graph_is_cached_and_gives_the_same_outputs(small_onnx, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path))
    cached = optimized_model_path(small_onnx)
    assert cached is not None and cached.parent.parent == tmp_path
    batch = np.random.default_rng(0).normal(size=(3, 3, 128, 128)).astype(np.float32)
    fresh = OnnxCamModel(small_onnx, "cpu")
    assert cached.is_file()
    again = OnnxCamModel(small_onnx, "cpu")
    assert again.info == fresh.info  # metadata and sha256 of the model file itself
    np.testing.assert_allclose(again.predict(batch).cams, fresh.predict(batch).cams, atol=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_damaged_cache_entry_is_replaced(small_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(tmp_path))
    cached = optimized_model_path(small_onnx)
    cached.write_bytes(b"not a model")
    session, provider = open_session(small_onnx, "cpu")
    assert provider == "CPUExecutionProvider"
    assert cached.stat().st_size > 1000


def test_an_unwritable_cache_is_no_error(small_onnx, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PNEUMOSCAN_CACHE_DIR", str(blocker))
    assert optimized_model_path(small_onnx) is None
    session, provider = open_session(small_onnx, "cpu")
    assert provider == "CPUExecutionProvider"


def test_io_binding_gives_the_same_outputs_as_run(small_onnx):
    """The CUDA path's IO binding, exercised here on the CPU provider."""
    model = OnnxCamModel(small_onnx, "cpu")
    batch = np.random.default_rng(1).normal(size=(4, 3, 128, 128)).astype(np.float32)
    logits, cams, *scope_score = model.run_bound(batch, "cpu")
    plain = model.predict(batch)
    np.testing.assert_allclose(cams, plain.cams, atol=1e-6)
    assert logits.shape == (4, 2)


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


def test_a_process_probes_cuda_once(small_onnx, monkeypatch):
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
            session, provider = open_session(small_onnx, "auto")
            assert provider == "CPUExecutionProvider"
    finally:
        cuda_loads.cache_clear()  # the real answer again for the other tests
    assert len(probes) == 1
