"""Discovery: recognition by content, and every entry of a messy folder accounted for."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import PNEUMONIA_JPEG as JPEG
from conftest import SAMPLES, make_messy_folder

from pneumoscan.inputs.discover import HEAD_BYTES, detect_kind, discover, identify_file
from pneumoscan.inputs.loading import load
from pneumoscan.records import LoadedImage

DICOM_TIFF = SAMPLES / "dicom" / "RG1_UNCR.dcm"  # preamble holds a TIFF header
DICOM = SAMPLES / "dicom" / "RG3_J2KI.dcm"


def head(path: Path) -> bytes:
    return path.read_bytes()[:HEAD_BYTES]


@pytest.mark.parametrize("path, kind", [
    (JPEG, "jpeg"), (DICOM, "dicom"), (DICOM_TIFF, "dicom"),
], ids=lambda value: getattr(value, "name", value))
def test_kind_by_content(path, kind):
    assert detect_kind(head(path)) == kind


def test_headerless_dicom_recognised():
    # (0008,0000) UL 4 then (0008,0008) CS 'ORIGINAL', implicit VR, as old CR files start.
    data = (b"\x08\x00\x00\x00\x04\x00\x00\x00\x1e\x01\x00\x00"
            b"\x08\x00\x08\x00\x08\x00\x00\x00ORIGINAL")
    assert detect_kind(data + bytes(100)) == "dicom"
    # The same group but tags going backwards is not a data set.
    assert detect_kind(data[12:] + data[:12] + bytes(100)) is None


@pytest.mark.parametrize("data", [b"", b"hello world\n" * 40, b"\x08\x00" + bytes(510),
                                  b"%PDF-1.7\n" + bytes(300)])
def test_other_content_is_unknown(data):
    assert detect_kind(data) is None


def test_name_does_not_decide(tmp_path):
    disguised = tmp_path / "photo.png"
    shutil.copy(JPEG, disguised)
    no_suffix = tmp_path / "IM0001"
    shutil.copy(DICOM, no_suffix)
    assert identify_file(disguised).kind == "jpeg"
    assert identify_file(no_suffix).kind == "dicom"


def test_every_entry_is_accounted_for(tmp_path):
    expected = make_messy_folder(tmp_path)
    found = list(discover(tmp_path))
    assert [item.path for item in found] == sorted(
        (item.path for item in found), key=lambda p: p.relative_to(tmp_path).parts)
    assert {item.path: item.kind or item.skip_reason for item in found} == expected
    assert not any(item.unreadable for item in found)


def test_non_utf8_file_name(tmp_path):
    raw_name = os.path.join(os.fsencode(tmp_path), b"caf\xe9 scan.jpeg")  # Latin-1 name
    try:
        shutil.copy(JPEG, raw_name)
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    [item] = discover(tmp_path)
    assert os.fsencode(item.path) == raw_name and item.kind == "jpeg"
    assert isinstance(load(item), LoadedImage)


def test_a_file_as_root(tmp_path):
    assert list(discover(JPEG)) == [identify_file(JPEG)]


def test_file_gone_during_discovery_is_an_error(tmp_path):
    item = identify_file(tmp_path / "gone.jpeg")
    assert (item.kind, item.skip_reason, item.unreadable) == (
        None, "file disappeared during discovery", True)
    assert load(item).status == "error"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any folder")
def test_unlistable_folder_is_an_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        [item] = discover(tmp_path)
    finally:
        locked.chmod(0o755)
    assert item.path == locked and item.unreadable
    assert item.skip_reason.startswith("cannot list folder")
