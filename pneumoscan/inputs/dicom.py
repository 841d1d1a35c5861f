"""Read one DICOM file: display pixels of a frontal chest radiograph, and its metadata.

Whether the file is a frontal chest radiograph is decided from its own attributes before any
pixel is decoded; anything else raises `SkipImage` with the attribute that says so. Pixels go
through the DICOM grey pipeline explicitly: decode, keep Bits Stored, modality LUT (rescale),
VOI LUT or window, MONOCHROME1 inversion, then uint8 with 0 = black.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import openjpeg
import pydicom
from PIL import Image, Jpeg2KImagePlugin
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pneumoscan.inputs.problems import (
    DECODER_ERRORS,
    MAX_PIXELS,
    ImageProblem,
    SkipImage,
    UnreadableImage,
    decoding,
)
from pneumoscan.inputs.raster import shrink_to_cover
from pneumoscan.records import DICOM_FIELDS, LoadedImage
from pneumoscan.text import defined_term, dicom_value, one_line

# Elements larger than this (the pixel data) are read only when used, so files skipped by
# their metadata cost one small read.
DEFER_ELEMENTS_OVER = "256 KB"

RADIOGRAPH_MODALITIES = {"CR", "DX"}
# BodyPartExamined values taken as the chest: the DICOM term, and two frequent vendor ones.
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG"}
# Words in descriptions that name the chest, or another body part, when BodyPartExamined is
# absent; a description naming both is not clear enough to skip.
CHEST_WORDS = {"CHEST", "THORAX", "LUNG", "LUNGS", "CXR"}
OTHER_BODY_PART_WORDS = {
    "HEAD", "SKULL", "BRAIN", "FACE", "SINUS", "SINUSES", "ORBIT", "MANDIBLE", "DENTAL",
    "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "ABDOMEN", "ABDOMINAL", "PELVIS", "HIP",
    "HIPS", "SHOULDER", "HUMERUS", "ELBOW", "FOREARM", "WRIST", "HAND", "FINGER", "FEMUR",
    "KNEE", "TIBIA", "FIBULA", "LEG", "ANKLE", "FOOT", "TOE", "EXTREMITY", "BREAST", "MAMMO",
}
# ViewPosition (and, when it is absent, description) words of lateral and oblique views.
# Decubitus views (LLD, RLD) are frontal projections and stay.
NOT_FRONTAL_VIEW_WORDS = {"LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "LAO", "RAO", "OBL",
                          "OBLIQUE"}
# Defined terms that a reason may quote (PS3.3 C.7.3.1.1.1, C.7.6.3.1.2; PS3.16 CID 4031
# for body parts, of which those the checks above know).
MODALITIES = {"CR", "DX", "CT", "MR", "US", "NM", "PT", "XA", "RF", "MG", "IO", "PX", "OT",
              "SC", "DOC", "SR", "KO", "PR", "SEG", "REG", "RTIMAGE", "RTSTRUCT", "RTPLAN",
              "RTDOSE", "ES", "XC", "OP", "OPT", "OCT", "SM", "ECG", "HD", "AU", "BI", "DG",
              "GM", "LS", "RG", "TG", "IVUS", "IVOCT", "BMD", "PLAN", "FID"}
BODY_PARTS = CHEST_BODY_PARTS | OTHER_BODY_PART_WORDS | {"WHOLEBODY", "ABDOMENPELVIS",
                                                         "CHESTABDOMEN", "SHOULDERS", "HEART"}
VIEW_POSITIONS = {"AP", "PA", "LLD", "RLD"} | NOT_FRONTAL_VIEW_WORDS
PHOTOMETRIC_INTERPRETATIONS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
                               "YBR_ICT", "YBR_RCT", "PALETTE COLOR", "HSV", "ARGB", "CMYK"}
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName")
# The most of a text or number value read: four values of the longest VR shown (PN, 194
# characters), at up to 4 bytes a character.
MAX_VALUE_BYTES = 4 * 194 * 4
READ_KEYWORDS = (*DICOM_FIELDS, *DESCRIPTION_KEYWORDS, "NumberOfFrames",
                 "PhotometricInterpretation", "VOILUTFunction", "RescaleSlope",
                 "RescaleIntercept", "WindowCenter", "WindowWidth")
PIXEL_MODULE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                         "BitsAllocated", "BitsStored", "PixelRepresentation")
# Every attribute read here, but the pixel data (decoded by `_decode`).
PARSED_KEYWORDS = (*READ_KEYWORDS, *PIXEL_MODULE_KEYWORDS, "ModalityLUTSequence",
                   "VOILUTSequence")


def load_dicom(fh: BinaryIO, path: Path,
               min_size: tuple[int, int] | None = None) -> LoadedImage:
    """A frontal chest radiograph, from the open file `fh` (found at `path`), as greyscale
    uint8 (0 = black) with its metadata; raises `SkipImage` for other DICOM objects and
    `UnreadableImage` when pixels cannot be had. `min_size` (width, height): the pixels are
    reduced to the smallest size that still covers it (lossy JPEG 2000 as it decodes, by
    wavelet levels; everything else by box averaging after decoding). Text read from the
    file is shown bounded and printable (`text.dicom_value`), and reasons never quote its
    free text: they name only the standard's defined terms and our own words."""
    ds = _read(fh)
    metadata = _metadata(ds)
    study = metadata.get("StudyInstanceUID") or str(path.parent)
    try:
        _require_frontal_chest_radiograph(ds)
        pixels = _render(ds, min_size)
    except ImageProblem as exc:
        exc.study, exc.metadata = study, metadata
        raise
    return LoadedImage(path=path, study=study, pixels=pixels, metadata=metadata)


