"""The class activation map of one classified image as a DICOM Segmentation of type
FRACTIONAL (highdicom), at the source image's own rows and columns and referring to it, in a
series of its own: a viewer overlays it on the X-ray, toggles it and sets its opacity,
where the Secondary Capture is a picture beside it.

The map's coarse grid (the network's last feature map, e.g. 7 x 7) is stretched bilinearly
over the image, as the report's overlay is; its values, 0..1 for the decided class, are
stored as fractions of 255. The segment is "Pneumonia" (category Finding), found by the
model as an automatic algorithm: where the model looked for its decision, not a delineation
of disease."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pneumoscan.dicomout.equipment import complete, contributing_equipment, new_instance
from pneumoscan.dicomout.source import SourceImage
from pneumoscan.dicomout.vocabulary import CAM_CATEGORY, CAM_PROPERTY, NEURAL_NETWORK
from pneumoscan.records import FileResult, RunInfo

MAX_FRACTION = 255
SEGMENT_LABEL = "Class activation map"


def cam_on_source_grid(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The CAM (h, w) in 0..1 stretched bilinearly to (rows, columns)."""
    small = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    return np.asarray(Image.fromarray(small).resize((columns, rows),
                                                     Image.Resampling.BILINEAR))


def cam_segmentation(result: FileResult, source: SourceImage, run: RunInfo,
                     instance_number: int = 1) -> hd.seg.Segmentation:
    """Needs the result's CAM and the source's Rows and Columns (SourceImage.has_geometry)."""
    rows, columns = int(source.metadata["Rows"]), int(source.metadata["Columns"])
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=CAM_CATEGORY, segmented_property_type=CAM_PROPERTY,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=run.model_name, version=run.model_version, family=NEURAL_NETWORK,
            parameters={"sha256": run.model_sha256}))
    segmentation = hd.seg.Segmentation(
        source_images=[_source_dataset(source, rows, columns)],
        pixel_array=cam_on_source_grid(result.cam, rows, columns)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        max_fractional_value=MAX_FRACTION,
        segment_descriptions=[description],
        manufacturer_model_name=run.model_name[:64],
        software_versions=f"pneumoscan {run.pneumoscan_version}",
        device_serial_number=run.model_sha256[:16],
        content_description="Class activation map (research use)",
        content_label="CAM",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=contributing_equipment(run),
        **new_instance("seg", source.study_uid, source.sop_uid, run, instance_number))
    orientation = source.metadata.get("PatientOrientation", "")
    # General Image module: required without a frame of reference; empty when unknown.
    segmentation.PatientOrientation = orientation.split("\\") if orientation else None
    complete(segmentation, source, run)
    return segmentation


def _source_dataset(source: SourceImage, rows: int, columns: int) -> Dataset:
    """What highdicom reads of the source image: its identity, patient and study, size."""
    ds = source.dataset()
    ds.Modality = source.metadata.get("Modality", "")
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if source.metadata.get("PatientOrientation"):
        ds.PatientOrientation = source.metadata["PatientOrientation"].split("\\")
    return ds
