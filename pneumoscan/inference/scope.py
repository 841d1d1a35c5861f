"""The scope guard: whether a classified image is one the model was made for.

Two kinds of evidence, each giving a one-line reason when it says no:
- DICOM metadata: the patient's age (PatientAge, else StudyDate - PatientBirthDate) outside
  the population of the model card, a view position other than PA or AP;
- the pixels: the model's own out-of-distribution score (`scope_score`, fitted at export
  time, see modelling/scope_guard.py) above the threshold stored in its metadata.
The probability and decision are still given for an out-of-scope image; the reports and the
study decision treat it apart.
"""

from __future__ import annotations

import json
import re
from datetime import date

from pneumoscan.inference.model import ModelInfo
from pneumoscan.inputs.dicom import VIEW_POSITIONS
from pneumoscan.text import defined_term

# The model card's population is children aged 1 to 5 (whole years, so up to the sixth
# birthday); ages are often rounded or written at the visit's month, hence half a year of
# tolerance on each side.
POPULATION_YEARS = (0.5, 6.5)
POPULATION_TEXT = "children aged 1-5"
FRONTAL_VIEWS = {"PA", "AP"}
PIXEL_REASON = "image unlike the model's training images"
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_DAYS_PER_UNIT = {"D": 1, "W": 7, "M": 365.25 / 12, "Y": 365.25}


def scope_threshold(info: ModelInfo) -> float | None:
    """The model's out-of-distribution threshold; None when it has no scope guard."""
    guard = info.extra.get("scope_guard")
    return float(json.loads(guard)["threshold"]) if guard else None


def patient_age_years(metadata: dict[str, str]) -> float | None:
    """From PatientAge ('004Y', '018M', '010W', '100D'), else from the study date and the
    birth date; None when neither is usable."""
    match = _AGE.match(metadata.get("PatientAge", "").strip().upper())
    if match:
        return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25
    try:
        born, seen = (_dicom_date(metadata.get(k, "")) for k in ("PatientBirthDate", "StudyDate"))
    except ValueError:
        return None
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def _dicom_date(text: str) -> date | None:
    text = text.strip()
    if not text:
        return None
    if not re.fullmatch(r"\d{8}", text):
        raise ValueError(text)
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def metadata_reasons(metadata: dict[str, str]) -> list[str]:
    reasons = []
    age = patient_age_years(metadata)
    low, high = POPULATION_YEARS
    if age is not None and not low <= age < high:
        reasons.append(f"patient aged {_age_text(age)}: the model is made for {POPULATION_TEXT}")
    view = metadata.get("ViewPosition", "").strip().upper()
    if view and view not in FRONTAL_VIEWS:
        reasons.append(f"view position {defined_term(view, VIEW_POSITIONS)}: the model is made "
                       "for PA or AP views")
    return reasons


def _age_text(years: float) -> str:
    if years < 2:
        return f"{years * 12:.0f} months"
    return f"{years:.0f} years" if years >= 10 else f"{years:.1f} years"


def pixel_reason(score: float | None, threshold: float | None) -> str | None:
    if score is None or threshold is None or score <= threshold:
        return None
    return f"{PIXEL_REASON} (out-of-distribution score {score:.2f} > {threshold:.2f})"


def assess(metadata: dict[str, str], score: float | None,
           threshold: float | None) -> tuple[bool, list[str]]:
    """(in_scope, reasons) of one classified image."""
    reasons = metadata_reasons(metadata)
    if (pixels := pixel_reason(score, threshold)) is not None:
        reasons.append(pixels)
    return not reasons, reasons
