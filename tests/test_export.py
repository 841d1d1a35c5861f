"""export-onnx: parity with PyTorch on real images, metadata round trip, outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import invoke_cli

from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.pipeline import read_model_input
from pneumoscan.modelling.scope_guard import SCORE_OUTPUT
from pneumoscan.modelling.torch_cam import CAM_METHOD
from pneumoscan.modelling.checkpoint import (
    checkpoint_model_info,
    load_network,
    read_checkpoint,
)
from pneumoscan.modelling.export import (
    OPSET,
    PARITY_LIMITS,
    check_parity,
    export_module,
)


def test_metadata_round_trip(small_checkpoint, small_onnx):
    payload = read_checkpoint(small_checkpoint)
    expected = checkpoint_model_info(small_checkpoint, payload)
    info = OnnxCamModel(small_onnx, device="cpu").info
    assert info.class_names == ("NORMAL", "PNEUMONIA")
    assert info.positive_class == 1
    assert info.threshold == pytest.approx(payload["threshold"], abs=0)
    assert info.preprocessing == expected.preprocessing
    assert info.preprocessing.height == 128
    assert info.arch == "efficientnet_lite0"
    assert info.version == "test"
    assert "auc" in info.extra["validation_metrics"]
    assert "kermany224" in info.extra["training_data"]
    assert info.cam_method == CAM_METHOD == expected.cam_method


def test_graph_has_dynamic_batch_and_cam_outputs(small_onnx):
    model = onnx.load(str(small_onnx))
    assert model.opset_import[0].version >= 17 and OPSET >= 17
    assert [o.name for o in model.graph.output] == ["logits", "features", "cams", SCORE_OUTPUT]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value


def test_same_padding_is_folded_into_the_convolutions(small_onnx):
    """No separate Pad nor shape arithmetic: each costs a copy of the activations."""
    network = [node for node in onnx.load(str(small_onnx)).graph.node
               if not node.output[0].startswith("scope/") and node.output[0] != SCORE_OUTPUT]
    ops = {node.op_type for node in network}
    assert ops <= {"Conv", "Clip", "Add", "ReduceMean", "Gemm"}, ops


def test_parity_on_real_images_for_several_batch_sizes(small_checkpoint, small_onnx, val_images):
    network, payload = load_network(small_checkpoint)
    prep = checkpoint_model_info(small_checkpoint, payload).preprocessing
    paths = sorted(val_images.rglob("*.jpeg"))
    batch = np.stack([read_model_input(p, prep) for p in paths])
    for n in (1, 5, len(batch)):
        diffs = check_parity(export_module(network), small_onnx, batch[:n])
        assert all(diffs[k] < limit for k, limit in PARITY_LIMITS.items()), diffs
        assert diffs["logits"] < 1e-4 and diffs["probabilities"] < 1e-4
    model = OnnxCamModel(small_onnx, device="cpu")
    out = model.predict(batch[:3])
    assert out.probabilities.shape == (3, 2)
    np.testing.assert_allclose(out.probabilities.sum(1), 1, atol=1e-6)
    assert out.cams.shape == (3, 2, 4, 4)  # 128 px input, stride 32


def test_export_refuses_a_checkpoint_it_cannot_read(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    result = invoke_cli("export-onnx", bogus, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert "cannot read checkpoint" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_export_is_named_after_its_run_and_refused_far_below_the_default_model(
        small_checkpoint, val_images, tmp_path):
    import torch

    poor = tmp_path / "run-poor" / "best.pt"
    poor.parent.mkdir()
    payload = read_checkpoint(small_checkpoint)
    payload["metrics"]["at_threshold"]["auc"] = 0.41
    torch.save(payload, poor)
    out = tmp_path / "poor.onnx"
    refused = invoke_cli("export-onnx", poor, "--out", out, "--check-images", val_images)
    assert refused.exit_code == 1 and not out.exists()
    assert "validation AUC 0.410 is far below the default model's 0.997" in refused.stderr
    assert "AUC 0.410" in refused.stdout  # its metrics, and the default model's
    forced = invoke_cli("export-onnx", poor, "--out", out, "--check-images", val_images,
                        "--force")
    assert forced.exit_code == 0, forced.output
    assert "exported because of --force" in forced.stderr
    info = OnnxCamModel(out, device="cpu").info
    assert info.name == "pneumoscan-efficientnet_lite0-run-poor"
    assert f"wrote {out}: model {info.name}" in forced.stdout
