"""The DICOM vocabulary of pneumoscan's outputs, in one place: the coded concepts they state
(SNOMED CT, DICOM, LOINC, IHE, and the one private code) and the SOP classes they are."""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

# The SR (TID 1500, as IHE AI Results profiles it).
PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
FINDING = codes.SCT.Finding  # the finding category (SCT 404684003 "Clinical finding")
FINDING_SITE = codes.SCT.Lung
PRESENCE = Code("705057003", "SCT", "Presence")
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent
PROBABILITY, THRESHOLD = codes.DCM.Probability, codes.DCM.ThresholdValue
NO_UNITS = codes.UCUM.NoUnits
COMMENT = codes.DCM.Comment  # a text item every SR viewer shows
DEVICE = codes.DCM.Device
YES, NO = codes.SCT.Yes, codes.SCT.No
SOURCE = Code("260753009", "SCT", "Source")  # an Image Library entry
MODALITY_CODES = {"CR": codes.DCM.ComputedRadiography, "DX": codes.DCM.DigitalRadiography}
# IHE AIR: the purpose of reference of the algorithm's Contributing Equipment item (a code
# IHE has not yet had assigned by DICOM, hence its temporary value).
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
# No standard code says "inside the algorithm's intended use"; a private scheme does.
PRIVATE_SCHEME = "99PNEUMOSCAN"
IN_SCOPE = Code("in-scope", PRIVATE_SCHEME, "Within the model's intended use")

# The Encapsulated PDF: LOINC 18748-4, the document type of an imaging report.
DOCUMENT_CONCEPT = Code("18748-4", "LN", "Diagnostic imaging study")

# The heat map as a segmentation: where the model looked for pneumonia.
CAM_CATEGORY = FINDING
CAM_PROPERTY = PNEUMONIA
NEURAL_NETWORK = codes.DCM.ArtificialIntelligence  # the algorithm family (CID 7162)

# SOP classes of the outputs, and the prefix of their file names.
SR_SOP_CLASS = Comprehensive3DSRStorage
KIND_PREFIX = {EncapsulatedPDFStorage: "PDF", SecondaryCaptureImageStorage: "SC",
               Comprehensive3DSRStorage: "SR", SegmentationStorage: "SEG"}
