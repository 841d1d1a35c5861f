"""A study's report as an Encapsulated PDF instance (PS3.3 A.45.1) in a new series of the
study. highdicom has no class for it: its SOPClass base makes the patient, study, series and
SOP common modules, and the encapsulated document module is set here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from pneumoscan.dicomout.equipment import (
    complete,
    contributing_equipment,
    new_instance,
    software_versions,
)
from pneumoscan.dicomout.source import SourceImage
from pneumoscan.dicomout.vocabulary import DOCUMENT_CONCEPT
from pneumoscan.records import RunInfo

DOCUMENT_TITLE = "Chest X-ray pneumonia screening report (research use)"


class EncapsulatedPDF(hd.SOPClass):
    def __init__(self, pdf: bytes, sources: Sequence[SourceImage], run: RunInfo):
        first = sources[0]
        now = datetime.now()
        super().__init__(
            sop_class_uid=EncapsulatedPDFStorage,
            modality="DOC",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            study_instance_uid=first.study_uid,
            **new_instance("pdf", first.study_uid, first.study_uid, run),
            software_versions=software_versions(run),
            content_date=now.date(), content_time=now.time(),
            **first.patient_and_study())
        self._add_contributing_equipment(contributing_equipment(run))
        complete(self, first, run)
        # SC Equipment module: a workstation made it.
        self.ConversionType = "WSD"
        # Encapsulated Document module.
        self.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
        self.BurnedInAnnotation = "YES"
        self.DocumentTitle = DOCUMENT_TITLE
        self.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(DOCUMENT_CONCEPT)]
        self.SourceInstanceSequence = [source.reference() for source in sources]
        self.MIMETypeOfEncapsulatedDocument = "application/pdf"
        self.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)  # even length, NUL padded
        self.EncapsulatedDocumentLength = len(pdf)
