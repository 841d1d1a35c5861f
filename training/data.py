"""Training data: patient-level splitting and in-memory caching of decoded images.

Pixels come from `pneumoscan.inference.pipeline.read_model_pixels`, the file read as
`pneumoscan run` reads it, so training and inference see identical pixels.
"""

from __future__ import annotations

import numpy as np

from pneumoscan.evaluation.datasets import CLASS_NAMES, Sample
from pneumoscan.inference.pipeline import read_model_pixels
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.records import FileResult

__all__ = ["CLASS_NAMES", "Sample", "split_by_patient", "load_cached"]


def split_by_patient(samples: list[Sample], val_fraction: float,
                     seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified split with every patient's images on one side only. A patient counts as
    PNEUMONIA if any of their images is; each stratum is shuffled and cut separately."""
    patients: dict[str, int] = {}
    for s in samples:
        patients[s.patient] = max(patients.get(s.patient, 0), s.label)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in range(len(CLASS_NAMES)):
        group = sorted(p for p, lab in patients.items() if lab == label)
        rng.shuffle(group)
        val_patients.update(group[: round(len(group) * val_fraction)])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def load_cached(samples: list[Sample], prep: Preprocessing) -> tuple[np.ndarray, np.ndarray, list[str]]:
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
