"""Where the test inputs are: the committed `samples/`, and the shared data folder that
sits beside the clone (`../shared/data`) for files that may not be committed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pneumoscan.discover import classify_file
from pneumoscan.loading import load
from pneumoscan.records import FileResult, LoadedImage

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SHARED = REPO.parent / "shared" / "data"


def load_file(path: Path) -> LoadedImage | FileResult:
    """The way `pneumoscan run` reads a file: classified by content, then loaded."""
    return load(classify_file(path))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared test data not found at {SHARED}: clone beside ../shared/data "
                    "to run this test")
    return SHARED


@pytest.fixture(scope="session")
def dcmj2pnm() -> str:
    """The dcmtk renderer used as an independent reference."""
    exe = shutil.which("dcmj2pnm")
    if exe is None:
        pytest.skip("dcmj2pnm not installed (Debian package dcmtk)")
    return exe
