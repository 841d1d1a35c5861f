"""Find the input files under a folder (first stage of the pipeline).

File types are recognised by content, not by name. Every file found is returned: the ones
that will not be read carry the reason in `skip_reason`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from .records import FileKind, InputFile

# Value representations that may open an implicit- or explicit-VR DICOM data set.
_DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
              b"LT", b"OB", b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS",
              b"ST", b"TM", b"UI", b"UL", b"UN", b"US", b"UT", b"UC", b"UR", b"OV", b"SV",
              b"UV"}


def detect_kind(head: bytes) -> FileKind | None:
    """The image type of a file from its first 132+ bytes, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if _looks_like_raw_dicom(head):
        return "dicom"
    return None


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble and file meta header: it
    starts with a little-endian element of group 0x0008 (or 0x0002) and a plausible
    length or VR, as old CR files do."""
    if len(head) < 12:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if head[4:6] in _DICOM_VRS:  # explicit VR
        return True
    (length,) = struct.unpack("<I", head[4:8])  # implicit VR: 32-bit length
    return length < 1024


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(256)


def classify_file(path: Path) -> InputFile:
    """Decide whether and how one file will be read."""
    if path.name.startswith("."):
        return InputFile(path, None, "hidden file")
    try:
        if path.stat().st_size == 0:
            return InputFile(path, None, "empty file (0 bytes)")
        head = _read_head(path)
    except FileNotFoundError:
        return InputFile(path, None, "file disappeared during discovery")
    except OSError as exc:
        return InputFile(path, None, f"cannot open: {exc.strerror or exc}")
    kind = detect_kind(head)
    if kind is None:
        return InputFile(path, None, "unknown file type (not DICOM, PNG, JPEG or TIFF)")
    return InputFile(path, kind)


def discover(root: Path) -> Iterator[InputFile]:
    """Every file under `root` (or `root` itself), in a stable sorted order. Hidden folders
    are not entered; symlinked folders are not followed, so symlink loops are harmless."""
    root = Path(root)
    if root.is_file():
        yield classify_file(root)
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        hidden = [d for d in dirnames if d.startswith(".")]
        for name in hidden:
            dirnames.remove(name)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                yield InputFile(path, None, "broken or looping symbolic link")
                continue
            yield classify_file(path)
