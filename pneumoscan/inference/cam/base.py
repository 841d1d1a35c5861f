"""What every CAM backend provides: class probabilities and per-class CAMs for a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from pneumoscan.inference.model import ModelInfo


@dataclass
class Predictions:
    probabilities: np.ndarray  # (N, K) softmax over the model's classes
    cams: np.ndarray  # (N, K, h, w): CAM_k = sum_c w_kc A_c + b_k on the last conv maps
    scope_scores: np.ndarray | None = None  # (N,) out-of-distribution score, when the model has one


class CamModel(ABC):
    info: ModelInfo
    provider: str
    # How many batches the pipeline may run through the model at once (from as many
    # threads): one unless the backend says its batches share the cores better side by side.
    concurrent_batches: int = 1

    @abstractmethod
    def predict(self, batch: np.ndarray) -> Predictions:
        """batch: float32 (N, C, H, W), already preprocessed."""


def normalised_cams(cams: np.ndarray, class_index: np.ndarray) -> np.ndarray:
    """The CAM of each image's decided class, min-max scaled to [0, 1]: (N, h, w) float32."""
    picked = cams[np.arange(len(cams)), class_index].astype(np.float32)
    lo = picked.min(axis=(1, 2), keepdims=True)
    span = picked.max(axis=(1, 2), keepdims=True) - lo
    return np.divide(picked - lo, span, out=np.zeros_like(picked), where=span > 0)