def _read(fh: BinaryIO) -> Dataset:
    """The data set, with every attribute this module reads parsed: pydicom parses a value
    when it is first read, and what it raises then is said about the file here."""
    try:
        with decoding("cannot read"):
            # force: old files have neither the 128-byte preamble nor a file meta header.
            ds = pydicom.dcmread(fh, force=True, defer_size=DEFER_ELEMENTS_OVER)
    except InvalidDicomError as exc:
        raise UnreadableImage(f"not a DICOM file: {one_line(exc)}") from exc
    if len(ds) == 0:
        # pydicom warns, and gives what it read before, when a file ends in mid-element
        # (a truncated pixel data sequence): here nothing at all.
        raise UnreadableImage("no DICOM data element could be read: the file is truncated "
                              "or not DICOM")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _syntax_as_read(ds)
    _cut_read_values(ds, fh)
    with decoding("cannot read its attributes"):
        for keyword in PARSED_KEYWORDS:
            ds.get(keyword)
    return ds


def _cut_read_values(ds: Dataset, fh: BinaryIO) -> None:
    """Cut each value this module reads to MAX_VALUE_BYTES before pydicom decodes it: a
    crafted file may hold hundreds of KB there (thousands of values, escape sequences),
    which would take seconds to decode, and no more than the start is ever shown."""
    for keyword in READ_KEYWORDS:
        raw = ds.get_item(keyword, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length <= MAX_VALUE_BYTES:
            continue
        value = raw.value
        if value is None:  # deferred (large): read only its start
            fh.seek(raw.value_tell)
            value = fh.read(MAX_VALUE_BYTES)
        ds[keyword] = raw._replace(value=value[:MAX_VALUE_BYTES],
                                   length=len(value[:MAX_VALUE_BYTES]))


def _syntax_as_read(ds: Dataset) -> UID:
    """The uncompressed transfer syntax pydicom detected while parsing a file that does not
    name one; compressed pixel data cannot be decoded without the name."""
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise UnreadableImage("compressed pixel data but no transfer syntax in the file")
    implicit_vr, little_endian = ds.original_encoding
    if not little_endian:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian


def _metadata(ds: Dataset) -> dict[str, str]:
    """The DICOM_FIELDS present with a value, as text (multiple values joined by `\\`),
    each value printable and within its VR's length."""
    out = {}
    for keyword in DICOM_FIELDS:
        value = _text(ds, keyword, separator="\\")
        if value:
            out[keyword] = value
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Z]+", text.upper()))


def _text(ds: Dataset, keyword: str, separator: str = " ") -> str:
    """An attribute's value as printable text no longer than its VR allows ("" if absent)."""
    if keyword not in ds:
        return ""
    element = ds[keyword]
    value = element.value
    if value is None or value == "":
        return ""
    values = [str(v) for v in value] if isinstance(value, MultiValue) else [str(value)]
    return dicom_value(values, element.VR).replace("\\", separator).strip()


