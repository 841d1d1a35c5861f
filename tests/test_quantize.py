"""export-onnx --int8 / --fp16: reduced-precision copies, judged against float32."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pneumoscan.cli import main
from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.pipeline import read_model_input
from pneumoscan.modelling.quantize import (
    QuantizeError,
    export_reduced,
    head_nodes,
    reduced_path,
)
from pneumoscan.modelling.scope_guard import guard_of, is_guard_node


@pytest.fixture
def fp32(small_onnx, tmp_path):
    copy = tmp_path / "model.onnx"
    shutil.copy(small_onnx, copy)
    return copy


def test_int8_is_quantised_calibrated_on_the_training_split_and_keeps_cams(
        small_checkpoint, fp32, val_images):
    # The checkpoint is trained for a few steps only: its AUC is noise, so no limit here.
    comparison = export_reduced(small_checkpoint, fp32, ["int8"], calibration_count=16,
                                eval_images=val_images, max_auc_drop=1.0,
                                log=lambda m: None)["int8"]
    int8 = reduced_path(fp32, "int8")
    graph = onnx.load(str(int8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") > 50 and "QuantizeLinear" in ops
    head = set(head_nodes(onnx.load(str(fp32))))
    assert {"Gemm", "Conv"} <= {n.op_type for n in onnx.load(str(fp32)).graph.node
                                 if n.name in head}
    # Kept float32, under their own names; ORT's graph clean-up may fuse the scope guard's
    # MatMul + Add, so those are held to their outputs: never made by a quantised node.
    assert {n for n in head if not n.startswith("scope/")} <= {node.name for node in graph.node}
    guard = [node for node in graph.node if is_guard_node(node)]
    dequantized = {o for node in graph.node if node.op_type == "DequantizeLinear"
                   for o in node.output}
    assert guard and not any(o in dequantized for node in guard for o in node.output)
    assert all(node.op_type not in ("QuantizeLinear", "DequantizeLinear") for node in guard)
    # The guard reads float weights of its own, not the network's int8 round trip: its
    # score stays the float32 model's, whose threshold it uses.
    guard_weights = {name for node in guard for name in node.input} & {
        i.name for i in graph.initializer}
    assert guard_weights and all(name.startswith("scope/") for name in guard_weights)
    # ...and nothing dequantised: not even the input's uint8 round trip, which the network
    # reads; the guard reads the float input
    assert not {name for node in guard for name in node.input} & dequantized
    assert graph.input[0].name in {name for node in guard for name in node.input}
    assert any(node.input[0] == graph.input[0].name for node in graph.node
               if node.op_type == "QuantizeLinear")
    batch = np.stack([read_model_input(p, OnnxCamModel(fp32, "cpu").info.preprocessing)
                      for p in sorted(val_images.rglob("*.jpeg"))[:8]])
    scores = [OnnxCamModel(path, "cpu").predict(batch).scope_scores for path in (fp32, int8)]
    np.testing.assert_allclose(scores[1], scores[0], atol=0.05)
    model = OnnxCamModel(int8, "cpu")
    assert "int8" in model.info.extra["precision"]
    assert "validation_vs_float32" in model.info.extra
    batch = np.random.default_rng(0).normal(size=(2, 3, 128, 128)).astype(np.float32)
    out = model.predict(batch)
    assert out.probabilities.shape == (2, 2) and out.cams.shape == (2, 2, 4, 4)
    assert comparison.images == 16
    # The guard flags the images float32's does (its own float weights: same scores)
    assert comparison.flagged is not None
    assert abs(comparison.flagged[1] - comparison.flagged[0]) <= 1 / 16
    assert comparison.cam_correlation_mean > 0.5
    assert comparison.max_probability_difference < 0.5


def test_an_int8_copy_fits_its_direct_guard_again_on_the_int8_network(
        small_checkpoint, tmp_path, val_images):
    """A guard that reads the network's own activations (the direct view) reads them
    quantised in the int8 copy: float32's fit flagged every validation image of the
    2026.12.07 model there. The copy's guard is fitted anew on the int8 network's
    activations, on the same images, and flags the share of them its metadata says."""
    from pneumoscan.inference.pipeline import preprocessed_batches
    from pneumoscan.modelling.checkpoint import read_checkpoint
    from pneumoscan.modelling.export import export_checkpoint, split_images

    fp32 = tmp_path / "direct.onnx"
    export_checkpoint(small_checkpoint, fp32, check_images=val_images, version="test",
                      log=lambda m: None, scope_view="direct")
    export_reduced(small_checkpoint, fp32, ["int8"], calibration_count=8, max_auc_drop=1.0,
                   log=lambda m: None)
    int8 = reduced_path(fp32, "int8")
    float_guard, int8_guard = (guard_of(onnx.load(str(path))) for path in (fp32, int8))
    assert float_guard.view == int8_guard.view == "direct"
    assert int8_guard.layers == float_guard.layers
    assert int8_guard.train_images == float_guard.train_images
    assert int8_guard.threshold != float_guard.threshold
    assert [m.key for m in onnx.load(str(int8)).metadata_props].count("pneumoscan.scope_guard") == 1
    model = OnnxCamModel(int8, "cpu")
    val = split_images(small_checkpoint, read_checkpoint(small_checkpoint), "val")
    scores = np.concatenate([model.predict(batch).scope_scores
                             for batch, _ in preprocessed_batches(val, model.info.preprocessing)])
    assert len(scores) == int8_guard.val_images == len(val) > 0
    assert float(np.mean(scores > int8_guard.threshold)) == int8_guard.val_flagged


def test_int8_is_not_written_when_its_auc_drops_too_much(small_checkpoint, fp32, val_images):
    with pytest.raises(QuantizeError, match="NOT written"):
        export_reduced(small_checkpoint, fp32, ["int8"], calibration_count=8,
                       eval_images=val_images, max_auc_drop=-1.0, log=lambda m: None)
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx"]


def test_int8_is_not_written_when_its_guard_flags_otherwise(small_checkpoint, fp32,
                                                            val_images, monkeypatch):
    monkeypatch.setattr("pneumoscan.modelling.quantize.MAX_FLAG_RATE_CHANGE", -1.0)
    monkeypatch.setattr("pneumoscan.modelling.quantize.FLAG_SLACK_IMAGES", -1)
    with pytest.raises(QuantizeError, match="scope guard flags"):
        export_reduced(small_checkpoint, fp32, ["int8"], calibration_count=8,
                       eval_images=val_images, max_auc_drop=1.0, log=lambda m: None)
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.onnx"]


def test_fp16_keeps_float32_inputs_and_outputs(small_checkpoint, fp32, val_images):
    comparison = export_reduced(small_checkpoint, fp32, ["fp16"], eval_images=val_images,
                                log=lambda m: None)["fp16"]
    half = onnx.load(str(reduced_path(fp32, "fp16")))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in half.graph.output)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
    assert comparison.max_probability_difference < 1e-2
    assert comparison.cam_correlation_min > 0.99


def test_cli_says_when_a_reduced_model_is_refused(small_checkpoint, tmp_path, val_images,
                                                  monkeypatch):
    monkeypatch.setattr("pneumoscan.modelling.quantize.MAX_AUC_DROP", -1.0)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export-onnx", str(small_checkpoint), "--out", str(out),
                                       "--check-images", str(val_images), "--fp16",
                                       "--eval-images", str(val_images), "--force"])
    assert result.exit_code == 1, result.output
    assert "fp16 model NOT written" in result.output
    assert out.is_file() and not reduced_path(out, "fp16").exists()
