"""The ONNX in-graph CAM (run path) agrees with the PyTorch forward-hook reference."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.inference.cam import normalised_cams
from pneumoscan.inference.cam.onnx_cam import OnnxCamModel
from pneumoscan.inference.pipeline import read_model_input
from pneumoscan.modelling.torch_cam import TorchHookCamModel


def test_onnx_and_forward_hook_cams_agree_on_real_images(small_checkpoint, small_onnx,
                                                          val_images):
    onnx_model = OnnxCamModel(small_onnx, device="cpu")
    torch_model = TorchHookCamModel(small_checkpoint, device="cpu")
    prep = onnx_model.info.preprocessing
    assert torch_model.info.preprocessing == prep
    paths = sorted(val_images.rglob("*.jpeg"))
    batch = np.stack([read_model_input(p, prep) for p in paths])
    a, b = onnx_model.predict(batch), torch_model.predict(batch)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    for cls in (0, 1):
        picked = np.full(len(batch), cls)
        diff = np.abs(normalised_cams(a.cams, picked) - normalised_cams(b.cams, picked))
        assert diff.max() < 1e-3
    # Real maps, not constants: each CAM spans its full [0, 1] range.
    cams = normalised_cams(a.cams, np.ones(len(batch), int))
    assert np.allclose(cams.max(axis=(1, 2)), 1) and np.allclose(cams.min(axis=(1, 2)), 0)


def test_onnx_cam_is_pytorch_grad_cams_grad_cam_on_the_last_maps(small_checkpoint, small_onnx,
                                                                  val_images):
    """External reference: for a GAP + linear head, Grad-CAM on the last conv maps
    (pytorch-grad-cam) is ReLU(CAM_k - b_k) up to scale. The in-graph CAM, bias removed,
    rectified and brought to the input size by pytorch-grad-cam's own scaling, is its map
    (to 1e-3 on the normalised maps; 4e-5 on the shipped model and the 16 VAL scans)."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pneumoscan.modelling.checkpoint import load_network

    onnx_model = OnnxCamModel(small_onnx, device="cpu")
    network, _ = load_network(small_checkpoint)
    prep = onnx_model.info.preprocessing
    batch = np.stack([read_model_input(p, prep) for p in sorted(val_images.rglob("*.jpeg"))])
    predicted = onnx_model.predict(batch)
    decided = predicted.probabilities.argmax(1)
    bias = network.classifier.bias.detach().numpy()[decided]
    ours = np.maximum(predicted.cams[np.arange(len(batch)), decided] - bias[:, None, None], 0)
    # scaled as pytorch-grad-cam does: per layer (min-max, resize), then the layers' mean
    ours = scale_cam_image(scale_cam_image(ours, (prep.width, prep.height)))
    with GradCAM(model=network, target_layers=[network.features]) as grad_cam:
        theirs = grad_cam(input_tensor=torch.from_numpy(batch),
                          targets=[ClassifierOutputTarget(int(c)) for c in decided])
    assert theirs.shape == ours.shape == (len(batch), prep.height, prep.width)
    assert np.abs(ours - theirs).max() < 1e-3
    # Real maps, not all zero (one is, where CAM_k - b_k < 0 in every cell: Grad-CAM is 0).
    assert (theirs.max(axis=(1, 2)) > 0.99).mean() > 0.5


def test_cam_is_the_classifier_applied_to_the_hooked_maps(small_checkpoint, val_images):
    """CAM averaged over space equals the logit, since the head is GAP + linear."""
    torch_model = TorchHookCamModel(small_checkpoint, device="cpu")
    prep = torch_model.info.preprocessing
    path = sorted(val_images.rglob("*.jpeg"))[0]
    out = torch_model.predict(read_model_input(path, prep)[None])
    logits_from_cam = out.cams.mean(axis=(2, 3))
    probs = np.exp(logits_from_cam) / np.exp(logits_from_cam).sum(1, keepdims=True)
    np.testing.assert_allclose(probs, out.probabilities, atol=1e-5)


def test_torch_backend_honours_the_device(small_checkpoint, tmp_path):
    """--device cuda --cam-backend torch runs on CUDA, or fails saying why; never quietly on
    the CPU."""
    import torch

    from pneumoscan.api import open_model
    from pneumoscan.inference.model import ModelError

    if torch.cuda.is_available():
        model = open_model(device="cuda", cam_backend="torch", checkpoint=small_checkpoint)
        assert model.provider == "torch-cuda"
        assert next(model.network.parameters()).device.type == "cuda"
    else:
        with pytest.raises(ModelError, match="--device cuda: torch finds no CUDA device"):
            open_model(device="cuda", cam_backend="torch", checkpoint=small_checkpoint)
    auto = open_model(device="auto", cam_backend="torch", checkpoint=small_checkpoint)
    assert auto.provider == ("torch-cuda" if torch.cuda.is_available() else "torch-cpu")


def test_a_checkpoint_that_would_run_code_is_refused(small_checkpoint, tmp_path):
    """Checkpoints are unpickled with weights_only: one naming a function to call (here
    os.system) is refused before anything runs; real checkpoints, with the NumPy random
    state that training stores, still load."""
    import os

    import torch

    from pneumoscan.inference.model import ModelError
    from pneumoscan.modelling.checkpoint import read_checkpoint

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = read_checkpoint(small_checkpoint)
    hostile = tmp_path / "hostile.pt"
    torch.save({**payload, "config": RunsCode()}, hostile)
    with pytest.raises(ModelError, match="refused checkpoint .*GLOBAL posix.system"):
        read_checkpoint(hostile)
    assert not marker.exists()
    with pytest.raises(ModelError, match="refused checkpoint"):
        TorchHookCamModel(hostile)
    assert not marker.exists()
