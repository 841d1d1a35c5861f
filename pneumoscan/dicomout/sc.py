"""The CAM overlay of one classified image as a Secondary Capture (DERIVED, SECONDARY): the
report's picture of the X-ray beside its class activation map, under a banner that burns in
"NOT FOR PRIMARY DIAGNOSIS" with the model and its decision (and, first, "OUTSIDE INTENDED
USE" for an image the model is not made for), so that no viewer can show the map without the
warning; the numbers of the colour scale under it. Made with --dicom-sc, for PACS that cannot
show the Segmentation (dicomout.seg)."""

from __future__ import annotations

import io
import textwrap

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
from pneumoscan.report.pictures import GAP

FONT_SIZE = 16
MARGIN = 6


def cam_capture(result: FileResult, source: SourceImage, run: RunInfo,
                instance_number: int = 1) -> hd.sc.SCImage:
    """Needs the result's report picture (a run that renders)."""
    orientation = source.metadata.get("PatientOrientation", "").split("\\")
    picture = Image.open(io.BytesIO(bytes(result.picture))).convert("RGB")
    pixels = np.asarray(_with_banner(_with_scale_numbers(picture), _banner_text(result, run)))
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
    """Outside the model's intended use, that comes first: the decision below it is the
    model's output, not a finding."""
    decision = (f"{run.model_name} {run.model_version}: P(pneumonia) "
                f"{result.probability:.2f}, threshold {result.threshold:.2f}, {result.label}")
    lines = [f"{NOT_FOR_DIAGNOSIS} - research use only", decision]
    if result.in_scope is False:
        lines.insert(0, "OUTSIDE INTENDED USE - no finding stated: "
                        + "; ".join(result.scope_reasons))
    return lines


def _with_scale_numbers(picture: Image.Image) -> Image.Image:
    """The picture with the values of its colour scale written under it: 0, 0.5 and 1 of
    the CAM (relative to its own maximum, for the decided class)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    shown = (picture.width - GAP) // 2  # the X-ray, then the overlay with its scale under it
    framed = Image.new("RGB", (picture.width, picture.height + FONT_SIZE + MARGIN), "white")
    framed.paste(picture, (0, 0))
    draw = ImageDraw.Draw(framed)
    left, y = shown + GAP, picture.height + MARGIN // 2
    for value, anchor, x in (("0", "la", left), ("0.5", "ma", left + shown // 2),
                             ("1", "ra", left + shown)):
        draw.text((x, y), value, fill="black", font=font, anchor=anchor)
    draw.text((shown // 2, y), "CAM, relative: low to high", fill="black", font=font,
              anchor="ma")
    return framed


def _with_banner(picture: Image.Image, text: list[str]) -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    # Wrapped to the picture's width: a banner cut off would hide what matters most.
    columns = max(20, int((picture.width - 2 * MARGIN) // font.getlength("n")))
    lines = [wrapped for line in text for wrapped in textwrap.wrap(line, columns)]
    height = len(lines) * (FONT_SIZE + MARGIN) + MARGIN
    framed = Image.new("RGB", (picture.width, picture.height + height), "black")
    framed.paste(picture, (0, height))
    draw = ImageDraw.Draw(framed)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * (FONT_SIZE + MARGIN)), line, fill="white", font=font)
    return framed