def _require_frontal_chest_radiograph(ds: Dataset) -> None:
    """Raise SkipImage unless the attributes describe one frontal chest radiograph."""
    modality = _text(ds, "Modality").upper()
    if modality not in RADIOGRAPH_MODALITIES:
        named = defined_term(modality, MODALITIES) if modality else "not given"
        raise SkipImage(f"modality {named}: not a radiograph (CR or DX)")
    _require_chest(ds)
    _require_frontal_view(ds)
    frames = _text(ds, "NumberOfFrames") or "1"
    if not frames.isdigit() or int(frames) > 1:
        count = frames if frames.isdigit() else "an unlisted number of"
        raise SkipImage(f"multi-frame object ({count} frames), not a single radiograph")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # CR and DX are greyscale by definition: colour here is a screenshot or a photo.
        raise SkipImage(f"colour image ({defined_term(photometric, PHOTOMETRIC_INTERPRETATIONS)}), "
                        "not a greyscale radiograph")


def _require_chest(ds: Dataset) -> None:
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part:
        if body_part not in CHEST_BODY_PARTS:
            raise SkipImage(f"body part examined is {defined_term(body_part, BODY_PARTS)}, "
                            "not the chest")
        return
    for keyword in DESCRIPTION_KEYWORDS:
        words = _words(_text(ds, keyword))
        other = sorted(words & OTHER_BODY_PART_WORDS)
        if other and not words & CHEST_WORDS:
            raise SkipImage(f"no body part examined, and {keyword} names {other[0]}, "
                            "not the chest")


def _require_frontal_view(ds: Dataset) -> None:
    view = _text(ds, "ViewPosition")
    if view:
        lateral = sorted(_words(view) & NOT_FRONTAL_VIEW_WORDS)
        if lateral:
            shown = view if view.upper() in NOT_FRONTAL_VIEW_WORDS else f"naming {lateral[0]}"
            raise SkipImage(f"view position {shown}: lateral or oblique, not a frontal view")
        return
    for keyword in DESCRIPTION_KEYWORDS:
        lateral = sorted(_words(_text(ds, keyword)) & NOT_FRONTAL_VIEW_WORDS)
        if lateral:
            raise SkipImage(f"no view position, and {keyword} names a lateral or oblique "
                            f"view ({lateral[0]})")


