"""The DICOM outputs of a study, as data sets: written to a folder (`--dicom-out`) or sent to
a PACS (`--push`). Only studies with at least one classified DICOM image get them: a
report saying "not classified" has no place in, say, a knee study."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from pneumoscan.dicomout.pdf import EncapsulatedPDF
from pneumoscan.dicomout.sc import cam_capture
from pneumoscan.dicomout.seg import cam_segmentation
from pneumoscan.dicomout.source import SourceImage
from pneumoscan.dicomout.sr import structured_report
from pneumoscan.dicomout.vocabulary import KIND_PREFIX
from pneumoscan.files import study_file_stem, write_atomic
from pneumoscan.records import RunInfo
from pneumoscan.report.html import study_pdf
from pneumoscan.results.summary import Study

log = logging.getLogger(__name__)


def study_outputs(run: RunInfo, study: Study, capture: bool = False,
                  pdf: Callable[[RunInfo, Study], bytes] | None = None) -> list[Dataset]:
    """The study's Encapsulated PDF report (`pdf`, default: rendered here), then for each
    classified DICOM image its SR and its CAM as a Segmentation, and with `capture` as a
    Secondary Capture picture too; nothing when the study has no classified DICOM image. A
    result without its CAM grid or the source's size (recorded by an older pneumoscan)
    gets the picture instead of the Segmentation. Results need their report pictures (a
    run that renders)."""
    classified = [(r, SourceImage.of(r)) for r in study.classified]
    classified = [(r, source) for r, source in classified if source]
    if not classified:
        return []
    outputs: list[Dataset] = [EncapsulatedPDF((pdf or study_pdf)(run, study),
                                              [source for _, source in classified], run)]
    # Numbered in the study's order of images: distinct within each output series.
    for number, (result, source) in enumerate(classified, start=1):
        outputs.append(structured_report(result, source, run, number))
        overlay = result.cam is not None and source.has_size
        if overlay:
            outputs.append(cam_segmentation(result, source, run, number))
        else:
            log.warning("%s: no CAM grid or image size recorded (an older result): its heat "
                        "map goes as a Secondary Capture picture; --force makes it again",
                        source.sop_uid)
        if capture or not overlay:
            outputs.append(cam_capture(result, source, run, number))
    return outputs


def file_name(dataset: Dataset) -> str:
    """`SR-<SOP Instance UID>.dcm`, `SEG-...`, `SC-...`, `PDF-...`: the same name for the
    same output."""
    return f"{KIND_PREFIX[dataset.SOPClassUID]}-{dataset.SOPInstanceUID}.dcm"


def encode(dataset: Dataset) -> bytes:
    """The data set as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_study_outputs(directory: Path, study: Study, outputs: list[Dataset]) -> list[Path]:
    """Into `directory`/<study stem>/, named by `file_name`; returns the files written."""
    folder = Path(directory) / study_file_stem(study.key)
    written = []
    for dataset in outputs:
        path = folder / file_name(dataset)
        write_atomic(path, encode(dataset))
        written.append(path)
    return written
