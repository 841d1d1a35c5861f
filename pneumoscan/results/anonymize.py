"""Pseudonyms in place of identity, for reports, JSON, logs and file names that leave the
site (`--anonymize`).

DICOM PS3.15 Annex E's basic profile is the reference for what an anonymized result keeps
of each attribute pneumoscan shows:

| attribute                          | Annex E basic profile       | here                        |
|------------------------------------|-----------------------------|-----------------------------|
| PatientName, PatientBirthDate      | remove / empty (Z)          | removed                     |
| PatientID                          | replace (Z)                 | pseudonym `anon-` + 16 hex  |
| AccessionNumber                    | empty (Z)                   | removed                     |
| StudyDate                          | empty (Z); shifting is the  | removed (no date shifting)  |
|                                    | Modified Dates option       |                             |
| StudyInstanceUID, SOPInstanceUID,  | replace consistently (U)    | `2.25.` UID from its HMAC   |
| SeriesInstanceUID                  |                             |                             |
| SOPClassUID                        | kept                        | kept                        |
| Modality, ViewPosition,            | kept                        | kept when a defined term,   |
| BodyPartExamined                   |                             | else removed (free text)    |
| Rows, Columns, ImagerPixelSpacing  | kept                        | kept (the heat map's grid)  |
| anything else                      |                             | removed                     |

The file's path and its study label are replaced by pseudonyms too (real exports name
folders and files after patients), and a reason never quotes DICOM free text (the loader
quotes only defined terms); the file's own path is replaced in it as a last guard. Pixel
data is not examined: text burned into the image stays (Annex E's Clean Pixel Data option
is not done).

A pseudonym is an HMAC-SHA256 under a secret key kept in the state ledger, so one patient,
file or study gets the same pseudonym in every run with that ledger, and nobody without the
key can recompute it from a name, ID or path.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from pneumoscan.inputs.dicom import BODY_PARTS, MODALITIES, VIEW_POSITIONS
from pneumoscan.records import FileResult

PSEUDONYMISED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Attributes kept only when their value is one of the standard's defined terms.
DEFINED_TERMS = {"Modality": MODALITIES, "ViewPosition": VIEW_POSITIONS,
                 "BodyPartExamined": BODY_PARTS}
# Kept as they are: the kind of object and the image's size say nothing of the patient,
# and the DICOM outputs need them.
KEPT = ("SOPClassUID", "Rows", "Columns", "ImagerPixelSpacing")
PSEUDONYM_PREFIX = "anon-"
# Suffixes kept on a pseudonymised file name: they say the type, not who.
KNOWN_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def pseudonym(key: bytes, identity: str) -> str:
    return PSEUDONYM_PREFIX + _digest(key, identity)[:16]


def _digest(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def pseudonym_uid(key: bytes, uid: str) -> str:
    """A UID under the 2.25 root (a decimal UUID-sized number), the same for the same UID."""
    return "2.25." + str(int(_digest(key, "uid\0" + uid)[:32], 16))


def pseudonym_path(key: bytes, path: Path) -> Path:
    """`anon-<folder>/anon-<file>.<suffix>`: pseudonyms of the folder and of the file, so
    files of one folder still show together; the suffix only when it names an image type."""
    suffix = path.suffix.lower() if path.suffix.lower() in KNOWN_SUFFIXES else ""
    folder = pseudonym(key, "path\0" + str(path.parent))
    return Path(folder) / (pseudonym(key, "path\0" + str(path)) + suffix)


def anonymized(results: Iterable[FileResult], key: bytes) -> list[FileResult]:
    return [anonymized_result(r, key) for r in results]


def anonymized_result(result: FileResult, key: bytes) -> FileResult:
    """A copy of `result` with a pseudonymised path, study and metadata (see the module's
    table), and its reason with no trace of the real path."""
    path = pseudonym_path(key, result.path)
    reason = result.reason
    if reason:
        for real, shown in ((str(result.path), str(path)),
                            (str(result.path.parent), str(path.parent)),
                            (result.path.name, path.name)):
            if real:
                reason = reason.replace(real, shown)
    study = None if result.study is None else pseudonym(key, "study\0" + result.study)
    return replace(result, path=path, study=study, reason=reason,
                   metadata=_anonymized_metadata(result.metadata, key))


def _anonymized_metadata(metadata: dict[str, str], key: bytes) -> dict[str, str]:
    """Only what the table above keeps: any other attribute is left out."""
    kept = {k: v for k, v in metadata.items()
            if v in DEFINED_TERMS.get(k, ()) or k in KEPT}
    for keyword in PSEUDONYMISED_UIDS:
        if metadata.get(keyword):
            kept[keyword] = pseudonym_uid(key, metadata[keyword])
    identity = metadata.get("PatientID") or "\\".join(
        metadata.get(k, "") for k in ("PatientName", "PatientBirthDate"))
    if identity.strip("\\"):
        kept["PatientID"] = pseudonym(key, identity)
    return kept
