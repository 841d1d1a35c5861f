"""Shared fixtures. Test inputs are the committed `samples/` and the real data folder that
sits beside the clone (`../shared/data`, see its README) for files that may not be
committed; tests that need it skip with a clear reason when it is absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pneumoscan
from pneumoscan.inputs.discover import classify_file
from pneumoscan.inputs.loading import load
from pneumoscan.records import FileResult, LoadedImage

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED = REPO.parent / "shared" / "data"


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


def load_file(path: Path, min_size: tuple[int, int] | None = None) -> LoadedImage | FileResult:
    """The way `pneumoscan run` reads a file: classified by content, then loaded (at a
    size that covers `min_size`, for the decoders that can scale while decoding)."""
    return load(classify_file(path), min_size=min_size)


def invoke_cli(*args):
    """Run the click CLI in-process, as a user would from the shell."""
    from click.testing import CliRunner

    from pneumoscan.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (clone beside ../shared/data)")
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """ORT's optimised graphs go to a temporary cache, not the user's."""
    folder = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("PNEUMOSCAN_CACHE_DIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()


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


@pytest.fixture(scope="session")
def kermany_train() -> Path:
    return shared_path("kermany224", "train")


@pytest.fixture(scope="session")
def val_images() -> Path:
    return shared_path("kermany-val-original")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, kermany_train) -> Path:
    """A real (briefly) fine-tuned EfficientNet-Lite0 checkpoint: ImageNet weights, a few
    steps on real chest X-rays at 128 px, so tests need neither a GPU nor the shipped model."""
    from training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("small-model")
    cfg = TrainConfig(data=str(kermany_train), out=str(out), image_size=128, epochs=1,
                      batch_size=8, limit_samples=24, max_steps_per_epoch=3,
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
