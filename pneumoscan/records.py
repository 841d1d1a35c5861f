"""Plain data passed between the pipeline's stages.

discover -> `InputFile` -> load -> `LoadedImage` (or a `FileResult` with status skipped/error)
-> preprocess -> batched inference + CAM -> `FileResult` -> report / JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, SupportsBytes

import numpy as np

FileKind = Literal["dicom", "png", "jpeg", "tiff"]
Status = Literal["ok", "skipped", "error"]

# DICOM attributes kept for each image (keyword -> report label). The DICOM outputs copy
# the patient and study modules from them and refer to the source instance by its series,
# SOP class and SOP instance UIDs; the report leaves out the NOT_SHOWN ones.
DICOM_FIELDS = {
    "PatientID": "Patient ID",
    "PatientName": "Patient name",
    "PatientBirthDate": "Birth date",
    "PatientAge": "Age",
    "PatientSex": "Sex",
    "StudyInstanceUID": "Study UID",
    "StudyDate": "Study date",
    "StudyTime": "Study time",
    "StudyID": "Study ID",
    "AccessionNumber": "Accession number",
    "StudyDescription": "Study description",
    "ReferringPhysicianName": "Referring physician",
    "Modality": "Modality",
    "ViewPosition": "View position",
    "BodyPartExamined": "Body part",
    "PatientOrientation": "Orientation",
    "SeriesInstanceUID": "Series UID",
    "SOPClassUID": "SOP class UID",
    "SOPInstanceUID": "SOP instance UID",
    "Rows": "Rows",
    "Columns": "Columns",
    "ImagerPixelSpacing": "Imager pixel spacing",
    "FrameOfReferenceUID": "Frame of reference UID",
}
NOT_SHOWN = frozenset({"SeriesInstanceUID", "SOPClassUID", "PatientOrientation", "Rows",
                       "Columns", "ImagerPixelSpacing", "FrameOfReferenceUID"})


@dataclass(frozen=True)
class InputFile:
    """A file (or a folder not entered) found under the scanned folder. `kind` is None when
    it will not be read; then `skip_reason` says why, and `unreadable` tells a file that
    could not even be opened (an error) from one that is not an image (skipped). `link`:
    found as a symbolic link to a file, so a link is expected there when it is read."""
    path: Path
    kind: FileKind | None
    skip_reason: str | None = None
    unreadable: bool = False
    link: bool = False


@dataclass
class LoadedImage:
    """Pixels ready for display and preprocessing.

    `pixels` is greyscale uint8 (H, W) with 0 = black, after the modality LUT, VOI window
    and MONOCHROME1 inversion for DICOM. It may be decoded at reduced resolution (JPEG
    DCT scaling, JPEG 2000 wavelet levels) when the full size is not needed. None once the
    pipeline has made what it needs of them (inference.pipeline.prepare)."""
    path: Path
    study: str
    pixels: np.ndarray | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class FileResult:
    """The outcome for one input file; errors are values here, not exceptions. `study` is
    None for a file that is not an image (it belongs to no study)."""
    path: Path
    study: str | None
    status: Status
    reason: str | None = None
    probability: float | None = None  # of pneumonia
    label: str | None = None
    threshold: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Classified images only: whether the image is one the model was made for (see
    # inference/scope.py), and why not, one line per reason.
    in_scope: bool | None = None
    scope_reasons: list[str] = field(default_factory=list)
    # Classified images: the class activation map of the decided class, the network's
    # coarse grid (e.g. 7 x 7) in 0..1, rows of columns (the DICOM heat map is made of it).
    cam: list[list[float]] | None = None
    # For the outputs only (not serialised). `view`: the X-ray reduced to the size the
    # pictures show it (greyscale uint8 (H, W), 0 = black), kept by the engine when an
    # output draws pictures, dropped once drawn. `picture`: the X-ray and its CAM overlay
    # side by side, JPEG (report.pictures.render_picture), or what gives its bytes when
    # asked (a picture kept in the state ledger).
    view: np.ndarray | None = None
    picture: bytes | SupportsBytes | None = None
    seconds: float | None = None
    from_ledger: bool = False  # taken from the state ledger, not computed in this run

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "study": self.study,
            "status": self.status,
            "reason": self.reason,
            "probability": self.probability,
            "label": self.label,
            "threshold": self.threshold,
            "in_scope": self.in_scope,
            "scope_reasons": self.scope_reasons,
            "cam": self.cam,
            "metadata": self.metadata,
        }


@dataclass
class RunInfo:
    """What produced a set of results."""
    model_name: str
    model_version: str
    model_sha256: str
    provider: str
    pneumoscan_version: str
    started: str
    finished: str | None = None
    threshold: float | None = None
    cam_method: str | None = None  # how the model's heat maps are computed (ModelInfo)

    def to_json(self) -> dict:
        return {
            "model": {"name": self.model_name, "version": self.model_version,
                      "sha256": self.model_sha256, "cam_method": self.cam_method},
            "provider": self.provider,
            "version": self.pneumoscan_version,
            "threshold": self.threshold,
            "started": self.started,
            "finished": self.finished,
        }
