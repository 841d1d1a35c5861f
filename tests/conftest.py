"""Shared fixtures. Test inputs are committed: `samples/` (the Kermany validation originals
and pydicom-data DICOM files) and `tests/data/` (the same Kermany images at the model's
size, see its README), or written by the tests. Only the shipped model's evaluation on
sets that may not be committed reads the data folder beside the clone (`../shared/data`)
and skips, saying so, without it."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

import pneumoscan

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED = REPO.parent / "shared" / "data"
TEST_DATA = REPO / "tests" / "data"
KERMANY224 = TEST_DATA / "kermany224"  # {NORMAL,PNEUMONIA}/*.jpeg, 224 x 224 RGB
DICOM_SAMPLES = SAMPLES / "dicom"
SAMPLE_JPEG = SAMPLES / "study-normal-1" / "NORMAL2-IM-1427-0001.jpeg"  # 1776 x 1416
PNEUMONIA_JPEG = SAMPLES / "study-pneumonia-1" / "person1946_bacteria_4874.jpeg"


def pneumoscan_command(*args) -> list[str]:
    """`pneumoscan ARGS` for subprocess (with CLI_ENV: the package under test)."""
    return [sys.executable, "-m", "pneumoscan", *map(str, args)]


# For subprocesses: the pneumoscan package these tests import, installed or not. They run
# from the tests folder: `python -m` puts the working directory first on sys.path, and from the
# repository root that would be the source tree, which lacks the installed `templates`.
CLI_ENV = {**os.environ, "PYTHONPATH": str(Path(pneumoscan.__file__).parents[1])}
CLI_CWD = Path(__file__).resolve().parent


def run_pneumoscan(*args, timeout: float = 300,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pneumoscan ARGS` in a subprocess; `env`: variables to add to CLI_ENV."""
    return subprocess.run(pneumoscan_command(*args), env={**CLI_ENV, **(env or {})}, cwd=CLI_CWD,
                          capture_output=True, text=True, timeout=timeout)


def invoke_cli(*args):
    """Run the click CLI in-process, as a user would from the shell."""
    from click.testing import CliRunner

    from pneumoscan.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def shared_path(*parts: str) -> Path:
    """A set that may not be committed (see ../shared/data/README.md), for the shipped
    model's evaluation only."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"evaluation data that may not be committed is absent: {path} "
                    "(the data folder beside the clone, ../shared/data)")
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """ORT's optimised graphs go to a temporary cache, not the user's."""
    folder = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PNEUMOSCAN_CACHE_DIR", str(folder))
    yield folder
    patch.undo()


def remove_tree(root: Path) -> None:
    """Remove a folder tree of any depth with no recursion, deepest folders first (shutil's
    rmtree recurses once per level before Python 3.12)."""
    pending = [root]
    while pending:
        folder = pending[-1]
        with os.scandir(folder) as entries:
            subfolders = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        if subfolders:
            pending.extend(subfolders)
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                os.unlink(entry.path)
        os.rmdir(folder)
        pending.pop()


def installed_program(name: str, debian_package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} not installed (Debian package {debian_package})")
    return exe


@pytest.fixture(scope="session")
def dcmj2pnm() -> str:
    """The dcmtk renderer used as an independent reference."""
    return installed_program("dcmj2pnm", "dcmtk")


@pytest.fixture(scope="session")
def pdftotext() -> str:
    """poppler's PDF to text converter, to read what a PDF report says."""
    return installed_program("pdftotext", "poppler-utils")


def kermany_label(path: Path) -> str:
    """Kermany names: `NORMAL2-IM-*` and `IM-*` are NORMAL, `person*` PNEUMONIA."""
    return "PNEUMONIA" if path.name.startswith("person") else "NORMAL"


SAMPLE_JPEGS = sorted(SAMPLES.glob("study-*/*.jpeg"), key=lambda p: p.name)


def copies_of_kermany224(root: Path, count: int, studies: int = 1) -> None:
    """`count` real 224 px images in `studies` folders under `root`, NORMAL and PNEUMONIA
    alternately: the committed ones, each copied under several names when `count` needs more
    (every file is a path of its own to discovery, the ledger and the engines)."""
    sources = [path for pair in zip(*(sorted((KERMANY224 / label).iterdir())
                                      for label in ("NORMAL", "PNEUMONIA")))
               for path in pair]
    for index in range(count):
        source = sources[index % len(sources)]
        study = root / f"study-{index // 2 % studies}"  # a NORMAL and a PNEUMONIA image each
        target = study / f"{source.stem}-{index}{source.suffix}"
        study.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


