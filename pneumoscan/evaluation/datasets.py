"""Labelled chest X-ray datasets: a Kermany/Kaggle root (`train/{NORMAL,PNEUMONIA}`, ...),
a single labelled folder (`{NORMAL,PNEUMONIA}/...`) or a CSV with `path,label[,patient]`
(DICOM datasets too). Used by training and by `pneumoscan eval`."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES
    patient: str


_PERSON = re.compile(r"^(person\d+)_")
_KERMANY_NORMAL = re.compile(r"^((?:NORMAL2-)?IM)-(\d+)-\d+")


def patient_id(path: Path) -> str:
    """Patient of a Kermany file name: `personN_...` -> personN; `IM-XXXX-YYYY` -> XXXX and
    `NORMAL2-IM-XXXX-YYYY` -> NORMAL2-XXXX (a different series). Other names are their own
    patient, which is the safe default for unknown data."""
    name = path.name
    if m := _PERSON.match(name):
        return m.group(1)
    if m := _KERMANY_NORMAL.match(name):
        prefix = "NORMAL2-" if m.group(1).startswith("NORMAL2") else ""
        return prefix + m.group(2)
    return path.stem


def _label_index(label: str) -> int:
    try:
        return CLASS_NAMES.index(label.strip().upper())
    except ValueError:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_NAMES}") from None


def samples_from_folder(root: Path) -> list[Sample]:
    """`root/NORMAL/*` and `root/PNEUMONIA/*` (recursively), sorted."""
    out = []
    for index, name in enumerate(CLASS_NAMES):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: expected {root}/{{NORMAL,PNEUMONIA}}")
        out += [Sample(p, index, patient_id(p)) for p in sorted(folder.rglob("*"))
                if p.is_file() and not p.name.startswith(".")]
    return out


def samples_from_csv(csv_path: Path) -> list[Sample]:
    """Rows `path,label[,patient]`; relative paths are relative to the CSV's folder."""
    out = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            path = Path(row["path"])
            if not path.is_absolute():
                path = csv_path.parent / path
            patient = (row.get("patient") or "").strip() or patient_id(path)
            out.append(Sample(path, _label_index(row["label"]), patient))
    return out


def list_samples(source: Path) -> list[Sample]:
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return samples_from_csv(source)
    if (source / "train").is_dir():
        return samples_from_folder(source / "train")
    return samples_from_folder(source)


VAL_SPLITS = ("random", "latest")


def split_by_patient(samples: list[Sample], val_fraction: float, seed: int, *,
                     fold: int = 0, how: str = "random") -> tuple[list[Sample], list[Sample]]:
    """Stratified split with every patient's images on one side only. A patient counts as
    PNEUMONIA if any of their images is; each stratum is cut separately.

    `how="random"`: each stratum shuffled (seeded) and its `fold`-th cut of `val_fraction`
    held out, so folds 0 .. 1/val_fraction - 1 make a patient-level cross-validation.
    `how="latest"`: the highest-numbered patients of each stratum and series held out
    (`patient_order`): Kermany's official VAL split continues TRAIN's numbering, so later
    patients are what a model meets next."""
    if how not in VAL_SPLITS:
        raise ValueError(f"unknown split {how!r}; expected one of {VAL_SPLITS}")
    if fold < 0 or (fold + 1) * val_fraction > 1 + 1e-9:
        raise ValueError(f"fold {fold} does not fit: folds of {val_fraction:g} run from 0 "
                         f"to {int(1 / val_fraction + 1e-9) - 1}")
    patients: dict[str, int] = {}
    for s in samples:
        patients[s.patient] = max(patients.get(s.patient, 0), s.label)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in range(len(CLASS_NAMES)):
        group = sorted(p for p, lab in patients.items() if lab == label)
        if how == "latest":
            series: dict[str, list[str]] = {}
            for p in sorted(group, key=patient_order):
                series.setdefault(patient_order(p)[0], []).append(p)
            for members in series.values():
                val_patients.update(members[len(members) - round(len(members) * val_fraction):])
            continue
        rng.shuffle(group)
        n = len(group)
        val_patients.update(group[round(n * val_fraction * fold):
                                  round(n * val_fraction * (fold + 1))])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


_LAST_NUMBER = re.compile(r"(\d+)\D*$")


def patient_order(patient: str) -> tuple[str, int, str]:
    """(series, number, id) of a patient id: its last number, and what comes before it as
    the series (`person1946` -> person, 1946; `NORMAL2-1427` -> NORMAL2-, 1427; `0154` ->
    the unnamed series, 154). Ids without a number form one series, in name order."""
    if m := _LAST_NUMBER.search(patient):
        return patient[: m.start()], int(m.group(1)), patient
    return "", -1, patient
