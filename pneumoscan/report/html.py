"""HTML and PDF reports of a run (last stage of the pipeline).

Every image is embedded as a data: URI, so a report is one self-contained file; its PDF is
that HTML rendered by `pdf.render_pdf`, which fetches nothing from outside.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import SupportsBytes

import jinja2
from markupsafe import Markup

from pneumoscan.files import study_file_stem, write_atomic, write_atomic_chunks
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.report import report_format
from pneumoscan.report.headings import study_heading
from pneumoscan.report.pdf import render_pdf
from pneumoscan.report.pictures import colour_bar_png
from pneumoscan.report.templates import templates
from pneumoscan.results.summary import (NEGATIVE, OUT_OF_SCOPE, POSITIVE, Counts, Study,
                                        group_studies)
from pneumoscan.text import printable

DISCLAIMER = "Research use only; not a medical diagnosis."
DEFAULT_TITLE = "Chest X-ray pneumonia screening report"
# Images of a study on one printed A4 page (report.css sizes the pictures to fit).
IMAGES_PER_PAGE = 4


# A whole-run PDF of a run with more classified images than this holds its summary only:
# WeasyPrint lays out a whole document in memory (3.3 GB for 20,000 images), while the HTML
# report is written as it is made. The images are then in the HTML and per-study reports.
PDF_MAX_IMAGES = 1000
# Rows of each table in such a summary; the JSON and the HTML report list every one.
PDF_SUMMARY_ROWS = 500


def html_chunks(run: RunInfo, results: Sequence[FileResult], *, title: str = DEFAULT_TITLE,
                summary: bool = True, pages: bool = True,
                table_rows: int | None = None) -> Iterator[str]:
    """The report as one HTML document, images and stylesheet included, in pieces as the
    template makes them (a report of many images is never one string in memory). Without
    `summary` (a report of one study), the page of counts and tables is left out: the
    study's own section says what it would. Without `pages`, the studies get no pages of
    their own (a summary only), and `table_rows` limits the rows of its tables."""
    studies = group_studies(results)
    template = _environment().get_template("report.html.j2")
    yield from template.generate(
        title=title,
        description=_description(run, studies, summary),
        run=run,
        counts=Counts.of(results),
        studies=studies,
        not_classified=[r for r in results if r.status != "ok"],
        images_per_page=IMAGES_PER_PAGE,
        colour_bar=data_uri(colour_bar_png()),
        disclaimer=DISCLAIMER,
        css=_stylesheet(),
        summary=summary,
        pages=pages,
        table_rows=table_rows,
    )


def render_html(run: RunInfo, results: Sequence[FileResult], **options) -> str:
    """The report (`html_chunks`) as one string."""
    return _displayable("".join(html_chunks(run, results, **options)))


def _displayable(html: str) -> str:
    # Names that are not valid UTF-8 reach us as lone surrogates (os.fsdecode); neither
    # an HTML file nor PDF text can hold them, so they are shown escaped: "\udcff".
    return html.encode("utf-8", "backslashreplace").decode("utf-8")


def write_report(path: Path | str, run: RunInfo, results: Sequence[FileResult], *,
                 title: str = DEFAULT_TITLE, mode: int = 0o600) -> Path:
    """One report of all results, as HTML or PDF by the suffix of `path`; written
    atomically, readable by its owner only unless `mode` says otherwise. The HTML is
    written piece by piece; a PDF of more than PDF_MAX_IMAGES images is a summary."""
    path = Path(path)
    if report_format(path) == "pdf":
        large = Counts.of(results).classified > PDF_MAX_IMAGES
        html = render_html(run, results, title=title, pages=not large,
                           table_rows=PDF_SUMMARY_ROWS if large else None)
        write_atomic(path, render_pdf(html), mode)
    else:
        chunks = html_chunks(run, results, title=title)
        write_atomic_chunks(path, (chunk.encode("utf-8", "backslashreplace")
                                   for chunk in chunks), mode)
    return path


def per_study_names(study_key: str) -> list[str]:
    """The file names of a study's reports (HTML, PDF): `files.study_file_stem`, so that
    no key can place a file elsewhere."""
    stem = study_file_stem(study_key)
    return [f"{stem}.html", f"{stem}.pdf"]


_PER_STUDY_NAME = re.compile(r"study-(?:.+-)?[0-9a-f]{10}\.(?:html|pdf)")


def is_per_study_name(name: str) -> bool:
    """Whether `name` is named as `per_study_names` names reports."""
    return _PER_STUDY_NAME.fullmatch(name) is not None


def write_per_study(directory: Path | str, run: RunInfo, results: Sequence[FileResult], *,
                    mode: int = 0o600) -> list[Path]:
    """One HTML and one PDF report per study in `directory` (created if missing), named
    by `per_study_names`. Files that are not images belong to no study and get no report.
    Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    for study in group_studies(results):
        html = study_html(run, study)
        for name in per_study_names(study.key):
            path = directory / name
            write_atomic(path, _encode_as(path, html), mode)
            written.append(path)
    return written


def study_html(run: RunInfo, study: Study) -> str:
    """The report of one study, without the run's page of counts."""
    return render_html(run, study.files, title=f"Study {study_heading(study).label}",
                       summary=False)


def study_pdf(run: RunInfo, study: Study) -> bytes:
    return render_pdf(study_html(run, study))


def _description(run: RunInfo, studies: Sequence[Study], summary: bool) -> str:
    """The document's subject (PDF metadata): its study, or how many, and the model."""
    what = (f"{len(studies)} studies" if summary or len(studies) != 1
            else f"study {study_heading(studies[0]).label}")
    return (f"{what}; model {run.model_name} {run.model_version} (sha256 {run.model_sha256});"
            f" run {run.started}")


def _encode_as(path: Path, html: str) -> bytes:
    return render_pdf(html) if report_format(path) == "pdf" else html.encode("utf-8")


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """Built once; templates are compiled once and reused by every report."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_shown,
    )
    env.filters["data_uri"] = data_uri
    env.filters["decision_class"] = _decision_class
    env.filters["heading"] = study_heading
    env.filters["anchor"] = study_file_stem
    return env


def _shown(value):
    """Every value a template shows: text from files and file names as one printable
    line (no control characters, NUL included, reach the report); our own markup as is."""
    if isinstance(value, Markup):
        return value
    if isinstance(value, (str, Path)):
        return printable(str(value))
    return value


def _template_source(name: str) -> str:
    return templates().joinpath(name).read_text("utf-8")


@lru_cache(maxsize=1)
def _stylesheet() -> Markup:
    # Our own packaged file, so it goes into <style> unescaped (escaping would break
    # selectors such as `a > b` and quoted strings).
    return Markup(_template_source("report.css"))


def data_uri(picture: bytes | SupportsBytes) -> str:
    """JPEG or PNG bytes (or what gives them, as a picture stored in the state) -> data:
    URI, the type read from the bytes themselves."""
    encoded_image = bytes(picture)
    mime = "image/png" if encoded_image.startswith(b"\x89PNG\r\n\x1a\n") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(encoded_image).decode('ascii')}"


def _decision_class(label: str | None) -> str:
    return {POSITIVE: "pneumonia", NEGATIVE: "normal", OUT_OF_SCOPE: "review"}.get(
        label or "", "unclassified")
