"""Load pixels and metadata of one input file (second stage of the pipeline).

`load` never raises for a bad file: it returns a `FileResult` with status `skipped` (not a
frontal chest radiograph, by its metadata) or `error` (cannot be read), and a one-line reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .records import FileResult, InputFile, LoadedImage

# Refuse to decode images declaring more pixels than this (decompression bombs); PIL's own
# limit is a warning below 2x its default, so we check before decoding.
MAX_PIXELS = 20_000 * 20_000 // 4  # 100 M pixels: 10000 x 10000


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


def load(item: InputFile, min_size: tuple[int, int] | None = None) -> LoadedImage | FileResult:
    """Read one discovered file. `min_size` (width, height) lets decoders that can scale
    while decoding (JPEG, JPEG 2000) produce a smaller image that is still at least that
    large."""
    study = str(item.path.parent)
    if item.kind is None:
        return FileResult(item.path, study, "error" if item.unreadable else "skipped",
                          item.skip_reason or "not an image")
    try:
        if item.kind == "dicom":
            from .dicom import load_dicom
            return load_dicom(item.path, min_size)
        return load_raster(item.path, min_size)
    except ImageProblem as exc:
        status = "skipped" if isinstance(exc, SkipImage) else "error"
        return FileResult(item.path, exc.study or study, status, str(exc),
                          metadata=exc.metadata or {})
    except FileNotFoundError:
        return FileResult(item.path, study, "error", "file disappeared before it could be read")
    except PermissionError:
        return FileResult(item.path, study, "error", "permission denied")
    except MemoryError:
        return FileResult(item.path, study, "error", "not enough memory to decode the image")
    except Exception as exc:  # any decoder failure is a file-level error, never a crash
        return FileResult(item.path, study, "error", f"cannot read: {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    """`exc` as one line: its type and message, every line of it kept (pydicom lists what
    each decoder plugin said on lines of their own, after a first line ending in ':')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return f"{type(exc).__name__}: {text}"


def load_raster(path: Path, min_size: tuple[int, int] | None = None) -> LoadedImage:
    """PNG / JPEG / TIFF -> greyscale uint8, plain images grouped by their folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise UnreadableImage(f"refused: decompression bomb ({exc})") from exc
        except Image.UnidentifiedImageError as exc:
            raise UnreadableImage("not a decodable image (unidentified or corrupt header)") from exc
        with img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(f"refused: declares {width}x{height} pixels, over the "
                                      f"limit of {MAX_PIXELS:,} (possible decompression bomb)")
            if getattr(img, "n_frames", 1) > 1:
                raise SkipImage(f"multi-frame image ({img.n_frames} frames)")
            if img.format == "JPEG" and min_size is not None:
                # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 when that still covers
                # min_size; never decodes the full-size image.
                img.draft("L", min_size)
            try:
                img.load()
            except OSError as exc:
                raise UnreadableImage(f"truncated or corrupt {img.format} data ({exc})") from exc
            if min_size is not None:
                img = shrink_to_cover(img, min_size)
            img = ImageOps.exif_transpose(img)
            pixels = to_grey_uint8(img)
    return LoadedImage(path=path, study=str(path.parent), pixels=pixels,
                       original_size=(width, height))


def shrink_to_cover(img: Image.Image, min_size: tuple[int, int]) -> Image.Image:
    """`img` box-filtered by the largest whole factor that still covers `min_size` either
    way round (EXIF may turn it), or `img` itself. Done first, so that a huge image is held
    at full size once, by the decoder, and every later copy is small."""
    factor = min(img.size) // max(min_size)
    if factor < 2:
        return img
    size = (-(-img.width // factor), -(-img.height // factor))  # ceiling division
    return img.resize(size, Image.Resampling.BOX)


def to_grey_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W). 16-bit and float greys are stretched from their own
    minimum to maximum, since their bit depth rarely matches the data's."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(img, dtype=np.float32)
        lo, hi = float(data.min()), float(data.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.round((data - lo) * scale).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent regions carry no X-ray signal.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.uint8)
