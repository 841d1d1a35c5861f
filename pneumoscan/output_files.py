"""Writing report files: atomically, owner-only by default, under names that are safe."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path

# Reports hold patient data: readable by their owner only unless asked otherwise.
PRIVATE_MODE = 0o600
_READABLE_CHARS = 60


def write_atomic(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write `data` to `path` as a whole: into a temporary file in the same folder that
    replaces `path` only once complete, so no reader ever sees a partial report."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".pneumoscan-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.chmod(temporary, mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def study_file_stem(study_key: str) -> str:
    """A file name stem for a study, safe on any file system and distinct for distinct
    keys: up to 60 of the key's plain characters (its end, the most specific part: keys are
    often folder paths) and 10 hex digits of its SHA-256. Never contains a path separator,
    NUL or a leading dot, whatever the key."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", study_key)[-_READABLE_CHARS:].strip("._-")
    digest = hashlib.sha256(study_key.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"study-{plain}-{digest}" if plain else f"study-{digest}"