def _render(ds: Dataset, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """The display image of a greyscale single-frame data set: uint8 (H, W), 0 = black."""
    missing = [k for k in PIXEL_MODULE_KEYWORDS if ds.get(k) in (None, "")]
    if "PixelData" not in ds:
        raise UnreadableImage("no pixel data")
    if missing:
        raise UnreadableImage(f"image attributes missing: {', '.join(missing)}")
    if int(ds.SamplesPerPixel) != 1:
        raise UnreadableImage(f"{ds.SamplesPerPixel} samples per pixel in a greyscale image")
    width, height = int(ds.Columns), int(ds.Rows)
    if width * height > MAX_PIXELS:
        raise UnreadableImage(f"refused: declares {width}x{height} pixels, over the limit of "
                              f"{MAX_PIXELS:,}")
    stored = _keep_stored_bits(_decode(ds, min_size), int(ds.BitsStored))
    if min_size is not None:
        stored = _shrink_to_cover(stored, min_size)
    values = _modality_values(stored, ds)
    varied = float(values.min()) != float(values.max())
    display = _voi_values(values, ds)
    if varied and float(display.min()) == float(display.max()):
        raise UnreadableImage("the VOI window or LUT maps every pixel to one grey level: "
                              "its parameters are unusable")
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":  # minimum value is white
        np.subtract(1.0, display, out=display)
    display *= 255.0
    return np.rint(display, out=display).astype(np.uint8)


def _decode(ds: Dataset, min_size: tuple[int, int] | None = None) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_transfer_syntax:
        raise UnreadableImage(f"unknown transfer syntax {syntax}")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnreadableImage(f"unsupported transfer syntax: {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        raise UnreadableImage(f"no decoder installed for {syntax.name} ({syntax}): "
                              f"{decoder.missing_dependencies[0]}")
    # Lossy JPEG 2000 only: a lossless stream is decoded in full and reduced as its
    # uncompressed twin is, so that both give the same pixels; its wavelet low band, though
    # a fine reduction, is not the box average, and the score moved by up to 0.17 between
    # the two (benchmarks/bench_robustness.py, 116 images).
    if min_size is not None and syntax == JPEG2000:
        reduced = _decode_jpeg2000_reduced(ds, min_size)
        if reduced is not None:
            return reduced
    try:
        return ds.pixel_array  # reads the deferred pixel data now
    except OSError:
        raise  # the file itself went away or became unreadable: `load` says so
    except DECODER_ERRORS as exc:  # decoder and buffer errors: these pixels are unusable
        raise UnreadableImage(f"cannot decode {syntax.name} pixel data: {one_line(exc)}") from exc


def _decode_jpeg2000_reduced(ds: Dataset, min_size: tuple[int, int]) -> np.ndarray | None:
    """The stored values at 1/2, 1/4, ... of the full resolution, the smallest that still
    covers `min_size` (width, height): a JPEG 2000 code stream holds every halved resolution
    (its wavelet levels), and decoding only the ones needed skips most of the work, as the
    DCT scaling of JPEG does. None when no halving fits, or for data this path does not
    serve (signed or colour data, a stream OpenJPEG cannot reduce): the caller decodes in
    full, and says why if that fails too."""
    width, height = int(ds.Columns), int(ds.Rows)
    halvings = _halvings(width, height, min_size)
    if halvings == 0:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        stream = openjpeg.get_parameters(frame)
    except (StopIteration, ValueError, RuntimeError):  # no frame / not a J2K code stream
        return None
    if (stream["is_signed"] or stream["samples_per_pixel"] != 1
            or (stream["columns"], stream["rows"]) != (width, height)):
        return None
    try:
        with warnings.catch_warnings():  # the size was checked against MAX_PIXELS already
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = ReducedJpeg2000(io.BytesIO(frame), halvings)
        with image:
            if image.mode not in ("L", "I;16"):
                return None
            pixels = np.array(image)  # decodes; a writable copy
    except (OSError, SyntaxError):  # what Pillow raises for a stream it cannot read
        return None
    if pixels.shape != (_halved(height, halvings), _halved(width, halvings)):
        return None
    # Pillow scales samples up to the full 8 or 16 bits; the stored values are the top
    # `precision` bits.
    np.right_shift(pixels, pixels.dtype.itemsize * 8 - int(stream["precision"]), out=pixels)
    return pixels.astype(np.uint16 if int(ds.BitsAllocated) > 8 else np.uint8, copy=False)


class ReducedJpeg2000(Jpeg2KImagePlugin.Jpeg2KImageFile):
    """A JPEG 2000 code stream opened by Pillow to be decoded `halvings` wavelet levels
    down, at the size OpenJPEG gives it. Pillow's public `reduce` attribute sizes the image
    rounding half up where OpenJPEG rounds up, and its decode then fails on sides that are
    not a multiple of 2^halvings (RG1's 1841 px: "broken data stream"); pylibjpeg-openjpeg
    (2.6) has no reduced decode. So this subclass sets the size and the decoder's tile in
    `_open`, the plugin interface where Pillow's own plugins set them; it relies on the
    JPEG 2000 decoder's arguments being (codec, reduce, layers, fd, length), which
    tests/test_dicom.py checks against the installed Pillow."""

    def __init__(self, fp, halvings: int):
        self.halvings = halvings
        super().__init__(fp)

    def _open(self) -> None:
        super()._open()
        size = (_halved(self.size[0], self.halvings), _halved(self.size[1], self.halvings))
        tile = self.tile[0]
        if not isinstance(tile.args, tuple):
            raise SyntaxError("not a JPEG 2000 decoder tile")  # what Pillow's plugins raise
        codec, _, layers, *stream = tile.args
        self.tile = [tile._replace(extents=(0, 0, *size),
                                   args=(codec, self.halvings, layers, *stream))]
        self._size = size


def _shrink_to_cover(stored: np.ndarray, min_size: tuple[int, int]) -> np.ndarray:
    """Stored values box-averaged as `raster.shrink_to_cover` does raster images, so that
    every later step (LUTs in floating point) works on a small image, as after a reduced
    JPEG 2000 decode."""
    small = shrink_to_cover(Image.fromarray(stored.astype(np.float32)), min_size)
    if small.size == stored.shape[::-1]:
        return stored
    return np.rint(np.asarray(small)).astype(stored.dtype)


def _halvings(width: int, height: int, min_size: tuple[int, int]) -> int:
    """How many times an image can be halved and still cover `min_size` (width, height)."""
    halvings = 0
    while (_halved(width, halvings + 1) >= min_size[0]
           and _halved(height, halvings + 1) >= min_size[1]):
        halvings += 1
    return halvings


def _halved(size: int, halvings: int) -> int:
    """A side of `size` pixels halved `halvings` times, rounded up as OpenJPEG does."""
    return -(-size // (1 << halvings))


def _keep_stored_bits(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """Only the low Bits Stored bits hold the value (PS3.5 8.1.1); the others may carry
    overlays or junk. The shift pair masks them and sign-extends signed data alike."""
    unused = pixels.dtype.itemsize * 8 - bits_stored
    if unused > 0:
        np.left_shift(pixels, unused, out=pixels)
        np.right_shift(pixels, unused, out=pixels)
    return pixels


def _modality_values(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values, float32 (pydicom's rescale would use float64).
    Raises UnreadableImage for parameters that give no usable values (not finite, a zero
    slope, out of float32's range): such files would otherwise decode to a blank image."""
    if ds.get("ModalityLUTSequence"):
        with decoding("unusable ModalityLUTSequence"):
            values = apply_modality_lut(pixels, ds).astype(np.float32)
    else:
        values = pixels.astype(np.float32)
        slope = _number(ds, "RescaleSlope", 1.0)
        intercept = _number(ds, "RescaleIntercept", 0.0)
        if slope == 0.0:
            raise UnreadableImage("RescaleSlope is 0: every pixel would have one value")
        with np.errstate(over="ignore", invalid="ignore"):
            if slope != 1.0:
                values *= np.float32(slope)
            if intercept:
                values += np.float32(intercept)
    if not np.isfinite(values).all():
        raise UnreadableImage("the modality LUT (RescaleSlope, RescaleIntercept or "
                              "ModalityLUTSequence) gives values out of range")
    return values


def _number(ds: Dataset, keyword: str, default: float) -> float:
    """A numeric attribute's (first) value; `default` when absent. Raises UnreadableImage
    for values that are not finite numbers."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UnreadableImage(f"{keyword} is not a number") from None
    if not math.isfinite(number):
        raise UnreadableImage(f"{keyword} is {number}: not a finite number")
    return number


def _voi_values(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> display values in [0, 1] (float32, modified in place): the first
    VOI LUT, else the first window, else the data's own minimum to maximum."""
    if ds.get("VOILUTSequence"):
        return _voi_lut_values(values, ds)
    window = _first_window(ds)
    if window is None:
        return _min_max_values(values)
    center, width = window
    function = _text(ds, "VOILUTFunction").upper()
    # Computed in float64: a centre or width far beyond float32's range must still give
    # the clipped result the standard's formula does, not infinities.
    values = values.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
            values -= center
            values *= -4.0 / width
            np.exp(values, out=values)
            values += 1.0
            display = np.reciprocal(values, out=values)
        else:
            if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
                values -= center
                values /= width
            else:  # LINEAR, PS3.3 C.11.2.1.2.1
                values -= center - 0.5
                values /= max(width - 1.0, 1e-3)
            values += 0.5
            display = np.clip(values, 0.0, 1.0, out=values)
    return display.astype(np.float32)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (centre, width) pair, or None when absent. Raises UnreadableImage when it
    is unusable: not finite numbers, or a width that is not positive."""
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None
    center, width = _number(ds, "WindowCenter", 0.0), _number(ds, "WindowWidth", 0.0)
    if width <= 0:
        raise UnreadableImage(f"WindowWidth is {width:g}: a window must be wider than 0")
    return center, width


def _voi_lut_values(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT, scaled by the bit depth its entries actually use: descriptors
    often declare 16 bits for 12-bit tables."""
    with decoding("unusable VOILUTSequence"):
        entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
        table = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)
        display = apply_voi(np.rint(values).astype(np.int32), ds).astype(np.float32)
    top = 2 ** max(int(table.max()).bit_length(), 1) - 1
    display /= top
    return display


def _min_max_values(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= 1.0 / (high - low) if high > low else 0.0
    return values
