"""Who made an output: pneumoscan and its model, by name, version and SHA-256, as the
Contributing Equipment of every output and the algorithm identification (TID 4019) of
every SR measurement."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from pneumoscan.dicomout.source import derived_uid
from pneumoscan.records import RunInfo

MANUFACTURER = "pneumoscan"
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
# New series in the source study, numbered high to stay clear of the modality's own.
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "pdf": 9903}
SERIES_DESCRIPTIONS = {
    "sr": "pneumoscan AI result (research use)",
    "sc": f"pneumoscan CAM overlay ({NOT_FOR_DIAGNOSIS.lower()})",
    "pdf": "pneumoscan report (research use)",
}


def model_description(run: RunInfo) -> str:
    return f"model {run.model_name} {run.model_version} sha256 {run.model_sha256}"


def software_versions(run: RunInfo) -> list[str]:
    return [f"pneumoscan {run.pneumoscan_version}", f"{run.model_name} {run.model_version}"]


def contributing_equipment(run: RunInfo) -> list[hd.ContributingEquipment]:
    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=run.model_name[:64],
        software_versions=software_versions(run),
        contribution_description=f"Classified by {model_description(run)}; "
                                 f"{NOT_FOR_DIAGNOSIS.lower()}")]


def algorithm_identification(run: RunInfo, threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=run.model_name, version=run.model_version,
        parameters=[f"sha256={run.model_sha256}", f"threshold={threshold:.6g}"],
        manufacturer=MANUFACTURER)


def new_instance(kind: str, study_uid: str, derived_from: str, run: RunInfo) -> dict:
    """highdicom arguments placing an output of `kind` ("sr", "sc", "pdf") in its series of
    the source study `study_uid` (given apart), with UIDs derived from `derived_from` (the
    source instance's UID, or the study's) and the model: the same output of the same model
    replaces itself."""
    return dict(
        series_instance_uid=derived_uid(f"{kind}-series", study_uid, run.model_sha256),
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=derived_uid(kind, derived_from, run.model_sha256),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=SERIES_DESCRIPTIONS[kind],
    )
