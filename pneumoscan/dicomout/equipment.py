"""Who made an output: pneumoscan and its model, by name, version and SHA-256, as the
Contributing Equipment of every output and the algorithm identification (TID 4019) of
every SR measurement."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

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
