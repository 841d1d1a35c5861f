"""Training data: in-memory caching of decoded images (the patient-level split is
`pneumoscan.evaluation.datasets.split_by_patient`, which the CLI's scope-guard uses too).

Pixels come from `pneumoscan.inference.pipeline.read_model_pixels`, the file read as
`pneumoscan run` reads it, so training and inference see identical pixels.
"""

from __future__ import annotations

import numpy as np

from pneumoscan.evaluation.datasets import Sample
from pneumoscan.inference.pipeline import read_model_pixels
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.records import FileResult

__all__ = ["load_cached"]


def load_cached(samples: list[Sample], prep: Preprocessing
                ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode every sample once through pneumoscan's loader and bring it to the model's
    input size (and JPEG round trip) as inference does: uint8 (N, H, W), labels (N,), and
    the reasons of files that were left out."""
    images, labels, problems = [], [], []
    for s in samples:
        pixels = read_model_pixels(s.path, prep)
        if isinstance(pixels, FileResult):
            problems.append(f"{s.path}: {pixels.status}: {pixels.reason}")
            continue
        images.append(pixels)
        labels.append(s.label)
    if not images:
        raise RuntimeError("no readable images in the dataset")
    return np.stack(images), np.asarray(labels, dtype=np.int64), problems
