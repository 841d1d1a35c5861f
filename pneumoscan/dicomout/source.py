"""What the DICOM outputs know of a source image: its identity and the patient and study
modules, as the pipeline recorded them in the result's metadata (already pseudonymised
under --anonymize, so every output shows the same identity as the report and JSON)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.dataset import Dataset

from pneumoscan.records import FileResult

# Attributes an output cannot be made without: it goes into the source's study and refers
# to the source instance.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
# Copied into the outputs' patient and general study modules when the source has them
# (keyword -> highdicom's argument).
PATIENT_AND_STUDY = {
    "PatientID": "patient_id", "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
    "StudyDate": "study_date", "StudyTime": "study_time", "StudyID": "study_id",
    "AccessionNumber": "accession_number", "ReferringPhysicianName": "referring_physician_name",
}


@dataclass(frozen=True)
class SourceImage:
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_uid: str
    metadata: dict[str, str]

    @classmethod
    def of(cls, result: FileResult) -> SourceImage | None:
        """The source of a result that came from a DICOM image, else None."""
        if not all(result.metadata.get(k) for k in REQUIRED):
            return None
        return cls(*(result.metadata[k] for k in REQUIRED), metadata=result.metadata)

    @property
    def has_size(self) -> bool:
        """Whether the source's Rows and Columns are known (results recorded since they
        are): a heat map on its pixel grid can be made."""
        return bool(self.metadata.get("Rows") and self.metadata.get("Columns"))

    def patient_and_study(self) -> dict[str, str]:
        """highdicom constructor arguments of the patient and general study modules."""
        values = {**self.metadata, "PatientName": self.patient_name}
        kwargs = {argument: values[k] for k, argument in PATIENT_AND_STUDY.items()
                  if values.get(k)}
        # highdicom accepts only the enumerated sex values (M, F, O).
        if kwargs.get("patient_sex") not in ("M", "F", "O"):
            kwargs.pop("patient_sex", None)
        # A DICOM time may carry a fraction that highdicom's parser refuses; seconds suffice.
        if "study_time" in kwargs:
            kwargs["study_time"] = kwargs["study_time"].split(".")[0]
        return kwargs

    @property
    def patient_name(self) -> str | None:
        """The name, or under --anonymize the pseudonym as a family name (the trailing
        caret says it is one)."""
        name = self.metadata.get("PatientName")
        if name is None and self.metadata.get("PatientID"):
            return self.metadata["PatientID"] + "^"
        return name

    def dataset(self) -> Dataset:
        """A data set holding what the source's header says of patient, study and instance:
        the evidence an SR refers to."""
        ds = Dataset()
        for keyword in (*REQUIRED, *PATIENT_AND_STUDY):
            setattr(ds, keyword, self.metadata.get(keyword) or "")
        ds.PatientName = self.patient_name or ""
        return ds

    def reference(self) -> Dataset:
        """An item of a referenced/source image sequence naming this image."""
        reference = Dataset()
        reference.ReferencedSOPClassUID = self.sop_class_uid
        reference.ReferencedSOPInstanceUID = self.sop_uid
        return reference


# The namespace of the name-based UUIDs behind our UIDs.
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pneumoscan:dicom-outputs")


def derived_uid(*parts: str) -> str:
    """A UID that is the same whenever `parts` are: an output made again for the same source
    and model replaces the one sent before instead of adding a copy. A name-based UUID as a
    2.25 UID (PS3.5 B.2). Not pydicom's generate_uid(prefix=None, entropy_srcs=...), which
    ignores the entropy and returns a random UUID when there is no prefix."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}"
