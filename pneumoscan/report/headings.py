"""How a report names a study: by what people read (patient, date, accession, what was
taken), formatted for reading, with the machine identifier (StudyInstanceUID or folder) in
small print."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import PurePath

from pydicom.valuerep import PersonName

from pneumoscan.records import DICOM_FIELDS
from pneumoscan.results.anonymize import PSEUDONYM_PREFIX
from pneumoscan.results.summary import Study

_SEXES = {"M": "male", "F": "female", "O": "other sex"}
_AGE_UNITS = {"Y": "y", "M": "mo", "W": "wk", "D": "d"}


@dataclass(frozen=True)
class StudyHeading:
    """`title`: who (patient name, else ID or pseudonym, else the folder's name); `when`:
    the study date; `details`: what the study is (patient ID, accession, description,
    modality and view, sex and age); `small_print`: the StudyInstanceUID or the folder, and
    the other fields the study's files share; `label`: title and date in one short line,
    for page footers, the summary and the PDF's metadata."""
    title: str
    when: str
    details: tuple[str, ...]
    small_print: tuple[str, ...]
    label: str


# Fields the title and details say; the rest go into small print.
_SHOWN = {"PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
          "StudyDescription", "Modality", "ViewPosition", "PatientSex", "PatientAge",
          "StudyInstanceUID"}
_DATES = {"PatientBirthDate", "StudyDate"}


def study_heading(study: Study) -> StudyHeading:
    fields = study.shared_fields
    uid = fields.get("StudyInstanceUID")
    who = person_name(fields.get("PatientName", "")) or fields.get("PatientID")
    if not who and not uid:  # plain images, grouped by their folder
        who = PurePath(study.key).name or study.key
    when = study_date(fields.get("StudyDate", ""), fields.get("StudyTime", ""))
    details = []
    if fields.get("PatientName") and fields.get("PatientID"):
        details.append(("Pseudonym " if fields["PatientID"].startswith(PSEUDONYM_PREFIX)
                        else "Patient ID ") + fields["PatientID"])
    if fields.get("AccessionNumber"):
        details.append(f"Accession {fields['AccessionNumber']}")
    if fields.get("StudyDescription"):
        details.append(fields["StudyDescription"])
    taken = " ".join(filter(None, (fields.get("Modality"), fields.get("ViewPosition"))))
    if taken:
        details.append(taken)
    patient = ", ".join(filter(None, (
        _SEXES.get(fields.get("PatientSex", "").upper()),
        age(fields.get("PatientAge", ""), fields.get("PatientBirthDate", ""),
            fields.get("StudyDate", "")))))
    if patient:
        details.append(patient)
    title = who or "Unnamed study"
    small_print = [f"Study UID {uid}" if uid else f"Folder {study.key}"]
    small_print += [f"{DICOM_FIELDS.get(keyword, keyword)}: "
                    f"{study_date(value) if keyword in _DATES else value}"
                    for keyword, value in fields.items() if keyword not in _SHOWN]
    return StudyHeading(title=title, when=when, details=tuple(details),
                        small_print=tuple(small_print),
                        label=" · ".join(filter(None, (title, when))))


def person_name(dicom_name: str) -> str:
    """A DICOM person name (Family^Given^Middle^Prefix^Suffix) as read: "Given Middle
    Family", prefix and suffix around it; its alphabetic form when there are others."""
    name = PersonName(dicom_name)
    parts = (name.name_prefix, name.given_name, name.middle_name, name.family_name,
             name.name_suffix)
    return " ".join(part.strip() for part in parts if part.strip())


def parse_date(dicom_date: str) -> date | None:
    try:
        return datetime.strptime(dicom_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def study_date(dicom_date: str, dicom_time: str = "") -> str:
    """"26 Aug 2004 18:50" from DA "20040826" and TM "185059"; the raw text when it is not
    a valid date."""
    day = parse_date(dicom_date)
    if day is None:
        return dicom_date.strip()
    text = f"{day.day} {day:%b %Y}"
    clock = re.fullmatch(r"([01]\d|2[0-3])([0-5]\d).*", dicom_time.strip())
    return f"{text} {clock[1]}:{clock[2]}" if clock else text


def age(dicom_age: str, birth_date: str, on_date: str) -> str | None:
    """"45 y" from AS "045Y", else from the birth date at the study date."""
    stated = re.fullmatch(r"(\d{3})([DWMY])", dicom_age.strip().upper())
    if stated:
        return f"{int(stated[1])} {_AGE_UNITS[stated[2]]}"
    born, on = parse_date(birth_date), parse_date(on_date)
    if born is None or on is None or on < born:
        return None
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{years} y"
