"""The CAM overlay of one classified image as a Secondary Capture (DERIVED, SECONDARY): the
report's picture of the X-ray beside its class activation map, under a banner that burns in
"NOT FOR PRIMARY DIAGNOSIS" with the model and its decision, so that no viewer can show the
map without the warning."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumoscan.dicomout.equipment import (
    NOT_FOR_DIAGNOSIS,
    complete,
    contributing_equipment,
    new_instance,
)
from pneumoscan.dicomout.source import SourceImage
from pneumoscan.records import FileResult, RunInfo

BANNER_LINES = 2
FONT_SIZE = 16
MARGIN = 6


def cam_capture(result: FileResult, source: SourceImage, run: RunInfo,
                instance_number: int = 1) -> hd.sc.SCImage:
    """Needs the result's report picture (a run that renders)."""
    orientation = source.metadata.get("PatientOrientation", "").split("\\")
    pixels = np.asarray(_with_banner(Image.open(io.BytesIO(bytes(result.picture))).convert("RGB"),
                                     _banner_text(result, run)))
    capture = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        # The picture keeps the source's pixel layout, hence its orientation.
        coordinate_system="PATIENT",
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        contributing_equipment=contributing_equipment(run),
        study_instance_uid=source.study_uid,
        **new_instance("sc", source.study_uid, source.sop_uid, run, instance_number),
        **source.patient_and_study())
    complete(capture, source, run)
    if len(orientation) != 2:
        capture.PatientOrientation = None  # unknown: empty (type 2), not highdicom's guess
    # Only frontal chest radiographs are classified; a chest is not a paired body part, so
    # no laterality is due.
    capture.BodyPartExamined = "CHEST"
    capture.BurnedInAnnotation = "YES"
    capture.DerivationDescription = (f"Class activation map of {run.model_name} "
                                     f"{run.model_version} over the source image")
    capture.SourceImageSequence = [source.reference()]
    return capture


def _banner_text(result: FileResult, run: RunInfo) -> list[str]:
    decision = (f"{run.model_name} {run.model_version}: P(pneumonia) "
                f"{result.probability:.2f}, threshold {result.threshold:.2f}, {result.label}")
    return [f"{NOT_FOR_DIAGNOSIS} - research use only", decision]


def _with_banner(picture: Image.Image, lines: list[str]) -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    height = BANNER_LINES * (FONT_SIZE + MARGIN) + MARGIN
    framed = Image.new("RGB", (picture.width, picture.height + height), "black")
    framed.paste(picture, (0, height))
    draw = ImageDraw.Draw(framed)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * (FONT_SIZE + MARGIN)), line, fill="white", font=font)
    return framed
