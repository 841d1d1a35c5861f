"""Model input from loaded pixels, driven entirely by the model's own metadata.

Training (training/) and inference call the same functions, so both see identical pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RESIZE_MODES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input. `resize` squashes to (height, width) without keeping
    the aspect ratio, as the Kermany 224 px training set was made."""
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def resize_pixels(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (H, W) -> uint8 (height, width)."""
    if pixels.shape == (prep.height, prep.width):
        return pixels
    img = Image.fromarray(pixels)
    return np.asarray(img.resize((prep.width, prep.height), RESIZE_MODES[prep.resize]))


def normalise(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W) greyscale -> float32 (N, C, H, W), grey replicated to C channels."""
    x = batch.astype(np.float32)[:, None] * np.float32(1 / 255)
    mean = np.asarray(prep.mean, np.float32)[None, :, None, None]
    inv_std = 1 / np.asarray(prep.std, np.float32)[None, :, None, None]
    return (x - mean) * inv_std


def model_input(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """One image: uint8 (H, W) -> float32 (C, height, width)."""
    return normalise(resize_pixels(pixels, prep)[None], prep)[0]
