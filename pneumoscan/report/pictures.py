"""The report's picture of an image: the X-ray and its class activation map (CAM) blended
over it, side by side in one JPEG at the size the report shows them.

Pictures are drawn in the output stage, only for runs whose outputs show them (a report,
per-study reports, DICOM outputs): the engine hands over each classified image's view (the
X-ray reduced to DISPLAY_SIZE) and `drawn` makes the picture of it and the result's CAM as
the results stream to the state and the outputs. `render_picture` runs once per
image in threads, so it uses only numpy and Pillow (whose resize, blend and encode release
the GIL) on uint8 / float32 arrays at display size; of matplotlib, only its colour map
table is used.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Generator
from functools import lru_cache

import numpy as np
from PIL import Image

from pneumoscan.inference.preprocess import reduced, reduced_size
from pneumoscan.records import FileResult
from pneumoscan.workers import in_threads

# Longest side of the report images: about 115 dpi at the 85 mm they are printed at.
DISPLAY_SIZE = 384
JPEG_QUALITY = 80
# Weight of the colour map in the blend; the rest is the X-ray, which must stay readable.
CAM_OPACITY = 0.4
# Pixels between the X-ray and its map, and between the map and its colour scale.
GAP = 8
SCALE_HEIGHT = 6

@lru_cache(maxsize=1)
def turbo_lut() -> np.ndarray:
    """Matplotlib's turbo colour map (Mikhailov, Google AI 2019) as 256 x 3 uint8: CAM value
    0..1 scaled to 0..255 -> colour. Matplotlib is imported here, on the first picture, not
    with this module: a run without a report never needs it."""
    from matplotlib import colormaps

    return colormaps["turbo"](np.arange(256), bytes=True)[:, :3]


def display_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of an X-ray of that size as the pictures show it."""
    return reduced_size(width, height, DISPLAY_SIZE)


def drawn(results: Generator[FileResult, None, None], threads: int
          ) -> Generator[FileResult, None, None]:
    """`results` in their order, the picture of each one with a view drawn from it and its
    CAM (in `threads` threads, a few results ahead of the one given out), the view then
    dropped.
    Closing this closes `results` (the engine's run)."""
    with contextlib.closing(results):
        yield from in_threads(_with_picture, results, threads, "pneumoscan-picture")


def _with_picture(result: FileResult) -> FileResult:
    if result.view is not None:
        result.picture = render_picture(result.view, np.asarray(result.cam, np.float32))
        result.view = None
    return result


def render_picture(pixels: np.ndarray, cam: np.ndarray) -> bytes:
    """The report's picture of one X-ray, as JPEG bytes: on the left the X-ray, at most
    DISPLAY_SIZE on its longest side; on the right the same with the CAM in the turbo colour
    map blended over it, and the colour scale (low to high) under that. One picture rather
    than two: every image is a box for WeasyPrint to lay out and an object in the PDF.

    pixels: greyscale uint8 (H, W), 0 = black (a result's view, or a LoadedImage's).
    cam: float32 (h, w), any small grid (e.g. 7 x 7), normalised to 0..1 for the predicted
    class; it is stretched over the whole image.
    """
    grey = Image.fromarray(np.ascontiguousarray(reduced(pixels, DISPLAY_SIZE),
                                                dtype=np.uint8)).convert("RGB")
    size = grey.size
    width, height = size
    picture = Image.new("RGB", picture_size(width, height), "white")
    picture.paste(grey, (0, 0))
    picture.paste(Image.blend(grey, colourise(cam, size), CAM_OPACITY), (width + GAP, 0))
    scale = Image.fromarray(turbo_lut()[None]).resize((width, SCALE_HEIGHT))
    picture.paste(scale, (width + GAP, height + GAP))
    return encode_jpeg(picture)


def picture_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the picture of an X-ray shown at `width` x `height`."""
    return 2 * width + GAP, height + GAP + SCALE_HEIGHT


def colourise(cam: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """CAM (h, w) 0..1 -> RGB image of `size` (width, height), bilinear, turbo colours."""
    # NaN or out-of-range values (a flat CAM normalised by zero) must not index off the LUT.
    small = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    upsampled = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR))
    index = (upsampled * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    return Image.fromarray(turbo_lut()[index])


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def colour_bar_png() -> bytes:
    """The colour map from low (left) to high (right), 256 x 8 px, for the legend."""
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(turbo_lut()[None], 8, axis=0)).save(buffer, "PNG")
    return buffer.getvalue()
