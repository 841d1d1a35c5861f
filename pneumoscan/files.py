"""Files: their content hash, and writing them safely."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_TEMPORARY_SUFFIX = ".tmp"
HASH_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    """Hex SHA-256 of the file's content, read in chunks (models and scans can be large)."""
    with open(path, "rb") as fh:
        return sha256_of_stream(fh)


def sha256_of_stream(fh: BinaryIO) -> str:
    """Hex SHA-256 of what is left to read in `fh`, in chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


@contextmanager
def atomic_path(path: Path, mode: int = 0o600) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (itself or through a library);
    renamed onto `path` if the block ends normally, removed if it raises: readers never see
    a partial file. Reports hold patient data, hence owner-only permissions by default."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path),
                               suffix=_TEMPORARY_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """`data` written to `path` through `atomic_path`, on disk before the rename."""
    write_atomic_chunks(path, [data], mode)


def write_atomic_chunks(path: Path, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """`write_atomic` of the concatenated `chunks`, written as they come: a large output
    is never whole in memory."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def open_private(path: Path, flags: int) -> int:
    """A descriptor of the file `path` opened with `flags` (O_CREAT makes it 0600), never
    through a symbolic link: state files and logs hold patient data, which a link placed
    there would send wherever it points. An existing file is made owner-only (0600) if it
    was not. Raises OSError (its strerror says why)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "it is a symbolic link: refused (patient data would be "
                                     "written where it points); remove the link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def study_file_stem(study_key: str) -> str:
    """A file name stem for a study, safe on any file system and distinct for distinct
    keys: up to 60 of the key's plain characters (its end, the most specific part: keys are
    often folder paths) and 10 hex digits of its SHA-256. Never contains a path separator,
    NUL or a leading dot, whatever the key."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", study_key)[-60:].strip("._-")
    digest = hashlib.sha256(study_key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"study-{plain}-{digest}" if plain else f"study-{digest}"


def remove_leftover_temporaries(path: Path) -> None:
    """Delete the temporary files that a writer of `path` killed mid-write left beside it.
    Only while no other process may be writing `path` (pneumoscan: under the state lock)."""
    path = Path(path)
    for leftover in path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*{_TEMPORARY_SUFFIX}"):
        leftover.unlink(missing_ok=True)
