"""Find the input files under a folder (first stage of the pipeline).

File types are recognised by content, not by name. Nothing found is dropped: files and
folders that will not be read (hidden, unknown type, symbolic links to folders, link loops,
unlistable folders) are returned too, with the reason in `skip_reason`.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from pneumoscan.inputs.reading import InputChanged, read_head
from pneumoscan.records import FileKind, InputFile

HEAD_BYTES = 512
# Folders deeper than this under the scanned one are not entered (real exports nest a few
# levels; thousands are an accident or an attack).
MAX_DEPTH = 64

# Value representations of explicit-VR DICOM; the ones in _LONG_VRS have a 32-bit length.
_DICOM_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
              b"LT", b"OB", b"OD", b"OF", b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS",
              b"ST", b"TM", b"UI", b"UL", b"UN", b"US", b"UT", b"UC", b"UR", b"OV", b"SV",
              b"UV"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OW", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED_LENGTH = 0xFFFFFFFF


def detect_kind(head: bytes) -> FileKind | None:
    """The image type of a file from its first bytes (HEAD_BYTES suffice), or None."""
    # DICOM first: the 128-byte preamble may itself be a TIFF header (dual-personality
    # DICOM/TIFF files such as RG1_UNCR.dcm).
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if _looks_like_headerless_dicom(head):
        return "dicom"
    return None


def _looks_like_headerless_dicom(head: bytes) -> bool:
    """A DICOM data set written without preamble and file meta header, as old CR files
    are: at least two little-endian elements (implicit or explicit VR) with ascending tags,
    starting in group 0x0002 or 0x0008."""
    if head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    offset, previous_tag, elements = 0, -1, 0
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        tag = group << 16 | element
        if tag <= previous_tag:
            break
        vr = head[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, offset + 8)
            offset += 12
        elif vr in _DICOM_VRS:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            offset += 8
        else:  # implicit VR: 32-bit length
            (length,) = struct.unpack_from("<I", head, offset + 4)
            offset += 8
        elements += 1
        if length == _UNDEFINED_LENGTH:  # a sequence: its items follow, not the next tag
            break
        offset += length
        previous_tag = tag
    return elements >= 2


def identify_file(path: Path) -> InputFile:
    """Decide whether and how one file will be read. Symbolic links to files are followed;
    links to folders are not (they could loop or leave the scanned tree)."""
    if path.name.startswith("."):
        return InputFile(path, None, "hidden file")
    try:
        link = path.is_symlink()
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            return InputFile(path, None, "symbolic link to a folder, not followed"
                             if link else "a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            return InputFile(path, None, "not a regular file (device, pipe or socket)")
        if info.st_size == 0:
            return InputFile(path, None, "empty file (0 bytes)")
        head = read_head(path, HEAD_BYTES, follow_link=link)
    except FileNotFoundError:
        if path.is_symlink():
            return InputFile(path, None, "broken symbolic link (its target does not exist)")
        return InputFile(path, None, "file disappeared during discovery", unreadable=True)
    except InputChanged as exc:
        return InputFile(path, None, f"changed during discovery: {exc}", unreadable=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return InputFile(path, None, "symbolic link loop")
        return InputFile(path, None, f"cannot open: {exc.strerror or exc}", unreadable=True)
    kind = detect_kind(head)
    if kind is None:
        return InputFile(path, None, "unknown file type (not DICOM, PNG, JPEG or TIFF)")
    return InputFile(path, kind, link=link)


def discover(root: Path) -> Iterator[InputFile]:
    """Every entry under `root` (or `root` itself when it is a file), depth first in a
    stable sorted order. Hidden and symbolically linked folders are reported, not entered,
    as are folders nested more than MAX_DEPTH deep."""
    root = Path(root)
    if not root.is_dir():
        yield identify_file(root)
        return
    # A stack of sorted listings rather than recursion: a folder tree may be deeper than
    # Python's call stack.
    stack = [iter(_listing(root))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif isinstance(entry, InputFile):
            yield entry
        elif not entry.is_dir(follow_symlinks=False):
            yield identify_file(Path(entry.path))
        elif entry.name.startswith("."):
            yield InputFile(Path(entry.path), None, "hidden folder, not entered")
        elif len(stack) > MAX_DEPTH:
            yield InputFile(Path(entry.path), None,
                            f"folder nested more than {MAX_DEPTH} deep, not entered")
        else:
            stack.append(iter(_listing(Path(entry.path))))


def _listing(folder: Path) -> list[os.DirEntry | InputFile]:
    """The entries of `folder` sorted by name, or the folder itself as an unreadable entry
    when it cannot be listed."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        return [*entries]
    except OSError as exc:
        return [InputFile(folder, None, f"cannot list folder: {exc.strerror or exc}",
                          unreadable=True)]
