"""The DICOM outputs of a study, as data sets: written to a folder (`--dicom-out`) or sent to
a PACS (`--push`). Only studies with at least one classified DICOM image get them: a
report saying "not classified" has no place in, say, a knee study."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (ComprehensiveSRStorage, EncapsulatedPDFStorage,
                         SecondaryCaptureImageStorage)

from pneumoscan.dicomout.pdf import EncapsulatedPDF
from pneumoscan.dicomout.sc import cam_capture
from pneumoscan.dicomout.source import SourceImage
from pneumoscan.dicomout.sr import structured_report
from pneumoscan.files import study_file_stem, write_atomic
from pneumoscan.records import RunInfo
from pneumoscan.report.html import study_pdf
from pneumoscan.results.summary import Study

KIND_PREFIX = {EncapsulatedPDFStorage: "PDF", SecondaryCaptureImageStorage: "SC",
               ComprehensiveSRStorage: "SR"}


def study_outputs(run: RunInfo, study: Study,
                  pdf: Callable[[RunInfo, Study], bytes] | None = None) -> list[Dataset]:
    """The study's Encapsulated PDF report (`pdf`, default: rendered here), then for each
    classified DICOM image its SR and its CAM Secondary Capture; nothing when the study
    has no classified DICOM image. Results need their report pictures (a run that
    renders)."""
    classified = [(r, SourceImage.of(r)) for r in study.classified]
    classified = [(r, source) for r, source in classified if source]
    if not classified:
        return []
    outputs: list[Dataset] = [EncapsulatedPDF((pdf or study_pdf)(run, study),
                                              [source for _, source in classified], run)]
    for result, source in classified:
        outputs += [structured_report(result, source, run), cam_capture(result, source, run)]
    return outputs


def file_name(dataset: Dataset) -> str:
    """`SR-<SOP Instance UID>.dcm`, `SC-...`, `PDF-...`: the same name for the same output."""
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
