"""Opening an input file that other systems may change at any moment.

Between discovery and reading, a file may be replaced by a FIFO (opening it would block for
good), a device (/dev/zero never ends), or a symbolic link to either. Every input is
therefore opened without blocking and without following a link that was not there when it
was found; what was opened is checked on the descriptor itself (a regular file, of a
bounded size), and no read goes past the size seen then.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

# Larger inputs are refused: a chest radiograph is tens of MB even uncompressed.
MAX_INPUT_BYTES = 2 * 2**30


class InputChanged(OSError):
    """The path no longer leads to a regular file that may be read (the message says what
    it leads to now)."""


class BoundedFile(io.FileIO):
    """A read-only file that ends at the size it had when opened, even if it grows."""

    def __init__(self, fd: int, size: int, path: Path):
        super().__init__(fd, "rb", closefd=True)
        self.size = size
        # The path, not the descriptor number FileIO names it by: readers quote the name
        # as text in their messages (pydicom: "... in file " + name).
        self.name = os.fspath(path)

    def _room(self) -> int:
        return max(0, self.size - self.tell())

    def readinto(self, buffer) -> int:
        room = self._room()
        view = memoryview(buffer).cast("B")
        return super().readinto(view[:room]) if room else 0

    def read(self, size: int | None = -1) -> bytes:
        room = self._room()
        return super().read(room if size is None or size < 0 else min(size, room))

    def readall(self) -> bytes:
        return self.read()


def open_input(path: Path, *, follow_link: bool = False) -> BoundedFile:
    """`path` opened for reading, unbuffered. `follow_link`: the file was found as a symbolic
    link (to a regular file), so a link is expected there. Raises InputChanged when what is
    there now is not a regular file of at most MAX_INPUT_BYTES, and OSError when it cannot
    be opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_link else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_link:
            raise InputChanged("replaced by a symbolic link after it was found; not followed"
                               ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputChanged(f"not a regular file now ({_kind(info.st_mode)})")
        if info.st_size > MAX_INPUT_BYTES:
            raise InputChanged(f"{info.st_size:,} bytes, over the limit of "
                               f"{MAX_INPUT_BYTES:,} for one input file")
        os.set_blocking(fd, True)
        return BoundedFile(fd, info.st_size, path)
    except BaseException:
        os.close(fd)
        raise


def read_head(path: Path, size: int, *, follow_link: bool = False) -> bytes:
    """The first `size` bytes of the file (fewer if it is shorter)."""
    with open_input(path, follow_link=follow_link) as fh:
        return fh.read(size)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"
