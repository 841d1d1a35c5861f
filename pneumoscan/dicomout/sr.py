"""The Structured Report of one classified image: a TID 1500 Measurement Report with one
measurement group holding the probability of pneumonia and the decision threshold
(measurements), pneumonia present/absent and, when the result says it, whether the image is
within the model's intended use (qualitative evaluations); the algorithm (TID 4019) is
identified by the model's name, version and SHA-256, and the group refers to the source
image by its SOP Instance UID."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pneumoscan.dicomout.equipment import (MANUFACTURER, algorithm_identification,
                                           contributing_equipment, new_instance)
from pneumoscan.dicomout.source import SourceImage, derived_uid
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.results.summary import POSITIVE

PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
# No standard code says "inside the algorithm's intended use"; a private scheme does.
PRIVATE_SCHEME = "99PNEUMOSCAN"
IN_SCOPE = Code("in-scope", PRIVATE_SCHEME, "Within the model's intended use")


def structured_report(result: FileResult, source: SourceImage,
                      run: RunInfo) -> hd.sr.ComprehensiveSR:
    threshold = result.threshold if result.threshold is not None else run.threshold
    measurements = [
        hd.sr.Measurement(name=codes.DCM.Probability, value=result.probability,
                          unit=codes.UCUM.NoUnits),
        hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=threshold,
                          unit=codes.UCUM.NoUnits),
    ]
    evaluations = [hd.sr.QualitativeEvaluation(
        name=PNEUMONIA,
        value=codes.SCT.Present if result.label == POSITIVE else codes.SCT.Absent)]
    in_scope = getattr(result, "in_scope", None)  # set by the scope guard when it ran
    if in_scope is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=IN_SCOPE, value=codes.SCT.Yes if in_scope else codes.SCT.No))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-group", source.sop_uid, run.model_sha256),
            identifier=f"pneumonia classification of {source.sop_uid}"),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_identification(run, threshold),
        finding_sites=[hd.sr.FindingSite(codes.SCT.Chest)],
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.sop_class_uid,
                                                             source.sop_uid)])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", run.model_sha256), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=run.model_name[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=[source.dataset()],
        content=report,
        is_complete=True,
        contributing_equipment=contributing_equipment(run),
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            PRIVATE_SCHEME, name="pneumoscan codes",
            responsible_organization=MANUFACTURER)],
        **new_instance("sr", source.study_uid, source.sop_uid, run))
