"""The Structured Report of one classified image, in the form IHE AI Results (AIR) profiles
TID 1500: a Comprehensive 3D SR Measurement Report observed by the algorithm as a device
(named after the model; its Device Observer UID is the Device UID of the algorithm's
Contributing Equipment item), an Image Library listing the source image, and one
measurement group: finding "Pneumonia" (category Finding, site Lung), the algorithm (TID
4019: model name, version, SHA-256 and threshold), the probability and the threshold
(measurements), "Presence" of pneumonia Present/Absent and whether the image is within the
model's intended use (qualitative evaluations), referring to the source image.

An image outside the model's intended use gets no Presence at all: the SR asserts no
finding, and says why in a Comment text item, which every SR viewer shows."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pneumoscan.dicomout.equipment import (
    algorithm_identification,
    complete,
    contributing_equipment,
    device_uid,
    new_instance,
)
from pneumoscan.dicomout.source import SourceImage, derived_uid
from pneumoscan.dicomout.vocabulary import (
    ABSENT,
    COMMENT,
    DEVICE,
    FINDING,
    FINDING_SITE,
    IN_SCOPE,
    MODALITY_CODES,
    NO,
    NO_UNITS,
    PNEUMONIA,
    PRESENCE,
    PRESENT,
    PRIVATE_SCHEME,
    PROBABILITY,
    PROCEDURE,
    SOURCE,
    THRESHOLD,
    YES,
)
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.results.summary import POSITIVE


def out_of_scope_comment(result: FileResult) -> str:
    return ("Outside the model's intended use: no finding is stated. "
            + "; ".join(result.scope_reasons or ["the scope check flagged this image"]))


def structured_report(result: FileResult, source: SourceImage, run: RunInfo,
                      instance_number: int = 1) -> hd.sr.Comprehensive3DSR:
    threshold = result.threshold if result.threshold is not None else run.threshold
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=result.probability, unit=NO_UNITS),
        hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=NO_UNITS),
    ]
    evaluations = []
    if result.in_scope is not False:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=PRESENCE, value=PRESENT if result.label == POSITIVE else ABSENT))
    if result.in_scope is not None:  # the scope guard ran
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=IN_SCOPE, value=YES if result.in_scope else NO))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-group", source.sop_uid, run.model_sha256),
            identifier=f"pneumonia classification of {source.sop_uid}"),
        finding_type=PNEUMONIA,
        finding_category=FINDING,
        algorithm_id=algorithm_identification(run, threshold),
        finding_sites=[hd.sr.FindingSite(FINDING_SITE)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.sop_class_uid,
                                                             source.sop_uid)])
    if result.in_scope is False:
        _contained(group).append(hd.sr.TextContentItem(
            name=COMMENT, value=out_of_scope_comment(result),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(run), name=run.model_name[:64],
            manufacturer_name="pneumoscan", model_name=run.model_name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group])
    _contained(report).insert(-1, image_library(source))  # TID 1500 row 6, before row 7
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source.dataset()],
        content=report,
        is_complete=True,
        contributing_equipment=contributing_equipment(run),
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            PRIVATE_SCHEME, name="pneumoscan codes", responsible_organization="pneumoscan")],
        **new_instance("sr", source.study_uid, source.sop_uid, run, instance_number))
    complete(sr, source, run)
    return sr


def image_library(source: SourceImage) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: the source image with its modality, size and orientation.
    Built here rather than by highdicom's (MeasurementReport's referenced_images), which
    requires Imager Pixel Spacing of every radiograph; few CR images have it."""
    acquisition = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
    metadata = source.metadata
    descriptors = [hd.sr.CodeContentItem(name=codes.DCM.Modality,
                                         value=MODALITY_CODES[metadata["Modality"]],
                                         relationship_type=acquisition)]
    descriptors += [hd.sr.NumContentItem(name=name, value=int(metadata[keyword]), unit=pixels,
                                         relationship_type=acquisition)
                    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"),
                                          (codes.DCM.PixelDataColumns, "Columns"))
                    if metadata.get(keyword)]
    orientation = metadata.get("PatientOrientation", "").split("\\")
    if len(orientation) == 2:
        descriptors += [hd.sr.TextContentItem(name=name, value=value,
                                              relationship_type=acquisition)
                        for name, value in zip((codes.DCM.PatientOrientationRow,
                                                codes.DCM.PatientOrientationColumn),
                                               orientation)]
    image = hd.sr.ImageContentItem(
        name=SOURCE, referenced_sop_class_uid=source.sop_class_uid,
        referenced_sop_instance_uid=source.sop_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    image.ContentSequence = descriptors
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    group.ContentSequence = [image]
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = [group]
    return library


def _contained(template: hd.sr.Template) -> list[Dataset]:
    """The content sequence of a template's container (its one item)."""
    return template[0].ContentSequence
