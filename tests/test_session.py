"""The ONNX Runtime session: the optimised graph cached on disk, and IO binding."""

from __future__ import annotations

import numpy as np

from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.model import open_session, optimized_model_path


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
