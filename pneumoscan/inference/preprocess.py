"""Model input from loaded pixels, driven entirely by the model's own metadata.

Training (training/) and inference call the same functions, so both see identical pixels.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RESIZE_MODES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input. `resize` squashes to (height, width) without keeping
    the aspect ratio, as the Kermany 224 px training set was made. `jpeg_quality`, when
    set, passes the resized image through JPEG at that quality: a model trained on the
    Kermany 224 px images as they are (quality-75 JPEGs) reads those compression artefacts
    as part of the image, so its inputs must carry the same ones. Models trained with the
    storage augmentation (the default model since 2026.12.01) do without."""
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"
    jpeg_quality: int | None = None

    @property
    def decode_size(self) -> tuple[int, int]:
        """(width, height) that a decoder reducing as it decodes (JPEG in the DCT domain,
        JPEG 2000 by wavelet levels, box averaging otherwise) must still cover: twice the
        model's input, so that the final resize still smooths whatever the reduction left.
        Reduced straight to the model's size, a scan's score moves with the reduction
        method: on the 116 Kermany originals stored ten ways (benchmarks/bench_robustness.py)
        the mean |dp| was 0.0139 and 21 decisions flipped; from twice the size, 0.0097 and 11.
        Training, evaluation, the export's parity check and `run` all decode at it, so the
        network gets the same pixels from a file whichever of them reads it."""
        return (2 * self.width, 2 * self.height)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def prepare_pixels(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (H, W) -> uint8 (height, width): resized, then JPEG round trip if asked."""
    img = Image.fromarray(pixels)
    if pixels.shape != (prep.height, prep.width):
        img = img.resize((prep.width, prep.height), RESIZE_MODES[prep.resize])
    if prep.jpeg_quality is not None:
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=prep.jpeg_quality)
        img = Image.open(buffer)
    return np.asarray(img, dtype=np.uint8)


def normalise(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W) greyscale -> float32 (N, C, H, W), grey replicated to C channels:
    (x / 255 - mean) / std, in float32. The scaling is done once for all channels and each
    channel's two operations write in place into the output (2.8 ms for a batch of 32 at
    224 px, against 10.5 for a lookup table of the 256 levels and 6.4 for one expression
    over the broadcast batch, which allocates its temporaries)."""
    scaled = batch.astype(np.float32) * np.float32(1 / 255)
    mean = np.asarray(prep.mean, np.float32)
    inv_std = 1 / np.asarray(prep.std, np.float32)
    out = np.empty((len(batch), prep.channels, *batch.shape[1:]), np.float32)
    for channel in range(prep.channels):
        np.subtract(scaled, mean[channel], out=out[:, channel])
        np.multiply(out[:, channel], inv_std[channel], out=out[:, channel])
    return out


def reduced_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most `longest`; never up."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def reduced(pixels: np.ndarray, longest: int) -> np.ndarray:
    """uint8 (H, W) scaled down so that its longest side is at most `longest` (never up):
    bilinear, with Pillow's reducing gap so that a large scan is box-averaged first."""
    height, width = pixels.shape
    size = reduced_size(width, height, longest)
    if size == (width, height):
        return pixels
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def model_input(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """One image: uint8 (H, W) -> float32 (C, height, width)."""
    return normalise(prepare_pixels(pixels, prep)[None], prep)[0]
