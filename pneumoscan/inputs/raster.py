"""PNG, JPEG and TIFF files: pixels at the size the model needs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pneumoscan.inputs.problems import (DECODER_ERRORS, MAX_PIXELS, SkipImage,
                                        UnreadableImage, decoding)
from pneumoscan.inputs.reading import InputChanged
from pneumoscan.records import LoadedImage
from pneumoscan.text import one_line


def load_raster(fh: BinaryIO, path: Path,
                min_size: tuple[int, int] | None = None) -> LoadedImage:
    """PNG / JPEG / TIFF from the open file `fh` (found at `path`) -> greyscale uint8,
    plain images grouped by their folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img: Image.Image = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise UnreadableImage(f"refused: decompression bomb ({exc})") from exc
        except Image.UnidentifiedImageError as exc:
            raise UnreadableImage("not a decodable image (unidentified or corrupt header)") from exc
        except InputChanged:
            raise
        except DECODER_ERRORS as exc:
            raise UnreadableImage(f"corrupt image header: {one_line(exc)}") from exc
        with img:
            kind, (width, height) = img.format, img.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(f"refused: declares {width}x{height} pixels, over the "
                                      f"limit of {MAX_PIXELS:,} (possible decompression bomb)")
            with decoding(f"corrupt {kind} frames"):
                frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise SkipImage(f"multi-frame image ({frames} frames)")
            with decoding(f"truncated or corrupt {kind} data"):
                if img.format == "JPEG" and min_size is not None:
                    # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 when that still
                    # covers min_size; never decodes the full-size image.
                    img.draft("L", min_size)
                img.load()
            if min_size is not None:
                img = shrink_to_cover(img, min_size)
            with decoding(f"corrupt {kind} orientation (EXIF)"):
                img = ImageOps.exif_transpose(img)
            pixels = to_grey_uint8(img)
    return LoadedImage(path=path, study=str(path.parent), pixels=pixels)


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
