"""Text that goes into reasons, logs, reports and file names: one printable line of bounded
length, whatever the file, its name or its library's error put into it. Every value read
from an input file passes through here before it reaches an output."""

from __future__ import annotations

import re

# Longest reason kept: enough for pydicom's list of what each decoder said.
MAX_REASON_CHARS = 500
ELLIPSIS = "…"

# C0 and C1 controls (newlines, ESC, BEL, NUL...), DEL, and Unicode's invisible format
# characters that reorder or hide text on a terminal (bidirectional overrides, zero widths).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+")

# Maximum lengths of DICOM value representations (PS3.5 Table 6.2-1), in characters per
# value; a PN value is up to three component groups of 64 characters. VRs without a limit
# that matters here (LT, ST, UT, UC...) are bounded like a long string.
DICOM_VR_MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12,
                      "LO": 64, "PN": 194, "SH": 16, "TM": 14, "UI": 64}
DICOM_DEFAULT_MAX_CHARS = 64
# Values of a multi-valued attribute kept (joined by `\`).
DICOM_MAX_VALUES = 4


def printable(text: str, limit: int | None = None) -> str:
    """`text` as one printable line: each run of control or invisible characters becomes
    one space, and text over `limit` characters is cut, ending in an ellipsis."""
    if limit is None:
        return _UNPRINTABLE.sub(" ", text).strip()
    cut = len(text) > 4 * limit
    if cut:
        text = text[:4 * limit]  # enough to fill `limit` after control runs shrink
    line = _UNPRINTABLE.sub(" ", text).strip()
    if cut or len(line) > limit:
        line = line[:limit - 1].rstrip() + ELLIPSIS
    return line


def reason(text: str) -> str:
    """A file's reason for not being classified: one printable line, MAX_REASON_CHARS at
    most."""
    return printable(text, MAX_REASON_CHARS)


def one_line(exc: BaseException) -> str:
    """`exc` as a reason: its type and message, every line of it kept (pydicom lists what
    each decoder plugin said on lines of their own, after a first line ending in ':')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return reason(f"{type(exc).__name__}: {text}")


def dicom_value(values: list[str], vr: str) -> str:
    """A DICOM attribute's value(s) as shown: each value printable and no longer than its
    VR allows, at most DICOM_MAX_VALUES of them joined by `\\`."""
    limit = DICOM_VR_MAX_CHARS.get(vr, DICOM_DEFAULT_MAX_CHARS)
    shown = [printable(value, limit) for value in values[:DICOM_MAX_VALUES]]
    if len(values) > DICOM_MAX_VALUES:
        shown.append(ELLIPSIS)
    return "\\".join(shown)


def defined_term(value: str, defined_terms: set[str]) -> str:
    """`value` when it is one of the standard's defined terms, else a word that says it is
    not: reasons never echo a file's own text, which may hold a patient's name or control
    sequences."""
    return value if value in defined_terms else "of an unlisted value"


def format_duration(seconds: float) -> str:
    """A duration as people read it: 12 s, 3 min 05 s, 30 min, 2 h 07 min (negative: 0 s)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min" + (f" {seconds % 60:02d} s" if seconds % 60 else "")
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
