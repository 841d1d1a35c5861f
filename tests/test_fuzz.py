"""A seeded fuzz corpus of mutated DICOM files through `pneumoscan run --out x.pdf
--per-study DIR`: the run ends in bounded time, accounts for every file, and says what it
has to say in printable lines of bounded length (issue 11: such a corpus once stalled
rendering for good and wrote 517 KB of raw header bytes to stderr)."""

from __future__ import annotations

import copy
import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumoscan import api

from conftest import DICOM_SAMPLES, cr_dataset, run_pneumoscan, save

SEED = 11
FILES = 300
# Values of the length that once stalled rendering.
LONG_VALUE_CHARS = (150_000, 400_000)
TEXT_KEYWORDS = ("PatientName", "PatientID", "StudyInstanceUID", "StudyDescription",
                 "AccessionNumber", "BodyPartExamined", "ViewPosition", "Modality",
                 "SeriesDescription")
NUMBER_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
HOSTILE_NUMBERS = ("NaN", "inf", "-inf", "1e308", "-1e308", "0", "-1")
UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def random_text(rng: random.Random, length: int) -> str:
    """Any characters a byte can be read as, control characters and NUL included."""
    return rng.randbytes(length).decode("latin-1")


def base_datasets(chest: np.ndarray) -> list[pydicom.Dataset]:
    """A real chest radiograph, as a small CR data set with the usual text, and a real CR
    file (JPEG 2000) as its vendor wrote it."""
    image = np.asarray(Image.fromarray(chest).resize((96, 96)), dtype=np.uint16) * 16
    small = cr_dataset(image, BitsStored=12, PatientID="P-1", StudyDescription="CHEST PA",
                       AccessionNumber="A1", StudyDate="20240102", RescaleSlope=1,
                       RescaleIntercept=0, WindowCenter=2048, WindowWidth=4096)
    return [small, pydicom.dcmread(DICOM_SAMPLES / "RG1_J2KI.dcm")]


def mutate(rng: random.Random, ds: pydicom.Dataset, real_pixels: bool) -> pydicom.Dataset:
    """The data set with one to three values replaced: long text, hostile numbers."""
    ds = copy.deepcopy(ds)  # Dataset.copy shares its elements with the original
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.6:
            length = rng.choice([rng.randint(1, 80), rng.randint(*LONG_VALUE_CHARS)])
            setattr(ds, rng.choice(TEXT_KEYWORDS), random_text(rng, length))
        elif not real_pixels:
            setattr(ds, rng.choice(NUMBER_KEYWORDS), rng.choice(HOSTILE_NUMBERS))
    return ds


def flip_bytes(rng: random.Random, data: bytes, span: int) -> bytes:
    """`data` with a few bytes in its first `span` bytes set at random, and perhaps cut."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        data[rng.randrange(min(span, len(data)))] = rng.randrange(256)
    if rng.random() < 0.2:
        del data[rng.randrange(132, len(data)):]
    return bytes(data)


def write_corpus(folder: Path, chest: np.ndarray) -> list[Path]:
    rng = random.Random(SEED)
    bases = base_datasets(chest)
    folder.mkdir()
    paths = []
    for index in range(FILES):
        real = index % 10 == 0  # one in ten from the real vendor file
        ds = mutate(rng, bases[real], real)
        path = folder / f"{index:03}.dcm"
        with warnings.catch_warnings():  # pydicom warns of the values it is made to write
            warnings.simplefilter("ignore")
            save(ds, path)
        if rng.random() < 0.7:
            # The real file's pixel data is left whole: only its header is fuzzed.
            span = 4096 if real else path.stat().st_size
            path.write_bytes(flip_bytes(rng, path.read_bytes(), span))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_a_fuzzed_corpus_is_accounted_for_in_bounded_time(tmp_path, chest, shipped_model):
    files = write_corpus(tmp_path / "fuzz", chest)
    out = tmp_path / "out"
    run = run_pneumoscan("run", tmp_path / "fuzz", "--out", out / "x.pdf", "--per-study",
                         out / "studies", "--json", out / "x.json", "--model", shipped_model,
                         timeout=300)
    assert run.returncode in (api.EXIT_OK, api.EXIT_UNREADABLE), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert not UNPRINTABLE.search(run.stderr), "control characters on stderr"
    # One line per file not classified, and a few besides: nothing raw from the files.
    assert len(run.stderr.splitlines()) <= FILES + 5
    assert max(map(len, run.stderr.splitlines())) <= 1000

    results = json.loads((out / "x.json").read_text())["results"]
    assert sorted(Path(r["path"]) for r in results) == files
    statuses = {r["status"] for r in results}
    assert "ok" in statuses and "error" in statuses
    for result in results:
        if result["status"] != "ok":
            reason = result["reason"]
            assert reason and len(reason) <= 500 and not UNPRINTABLE.search(reason), result
            # Bad data is said about the file; only a bug of ours is said to be one.
            assert "pneumoscan bug" not in reason, result
        study = [result["study"]] if result["study"] is not None else []  # None: not an image
        for value in [*study, *result["metadata"].values()]:
            # Up to DICOM_MAX_VALUES values, each within its VR's length (PN: 194).
            assert max(map(len, value.split("\\"))) <= 194, result
            assert not UNPRINTABLE.search(value), result
    html = [path.read_text() for path in (out / "studies").glob("*.html")]
    assert html and not any("\x00" in text for text in html)
