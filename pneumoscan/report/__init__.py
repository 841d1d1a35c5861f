"""Reports: the picture of each image, the HTML and the PDF."""

from pathlib import Path

# The report formats, by the file's suffix (case aside).
REPORT_FORMATS = {".pdf": "pdf", ".html": "html", ".htm": "html"}


def report_format(path: Path | str) -> str:
    """"pdf" or "html" by the suffix of `path`; ValueError for any other suffix."""
    suffix = Path(path).suffix
    try:
        return REPORT_FORMATS[suffix.lower()]
    except KeyError:
        raise ValueError(f"a report file must end in .html or .pdf, not {suffix!r}") from None
