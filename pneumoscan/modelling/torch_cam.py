"""Reference CAMs from a PyTorch checkpoint: a forward hook on the last convolutional
block captures the feature maps A, and CAM_k = sum_c w_kc A_c + b_k with the classifier's
own weights (exact for a GAP + linear head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.inference.cam.base import CamModel, Predictions
from pneumoscan.inference.model import DEVICES, ModelError


# What class_maps computes, as models record it (metadata `cam_method`) and outputs name it.
CAM_METHOD = "CAM"


def class_maps(maps, classifier):
    """(N, K, h, w) CAMs of the (N, C, h, w) last conv maps: CAM_k = sum_c w_kc A_c + b_k,
    the linear head applied at every position (a 1x1 convolution). The export's `cams`
    output and this reference both compute it here."""
    from torch.nn import functional as F

    return F.conv2d(maps, classifier.weight[:, :, None, None], classifier.bias)


class TorchHookCamModel(CamModel):
    """`device` as `run --device`: "cuda" fails when torch has no CUDA device, "auto" takes
    it when there is one."""

    def __init__(self, checkpoint: Path, device: str = "auto"):
        import torch

        from pneumoscan.modelling.checkpoint import checkpoint_model_info, load_network

        if device not in DEVICES:
            raise ModelError(f"unknown device {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("--device cuda: torch finds no CUDA device (no GPU, or a torch "
                             "built without CUDA); use --device cpu or auto")
        self.torch = torch
        on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if on_cuda else "cpu")
        self.network, payload = load_network(checkpoint)
        self.network.to(self.device).eval()
        self.info = checkpoint_model_info(checkpoint, payload)
        self.provider = f"torch-{self.device.type}"
        self._maps = None
        self.network.features.register_forward_hook(self._keep_maps)

    def _keep_maps(self, module, inputs, output) -> None:
        self._maps = output.detach()

    def predict(self, batch: np.ndarray) -> Predictions:
        torch = self.torch
        with torch.no_grad():
            logits = self.network(torch.from_numpy(batch).to(self.device))
            cams = class_maps(self._maps, self.network.classifier)
        return Predictions(torch.softmax(logits, 1).cpu().numpy(), cams.cpu().numpy())
