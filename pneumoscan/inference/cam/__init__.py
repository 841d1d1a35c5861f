"""Classification + Class Activation Maps, one backend per file.

`onnx_cam.OnnxCamModel` (the run path: ONNX Runtime, no torch) and
`pneumoscan.modelling.torch_cam.TorchHookCamModel` (the reference: a PyTorch checkpoint with a
forward hook).
"""

from pneumoscan.inference.cam.base import CamModel, Predictions, normalised_cams

__all__ = ["CamModel", "Predictions", "normalised_cams"]