@pytest.fixture(scope="session")
def kermany224() -> Path:
    return KERMANY224


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The model shipped inside the package, as `run` uses it without --model."""
    from pneumoscan.inference.model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def val_images(tmp_path_factory) -> Path:
    """The 16 official Kermany VAL originals of samples/, in labelled folders."""
    root = tmp_path_factory.mktemp("kermany-val-original")
    for path in SAMPLE_JPEGS:
        (root / kermany_label(path)).mkdir(exist_ok=True)
        shutil.copy(path, root / kermany_label(path) / path.name)
    return root


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A real (briefly) fine-tuned EfficientNet-Lite0 checkpoint: ImageNet weights, a few
    steps on the committed chest X-rays at 128 px, for what needs a checkpoint (the torch CAM
    backend, export, quantisation) or a model of another size than the shipped one."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("small-model")
    cfg = TrainConfig(data=str(KERMANY224), out=str(out), image_size=128, epochs=1,
                      batch_size=8, max_steps_per_epoch=3,
                      unfreeze_epochs=(1,), warmup_steps=1, val_fraction=0.3)
    train(cfg, log=lambda msg: None)
    return out / "best.pt"


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory, small_checkpoint, val_images) -> Path:
    from pneumoscan.modelling.export import export_checkpoint

    out = tmp_path_factory.mktemp("small-onnx") / "model.onnx"
    export_checkpoint(small_checkpoint, out, check_images=val_images, version="test",
                      log=lambda msg: None)
    return out


# --- test inputs made from the real samples --------------------------------------------

@pytest.fixture(scope="session")
def chest() -> np.ndarray:
    """A real chest X-ray, reduced: source for the formats written below."""
    with Image.open(SAMPLE_JPEG) as img:
        return np.asarray(img.reduce(4))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))



def cr_dataset(pixels: np.ndarray, **attributes) -> Dataset:
    """A frontal chest CR data set holding `pixels` uncompressed; `attributes` override or,
    when None, remove elements."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.PatientName = "Test^Patient"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "BitsStored" in attributes:
        ds.HighBit = ds.BitsStored - 1
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """As a DICOM file; encoded explicit VR little endian, which every syntax used here is."""
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


RAMP_12_BIT = np.arange(4096, dtype=np.uint16).reshape(64, 64)


def make_messy_folder(root: Path) -> dict[Path, str | None]:
    """A folder with everything discovery must cope with; returns each entry that must be
    reported and its expected kind or skip reason."""
    study = root / "study 1" / "series a"
    study.mkdir(parents=True)
    (root / ".cache").mkdir()
    shutil.copy(PNEUMONIA_JPEG, root / ".cache" / "thumb.jpeg")
    expected: dict[Path, str | None] = {
        study / "chest pa.jpeg": "jpeg",
        study / "IM0001": "dicom",
        root / "notes.dcm": "unknown file type (not DICOM, PNG, JPEG or TIFF)",
        root / ".DS_Store": "hidden file",
        root / ".cache": "hidden folder, not entered",
        root / "empty.png": "empty file (0 bytes)",
        root / "loop": "symbolic link loop",
        root / "study 1" / "up": "symbolic link to a folder, not followed",
        root / "dangling.jpeg": "broken symbolic link (its target does not exist)",
        root / "pipe": "not a regular file (device, pipe or socket)",
        root / "link to chest.jpeg": "jpeg",
    }
    shutil.copy(PNEUMONIA_JPEG, study / "chest pa.jpeg")
    shutil.copy(DICOM_SAMPLES / "RG3_J2KI.dcm", study / "IM0001")
    (root / "notes.dcm").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "empty.png").touch()
    os.symlink("loop", root / "loop")
    os.symlink("..", root / "study 1" / "up")
    os.symlink("missing.jpeg", root / "dangling.jpeg")
    os.mkfifo(root / "pipe")  # opening it would block: must not be read
    os.symlink(study / "chest pa.jpeg", root / "link to chest.jpeg")
    return expected
