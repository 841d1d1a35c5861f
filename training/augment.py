"""Storage-robust augmentation: one X-ray as different sites would have stored it.

Every Kermany 224 px training image was made the same way (bilinear squash, JPEG quality 75),
so a network trained on them as they are learns those artefacts as part of the anatomy: scans
resized with another filter, from another size, or stored losslessly then score differently.
Each training image therefore gets a random draw of how it could have been stored: window and
gamma on an 8- or 16-bit path, a crop with rotation, a resampling filter (box, bilinear,
bicubic, Lanczos, nearest), often through an intermediate size (down-and-up, or decoded at
twice the size then reduced, as DICOM is read), mild blur or sharpening, a burnt-in text
marker, sensor noise, and a JPEG re-encode at quality 30-95 or none.

`draw` picks the parameters and `apply` renders them, so tests can check each step. All
steps run on PIL images of about the model's size: about 1 ms per image on one core, small
next to the network's forward and backward pass.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FILTERS = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
           "nearest": Image.Resampling.NEAREST}
# Nearest neighbour is rare in real pipelines; it is drawn less often than the others.
FILTER_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 0.4]) / 4.4
MARKERS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT")


@dataclass(frozen=True)
class Storage:
    """How one copy of an image was stored. Intensities are fractions of full scale."""
    sixteen_bit: bool = False  # finer grey levels than 8 bits before the window
    window: tuple[float, float] = (0.0, 1.0)  # (low, high) mapped to (black, white)
    gamma: float = 1.0
    rotation: float = 0.0  # degrees
    shift: tuple[int, int] = (0, 0)  # pixels
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # box as fractions
    intermediate: float | None = None  # resize to this multiple of the output size first
    filters: tuple[str, str] = ("bilinear", "bilinear")  # (to intermediate, to output)
    blur: float = 0.0  # Gaussian radius in pixels
    sharpen: int = 0  # unsharp-mask strength in percent
    marker: tuple[str, float, float, int] | None = None  # (text, x, y as fractions, grey)
    noise: float = 0.0  # Gaussian sigma in grey levels
    jpeg_quality: int | None = None
    seed: int = 0  # of the random fine structure (16-bit levels, noise)


def draw(rng: np.random.Generator, hflip: bool = False) -> Storage:
    """A random way of storing an image; each step is applied to part of the draws only,
    so plain copies stay common too."""
    def maybe(p: float) -> bool:
        return bool(rng.random() < p)

    def pick_filter() -> str:
        return str(rng.choice(list(FILTERS), p=FILTER_WEIGHTS))

    scale, ratio = rng.uniform(0.75, 1.0), np.exp(rng.uniform(np.log(0.85), np.log(1 / 0.85)))
    w, h = min(1.0, np.sqrt(scale * ratio)), min(1.0, np.sqrt(scale / ratio))
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    crop = (x0, y0, x0 + w, y0 + h)
    if hflip and maybe(0.5):
        crop = (crop[2], crop[1], crop[0], crop[3])  # right edge first: mirrored
    window = (rng.uniform(-0.08, 0.1), rng.uniform(0.88, 1.08)) if maybe(0.7) else (0.0, 1.0)
    return Storage(
        sixteen_bit=maybe(0.5),
        window=window,
        gamma=float(np.exp(rng.uniform(-0.3, 0.3))) if maybe(0.5) else 1.0,
        rotation=float(rng.uniform(-8, 8)) if maybe(0.7) else 0.0,
        shift=tuple(int(v) for v in rng.integers(-10, 11, 2)) if maybe(0.5) else (0, 0),
        crop=tuple(float(v) for v in crop),
        intermediate=float(np.exp(rng.uniform(np.log(0.45), np.log(2.2)))) if maybe(0.6)
        else None,
        filters=(pick_filter(), pick_filter()),
        blur=float(rng.uniform(0.2, 0.9)) if maybe(0.15) else 0.0,
        sharpen=int(rng.integers(20, 120)) if maybe(0.15) else 0,
        marker=(str(rng.choice(MARKERS)), *_near_an_edge(rng), int(rng.choice([0, 200, 255])))
        if maybe(0.3) else None,
        noise=float(rng.uniform(0.5, 3.0)) if maybe(0.3) else 0.0,
        jpeg_quality=int(rng.integers(30, 96)) if maybe(0.6) else None,
        seed=int(rng.integers(2**31)),
    )


def draw_pair(rng: np.random.Generator, size: int, hflip: bool = False) -> tuple[Storage, Storage]:
    """Two copies of one drawn storage that differ only in what nobody can see: the last
    resampling filter, a sub-pixel shift (up to one output pixel each way), a JPEG re-encode
    at quality 60-95 or none, and noise of about one grey level. The consistency loss asks
    the network to score both the same."""
    base = draw(rng, hflip)
    x0, y0, x1, y1 = base.crop
    px, py = abs(x1 - x0) / size, abs(y1 - y0) / size  # one output pixel, as a fraction
    # The box loses a pixel at each side so that either copy can move a pixel either way
    # without leaving the image (which would add a black border).
    inward = px if x1 > x0 else -px  # a mirrored box runs from right to left
    x0, y0, x1, y1 = x0 + inward, y0 + py, x1 - inward, y1 - py

    def copy() -> Storage:
        dx, dy = float(rng.uniform(-1, 1)) * px, float(rng.uniform(-1, 1)) * py
        return replace(
            base, crop=(x0 + dx, y0 + dy, x1 + dx, y1 + dy),
            filters=(base.filters[0], str(rng.choice(list(FILTERS)[:4]))),
            jpeg_quality=int(rng.integers(60, 96)) if rng.random() < 0.7 else None,
            noise=float(rng.uniform(0.3, 1.5)) if rng.random() < 0.5 else 0.0,
            seed=int(rng.integers(2**31)))

    return copy(), copy()


def _near_an_edge(rng: np.random.Generator) -> tuple[float, float]:
    """Where markers are put: a corner or edge band, outside the lung fields mostly."""
    x = rng.uniform(0.02, 0.2) if rng.random() < 0.5 else rng.uniform(0.65, 0.85)
    y = rng.uniform(0.02, 0.2) if rng.random() < 0.5 else rng.uniform(0.75, 0.9)
    return float(x), float(y)


def apply(pixels: np.ndarray, storage: Storage, size: int) -> np.ndarray:
    """uint8 (H, W) -> uint8 (size, size), stored as `storage` says."""
    img = Image.fromarray(_window(pixels, storage))
    if storage.marker is not None:
        text, x, y, grey = storage.marker
        font = ImageFont.load_default(size=max(8, img.height // 16))
        ImageDraw.Draw(img).text((x * img.width, y * img.height), text, fill=grey, font=font)
    if storage.rotation or storage.shift != (0, 0):
        img = img.rotate(storage.rotation, Image.Resampling.BILINEAR, translate=storage.shift)
    img = _resample(img, storage, size)
    if storage.blur:
        img = img.filter(ImageFilter.GaussianBlur(storage.blur))
    if storage.sharpen:
        img = img.filter(ImageFilter.UnsharpMask(radius=1.0, percent=storage.sharpen,
                                                 threshold=0))
    out = np.asarray(img)
    if storage.noise:
        noise = storage.noise * np.random.default_rng(storage.seed).standard_normal(
            out.shape, dtype=np.float32)
        out = np.clip(out + noise, 0, 255).round().astype(np.uint8)
    if storage.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(out).save(buffer, "JPEG", quality=storage.jpeg_quality)
        out = np.asarray(Image.open(buffer))
    return out


def _window(pixels: np.ndarray, storage: Storage) -> np.ndarray:
    """Window and gamma in floating point. On the 8-bit path the stored grey levels stay
    what they are (a stretch leaves gaps in the histogram, as windowing an 8-bit PNG does);
    on the 16-bit path they are spread over the interval each 8-bit level stands for, as
    when a 12- to 16-bit scan is windowed straight to 8 bits."""
    if storage.window == (0.0, 1.0) and storage.gamma == 1.0 and not storage.sixteen_bit:
        return pixels
    x = pixels.astype(np.float32)
    if storage.sixteen_bit:
        x += np.random.default_rng(storage.seed).random(x.shape, dtype=np.float32) - 0.5
    low, high = storage.window
    x = np.clip((x / 255 - low) / (high - low), 0, 1) ** storage.gamma
    return (x * 255).round().astype(np.uint8)


def _resample(img: Image.Image, storage: Storage, size: int) -> Image.Image:
    """Crop and resize to size x size with the drawn filters, through the intermediate size
    when there is one. A mirrored crop box (x0 > x1) is cropped, then flipped."""
    x0, y0, x1, y1 = storage.crop
    mirrored = x0 > x1
    if mirrored:
        x0, x1 = x1, x0
    box = (x0 * img.width, y0 * img.height, x1 * img.width, y1 * img.height)
    first, last = (FILTERS[name] for name in storage.filters)
    if storage.intermediate is not None:
        middle = max(8, round(size * storage.intermediate))
        img = img.resize((middle, middle), first, box=box)
        box = None
    img = img.resize((size, size), last, box=box)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else img
