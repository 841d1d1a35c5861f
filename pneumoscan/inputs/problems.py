"""Why a file gives no image: the exceptions loaders raise, which `loading.load` turns into a
file-level result."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

from pneumoscan.inputs.reading import InputChanged
from pneumoscan.text import one_line

# Refuse to decode images declaring more pixels than this (decompression bombs); PIL's own
# limit is a warning below 2x its default, so we check before decoding.
MAX_PIXELS = 20_000 * 20_000 // 4  # 100 M pixels: 10000 x 10000


# What the decoders raise for data they cannot decode, as a file-level "cannot read": Pillow
# (OSError, its UnidentifiedImageError included; ValueError for impossible tiles and modes;
# EOFError and struct.error for data that ends early; SyntaxError from plugins' header
# parsers), pydicom (ValueError and EOFError for broken elements and short pixel data,
# RuntimeError when every decoder plugin failed, NotImplementedError for data no plugin
# handles) and pylibjpeg-openjpeg (RuntimeError). Caught around the decoders' calls alone
# (`decoding`): anything else a loader raises is a bug of ours, not a property of the file.
DECODER_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, RuntimeError,
                  NotImplementedError)


class ImageProblem(Exception):
    """Why a file gives no image (the message). A loader that already knows the file's
    study and metadata (DICOM) sets them, so the result is grouped and labelled like the
    file's readable siblings."""
    study: str | None = None
    metadata: dict[str, str] | None = None


class SkipImage(ImageProblem):
    """The file is readable but must not be classified (the message says why)."""


class UnreadableImage(ImageProblem):
    """The file cannot be decoded (the message says why)."""


@contextlib.contextmanager
def decoding(what: str) -> Iterator[None]:
    """Around a decoder's call: what it raises for data it cannot decode (DECODER_ERRORS)
    becomes UnreadableImage("`what`: why"); the file changing under it stays InputChanged."""
    try:
        yield
    except InputChanged:
        raise
    except DECODER_ERRORS as exc:
        raise UnreadableImage(f"{what}: {one_line(exc)}") from exc
