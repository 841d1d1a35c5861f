"""Who made an output: pneumoscan and its model, by name, version and SHA-256, as the
Contributing Equipment of every output (the algorithm's item as IHE AI Results has it), the
device observer of every SR and the algorithm identification (TID 4019) of its
measurements."""

from __future__ import annotations

from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pneumoscan.dicomout.source import SourceImage, derived_uid
from pneumoscan.dicomout.vocabulary import PROCESSING_ALGORITHM
from pneumoscan.records import RunInfo

MANUFACTURER = "pneumoscan"
NOT_FOR_DIAGNOSIS = "NOT FOR PRIMARY DIAGNOSIS"
# New series in the source study, numbered high to stay clear of the modality's own.
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "pdf": 9903, "seg": 9904}
SERIES_DESCRIPTIONS = {
    "sr": "pneumoscan AI result (research use)",
    "sc": f"pneumoscan CAM overlay ({NOT_FOR_DIAGNOSIS.lower()})",
    "pdf": "pneumoscan report (research use)",
    "seg": f"pneumoscan CAM heat map ({NOT_FOR_DIAGNOSIS.lower()})",
}


def model_description(run: RunInfo) -> str:
    return f"model {run.model_name} {run.model_version} sha256 {run.model_sha256}"


def software_versions(run: RunInfo) -> list[str]:
    return [f"pneumoscan {run.pneumoscan_version}", f"{run.model_name} {run.model_version}"]


def device_uid(run: RunInfo) -> str:
    """The algorithm as a device: its Device UID in Contributing Equipment, and the Device
    Observer UID of the SR, as IHE AIR requires them to match."""
    return derived_uid("device", run.model_sha256)


def contributing_equipment(run: RunInfo) -> list[hd.ContributingEquipment]:
    """pneumoscan as the processing equipment; `complete` adds the algorithm's own item."""
    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name="pneumoscan",
        software_versions=software_versions(run),
        contribution_description=f"Classified by {model_description(run)}; "
                                 f"{NOT_FOR_DIAGNOSIS.lower()}")]


def algorithm_equipment(run: RunInfo) -> Dataset:
    """The algorithm's Contributing Equipment item as IHE AIR requires it: purpose
    Processing Algorithm, manufacturer, model name, software versions, Device UID (the SR's
    Device Observer UID) and contribution date and time. By hand: highdicom accepts only
    the purposes of DICOM's CID 7005, which the IHE code is not (yet) in."""
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = run.model_name[:64]
    item.SoftwareVersions = software_versions(run)
    item.DeviceUID = device_uid(run)
    item.ContributionDateTime = datetime.fromisoformat(run.started).strftime("%Y%m%d%H%M%S%z")
    item.ContributionDescription = f"{model_description(run)}; {NOT_FOR_DIAGNOSIS.lower()}"
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    return item


def complete(dataset: Dataset, source: SourceImage, run: RunInfo) -> None:
    """What highdicom's constructors do not take: the algorithm's Contributing Equipment
    item (with the IHE coding scheme it uses), and the source's Study Description (so that
    every instance of the study agrees on it)."""
    dataset.ContributingEquipmentSequence.append(algorithm_equipment(run))
    schemes = dataset.setdefault("CodingSchemeIdentificationSequence", []).value
    schemes.append(hd.coding_schemes.CodingSchemeIdentificationItem(
        PROCESSING_ALGORITHM.scheme_designator, name="IHE Radiology Technical Framework",
        responsible_organization="IHE"))
    if source.metadata.get("StudyDescription"):
        dataset.StudyDescription = source.metadata["StudyDescription"]


def algorithm_identification(run: RunInfo, threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=run.model_name, version=run.model_version,
        parameters=[f"sha256={run.model_sha256}", f"threshold={threshold:.6g}"],
        manufacturer=MANUFACTURER)


def new_instance(kind: str, study_uid: str, derived_from: str, run: RunInfo,
                 instance_number: int = 1) -> dict:
    """highdicom arguments placing an output of `kind` ("sr", "sc", "pdf") in its series of
    the source study `study_uid` (given apart), with UIDs derived from `derived_from` (the
    source instance's UID, or the study's) and the model: the same output of the same model
    replaces itself."""
    return dict(
        series_instance_uid=derived_uid(f"{kind}-series", study_uid, run.model_sha256),
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=derived_uid(kind, derived_from, run.model_sha256),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=SERIES_DESCRIPTIONS[kind],
    )
