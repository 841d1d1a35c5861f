"""CAMs from the exported model's own `cams` output, computed by ONNX Runtime in the same
run as the classification (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model import open_session, read_model_info
from .base import CamModel, Predictions


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class OnnxCamModel(CamModel):
    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        self.session, self.provider = open_session(path, device, threads)
        self.info = read_model_info(Path(path), self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> Predictions:
        logits, cams = self.session.run(["logits", "cams"], {self.input_name: batch})
        return Predictions(softmax(logits), cams)
