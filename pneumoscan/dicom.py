"""Read one DICOM file: display pixels of a frontal chest radiograph, and its metadata.

Whether the file is a frontal chest radiograph is decided from its own attributes before any
pixel is decoded; anything else raises `SkipImage` with the attribute that says so. Pixels go
through the DICOM grey pipeline explicitly: decode, keep Bits Stored, modality LUT (rescale),
VOI LUT or window, MONOCHROME1 inversion, then uint8 with 0 = black.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .loading import MAX_PIXELS, ImageProblem, SkipImage, UnreadableImage, one_line
from .records import DICOM_FIELDS, LoadedImage

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
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName")
PIXEL_MODULE_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                         "BitsAllocated", "BitsStored", "PixelRepresentation")


def load_dicom(path: Path) -> LoadedImage:
    """A frontal chest radiograph as greyscale uint8 (0 = black) with its metadata; raises
    `SkipImage` for other DICOM objects and `UnreadableImage` when pixels cannot be had."""
    ds = _read(path)
    study = str(ds.get("StudyInstanceUID") or path.parent)
    metadata = _metadata(ds)
    try:
        _require_frontal_chest_radiograph(ds)
        pixels = _render(ds)
    except ImageProblem as exc:
        exc.study, exc.metadata = study, metadata
        raise
    return LoadedImage(path=path, study=study, pixels=pixels,
                       original_size=(int(ds.Columns), int(ds.Rows)), metadata=metadata)


def _read(path: Path) -> Dataset:
    try:
        # force: old files have neither the 128-byte preamble nor a file meta header.
        ds = pydicom.dcmread(path, force=True, defer_size=DEFER_ELEMENTS_OVER)
    except InvalidDicomError as exc:
        raise UnreadableImage(f"not a DICOM file: {one_line(exc)}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _syntax_as_read(ds)
    return ds


def _syntax_as_read(ds: Dataset) -> str:
    """The uncompressed transfer syntax pydicom detected while parsing a file that does not
    name one; compressed pixel data cannot be decoded without the name."""
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise UnreadableImage("compressed pixel data but no transfer syntax in the file")
    implicit_vr, little_endian = ds.original_encoding
    if not little_endian:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian


def _metadata(ds: Dataset) -> dict[str, str]:
    """The DICOM_FIELDS present with a value, as text (multiple values joined by `\\`)."""
    out = {}
    for keyword in DICOM_FIELDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[keyword] = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Z]+", text.upper()))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        return " ".join(map(str, value))
    return str(value or "").strip()


def _require_frontal_chest_radiograph(ds: Dataset) -> None:
    """Raise SkipImage unless the attributes describe one frontal chest radiograph."""
    modality = _text(ds, "Modality").upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise SkipImage(f"modality {modality or 'not given'}: not a radiograph (CR or DX)")
    _require_chest(ds)
    _require_frontal_view(ds)
    frames = _text(ds, "NumberOfFrames") or "1"
    if not frames.isdigit() or int(frames) > 1:
        raise SkipImage(f"multi-frame object ({frames} frames), not a single radiograph")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # CR and DX are greyscale by definition: colour here is a screenshot or a photo.
        raise SkipImage(f"colour image ({photometric}), not a greyscale radiograph")


def _require_chest(ds: Dataset) -> None:
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part:
        if body_part not in CHEST_BODY_PARTS:
            raise SkipImage(f"body part examined is {body_part}, not the chest")
        return
    for keyword in DESCRIPTION_KEYWORDS:
        words = _words(_text(ds, keyword))
        other = sorted(words & OTHER_BODY_PART_WORDS)
        if other and not words & CHEST_WORDS:
            raise SkipImage(f"no body part examined, and {keyword} "
                            f"'{_text(ds, keyword)}' names {other[0]}, not the chest")


def _require_frontal_view(ds: Dataset) -> None:
    view = _text(ds, "ViewPosition")
    if view:
        if _words(view) & NOT_FRONTAL_VIEW_WORDS:
            raise SkipImage(f"view position {view}: lateral or oblique, not a frontal view")
        return
    for keyword in DESCRIPTION_KEYWORDS:
        if _words(_text(ds, keyword)) & NOT_FRONTAL_VIEW_WORDS:
            raise SkipImage(f"no view position, and {keyword} '{_text(ds, keyword)}' "
                            "names a lateral or oblique view")


def _render(ds: Dataset) -> np.ndarray:
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
    stored = _keep_stored_bits(_decode(ds), int(ds.BitsStored))
    values = _modality_values(stored, ds)
    display = _voi_values(values, ds)
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":  # minimum value is white
        np.subtract(1.0, display, out=display)
    display *= 255.0
    return np.rint(display, out=display).astype(np.uint8)


def _decode(ds: Dataset) -> np.ndarray:
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
    try:
        return ds.pixel_array  # reads the deferred pixel data now
    except OSError:
        raise  # the file itself went away or became unreadable: `load` says so
    except Exception as exc:  # decoder and buffer errors all mean: these pixels are unusable
        raise UnreadableImage(f"cannot decode {syntax.name} pixel data: {one_line(exc)}") from exc


def _keep_stored_bits(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """Only the low Bits Stored bits hold the value (PS3.5 8.1.1); the others may carry
    overlays or junk. The shift pair masks them and sign-extends signed data alike."""
    unused = pixels.dtype.itemsize * 8 - bits_stored
    if unused > 0:
        np.left_shift(pixels, unused, out=pixels)
        np.right_shift(pixels, unused, out=pixels)
    return pixels


def _modality_values(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values, float32 (pydicom's rescale would use float64)."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(pixels, ds).astype(np.float32)
    values = pixels.astype(np.float32)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


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
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        values -= center
        values *= -4.0 / width
        with np.errstate(over="ignore"):
            np.exp(values, out=values)
        values += 1.0
        return np.reciprocal(values, out=values)
    if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
        values -= center
        values /= width
    else:  # LINEAR, PS3.3 C.11.2.1.2.1
        values -= center - 0.5
        values /= max(width - 1.0, 1e-3)
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    """The first (centre, width) pair, or None when absent or unusable (width <= 0)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    if isinstance(center, MultiValue):
        center = center[0]
    if isinstance(width, MultiValue):
        width = width[0]
    return (float(center), float(width)) if float(width) > 0 else None


def _voi_lut_values(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT, scaled by the bit depth its entries actually use: descriptors
    often declare 16 bits for 12-bit tables."""
    entries, first_mapped = ds.VOILUTSequence[0].LUTDescriptor[:2]
    table = apply_voi(np.arange(first_mapped, first_mapped + (entries or 2**16)), ds)
    top = 2 ** max(int(table.max()).bit_length(), 1) - 1
    display = apply_voi(np.rint(values).astype(np.int32), ds).astype(np.float32)
    display /= top
    return display


def _min_max_values(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= 1.0 / (high - low) if high > low else 0.0
    return values
