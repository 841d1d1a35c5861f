"""The report stage: overlays, HTML and PDF reports, their safety and their files."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pikepdf
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from PIL import Image

from pneumoscan import api
from pneumoscan.cli import main
from pneumoscan.files import study_file_stem, write_atomic
from pneumoscan.inputs.loading import load_path
from pneumoscan.records import FileResult, LoadedImage, RunInfo
from pneumoscan.report import html as report
from pneumoscan.report.headings import age, person_name, study_date, study_heading
from pneumoscan.report.html import (
    DISCLAIMER,
    render_html,
    write_per_study,
    write_report,
)
from pneumoscan.report.pdf import LocalOnlyFetcher, decode_data_uri, render_pdf
from pneumoscan.report.pictures import (
    CAM_OPACITY,
    DISPLAY_SIZE,
    GAP,
    colour_bar_png,
    display_size,
    picture_size,
    render_picture,
    turbo_lut,
)
from pneumoscan.results.summary import Counts, group_studies

STUDIES = ("study-normal-1", "study-normal-2", "study-pneumonia-1", "study-pneumonia-2")
SCRIPT = "<script>alert(1)</script>"
IMG_TAG = "<img src=x onerror=alert(2)>"
REMOTE = "http://example.invalid/x.png"
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
RUN = RunInfo(model_name="densenet121-kermany", model_version="1.2.0", model_sha256=SHA256,
              provider="CPUExecutionProvider", pneumoscan_version="0.1.0",
              started="2025-01-01T09:00:00Z", finished="2025-01-01T09:00:05Z", threshold=0.5,
              cam_method="Layer-CAM")


def needs_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} (poppler-utils) is not installed")


def cam_peaking_at(row: float, col: float) -> np.ndarray:
    """7 x 7 CAM, 0..1, highest at (row, col)."""
    y, x = np.mgrid[0:7, 0:7].astype(np.float32)
    cam = np.exp(-((y - row) ** 2 + (x - col) ** 2) / 4.0)
    return (cam - cam.min()) / (cam.max() - cam.min())


def decode(encoded: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(encoded))
    image.load()
    return image


def pdf_text(pdf: bytes, tmp_path: Path) -> str:
    needs_tool("pdftotext")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    return subprocess.run(["pdftotext", str(path), "-"], check=True,
                          capture_output=True, text=True).stdout


def sample_pixels() -> np.ndarray:
    loaded = load_path(next(SAMPLES.glob("study-pneumonia-1/*.jpeg")))
    assert isinstance(loaded, LoadedImage)
    return loaded.pixels


@pytest.fixture(scope="module")
def results() -> list[FileResult]:
    """The committed sample X-rays (four studies of four) read as `pneumoscan run` reads
    them, with made-up probabilities and CAMs, hostile metadata in one, plus a skipped and
    an unreadable file."""
    out = []
    for index, path in enumerate(sorted(SAMPLES.glob("study-*/*.jpeg"))):
        loaded = load_path(path)
        pneumonia = "pneumonia" in loaded.study
        probability = 0.55 + index * 0.02 if pneumonia else 0.05 + index * 0.01
        picture = render_picture(loaded.pixels, cam_peaking_at(3, 2 + pneumonia))
        metadata = {"PatientID": path.parent.name, "Modality": "CR", "ViewPosition": "PA"}
        out.append(FileResult(path, loaded.study, "ok", probability=probability,
                              label="PNEUMONIA" if pneumonia else "NORMAL", threshold=0.5,
                              metadata=metadata, picture=picture))
    out[0].metadata.update(PatientName=SCRIPT, AccessionNumber=IMG_TAG, StudyDate=REMOTE)
    for name, status, reason in (("study-pneumonia-1/notes.txt", "skipped", "unknown file type"),
                                 ("study-normal-2/cut.dcm", "error", "truncated JPEG data")):
        path = SAMPLES / name
        # notes.txt is not an image: it belongs to no study.
        study = str(path.parent) if path.suffix == ".dcm" else None
        out.append(FileResult(path, study, status, reason))
    return out


@pytest.fixture(scope="module")
def html(results) -> str:
    return render_html(RUN, results)


@pytest.fixture(scope="module")
def pdf(html) -> bytes:
    return render_pdf(html)


# --- pictures ---------------------------------------------------------------------------

def halves(picture: bytes, shown: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The X-ray, its overlay and the colour scale cut out of a picture whose X-ray is
    shown at `shown` (width, height), as float32 RGB."""
    width, height = shown
    data = np.asarray(decode(picture), dtype=np.float32)
    assert data.shape[:2][::-1] == picture_size(width, height)
    return (data[:height, :width], data[:height, width + GAP:],
            data[height + GAP:, width + GAP:])


def test_the_picture_is_one_compact_jpeg_of_the_xray_beside_its_map():
    pixels = sample_pixels()
    picture = render_picture(pixels, cam_peaking_at(3, 3))
    image = decode(picture)
    assert (image.format, image.mode) == ("JPEG", "RGB") and len(picture) < 80_000
    shown = display_size(pixels.shape[1], pixels.shape[0])
    assert max(shown) == DISPLAY_SIZE
    xray, overlay, scale = halves(picture, shown)
    resized = np.asarray(Image.fromarray(pixels).resize(shown, Image.Resampling.BILINEAR),
                         dtype=np.float32)
    assert np.abs(xray.mean(axis=2) - resized).mean() < 3  # the X-ray as read, grey
    assert np.abs(overlay - xray).mean() > 10  # the map is blended over it
    expected_scale = Image.fromarray(turbo_lut()[None]).resize((shown[0], 1))
    assert np.abs(scale.mean(axis=0) - np.asarray(expected_scale, np.float32)[0]).mean() < 8


def test_overlay_blends_the_colour_map_where_the_cam_is():
    grey = np.full((400, 512), 128, np.uint8)
    xray, overlay, _ = halves(render_picture(grey, cam_peaking_at(0, 0)), display_size(512, 400))
    assert np.abs(xray - 128).max() <= 2
    lut = turbo_lut()
    for corner, colour in ((overlay[:8, :8], lut[255]), (overlay[-8:, -8:], lut[0])):
        expected = (1 - CAM_OPACITY) * 128 + CAM_OPACITY * colour.astype(np.float32)
        assert np.abs(corner.mean(axis=(0, 1)) - expected).max() < 8


def test_small_images_are_not_upscaled_and_odd_cams_do_not_break():
    pixels = np.tile(np.arange(224, dtype=np.uint8), (200, 1))
    for cam in (np.full((7, 7), np.nan, np.float32), np.ones((1, 1), np.float32),
                np.linspace(-1, 2, 49, dtype=np.float32).reshape(7, 7)):
        assert decode(render_picture(pixels, cam)).size == picture_size(224, 200)


def test_pictures_made_in_threads_are_those_made_in_one():
    pixels = sample_pixels()
    cams = [cam_peaking_at(row, col) for row in range(3) for col in range(3)]
    alone = [render_picture(pixels, cam) for cam in cams]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda cam: render_picture(pixels, cam), cams)) == alone


def test_colour_bar_runs_from_low_to_high():
    bar = decode(colour_bar_png())
    assert bar.format == "PNG" and bar.size == (256, 8)
    assert np.array_equal(np.asarray(bar)[0], turbo_lut())


# --- summary ----------------------------------------------------------------------------

def test_a_study_is_positive_if_any_image_is_and_positive_studies_come_first():
    def ok(study, probability, label):
        return FileResult(Path(f"/{study}/{probability}.png"), study, "ok",
                          probability=probability, label=label, threshold=0.5)
    results = [ok("a", 0.2, "NORMAL"), ok("b", 0.1, "NORMAL"), ok("b", 0.7, "PNEUMONIA"),
               ok("c", 0.9, "PNEUMONIA"), FileResult(Path("/d/x"), "d", "error", "bad"),
               FileResult(Path("/a/y"), "a", "skipped", "not an image")]
    studies = group_studies(results)
    assert [(s.key, s.decision) for s in studies] == [
        ("c", "PNEUMONIA"), ("b", "PNEUMONIA"), ("a", "NORMAL"), ("d", "NOT CLASSIFIED")]
    assert studies[1].highest_probability == 0.7 and studies[3].highest_probability is None
    assert Counts.of(results) == Counts(files=6, classified=4, pneumonia=2, normal=2,
                                        skipped=1, errors=1, out_of_scope=0)


def test_study_metadata_shows_shared_fields_once_and_the_others_per_image():
    first = FileResult(Path("/s/a.dcm"), "s", "ok", metadata={
        "SOPInstanceUID": "1.1", "PatientID": "P1", "Custom": "x"})
    second = FileResult(Path("/s/b.dcm"), "s", "ok", metadata={
        "PatientID": "P1", "SOPInstanceUID": "1.2", "Modality": "CR", "ViewPosition": ""})
    study = group_studies([first, second])[0]
    assert study.metadata == [("Patient ID", "P1"), ("Modality", "CR"), ("Custom", "x")]
    assert study.image_metadata(second) == [("SOP instance UID", "1.2")]


# --- HTML -------------------------------------------------------------------------------

def test_html_lists_every_file_and_the_run(results, html):
    for result in results:
        assert result.path.name in html
        if result.reason:
            assert result.reason in html
    assert DISCLAIMER in html and SHA256 in html and SHA256[:12] in html
    assert "CPUExecutionProvider" in html and "densenet121-kermany 1.2.0" in html
    # The heat maps' legend names the method they were made with.
    assert "blended over it (Layer-CAM)" in html


def test_a_study_with_nothing_classified_is_listed_on_page_one_only(results, html):
    assert html.count('<section class="study"') == len(STUDIES)
    skipped_only = render_html(RUN, [FileResult(Path("/s/a.dcm"), "/s", "skipped", "lateral")])
    assert '<section class="study"' not in skipped_only
    assert "a.dcm" in skipped_only and "lateral" in skipped_only


def test_a_file_that_is_not_an_image_is_listed_once_and_makes_no_study(results, html, tmp_path):
    summary = html[:html.index('<section class="study"')]
    assert summary.count("notes.txt") == 1 and html.count("notes.txt") == 1
    assert "Studies (4)" in summary
    not_image = [FileResult(SAMPLES / "README.md", None, "skipped", "unknown file type")]
    assert write_per_study(tmp_path, RUN, not_image) == [] and not list(tmp_path.iterdir())
    alone = render_html(RUN, not_image)
    assert "Studies (0)" in alone and "README.md" in alone and '<section class="study"' not in alone


def test_html_summary_lists_positive_studies_first(html):
    summary = html[html.index('<table class="studies">'):]
    summary = summary[:summary.index("</table>")]
    anchors = {study_file_stem(str(SAMPLES / study)): study for study in STUDIES}
    order = [anchors[anchor] for anchor in re.findall(r'<tr id="row-[^"]+"><td><a href="#([^"]+)">',
                                                       summary)]
    assert sorted(order) == list(STUDIES)
    assert order[:2] == ["study-pneumonia-2", "study-pneumonia-1"]  # most probable first


def test_html_is_a_worklist_each_study_one_click_from_the_summary_and_back(html):
    rows = re.findall(r'<tr id="(row-[^"]+)"><td><a href="#([^"]+)">', html)
    assert len(rows) == len(STUDIES)
    for row, section in rows:
        body = html[html.index(f'<section class="study" id="{section}"'):]
        body = body[:body.index("</section>")]
        assert f'<a href="#{row}">' in body  # back to its own row of the summary
    assert len(set(re.findall(r'\sid="([^"]+)"', html))) == len(re.findall(r'\sid="', html))


def test_out_of_scope_images_are_marked_and_counted_apart(results):
    """A study whose images are all out of scope reads 'review', never NORMAL; each such
    image says why above its picture; the summary counts them apart."""
    from dataclasses import replace

    reason = "patient aged 64 years: the model is made for children aged 1-5"
    flagged = [replace(r, in_scope=False, scope_reasons=[reason])
               if r.status == "ok" and r.study.endswith("study-normal-1") else r
               for r in results]
    html = render_html(RUN, flagged)
    summary = html[html.index('<table class="studies">'):]
    row = summary[summary.index(f'id="row-{study_file_stem(str(SAMPLES / "study-normal-1"))}"'):]
    assert re.search(r"^[^\n]*<td class=\"decision review\">review: outside the "
                     r"model&#39;s intended use</td>", row)
    assert html.count(f'<p class="scope">OUTSIDE INTENDED USE: {reason}</p>') == 4
    assert html.count('<span class="label">outside intended use</span> · model output') == 4
    counts = html[html.index('<table class="counts">'):]
    assert '<td class="review">4</td>' in counts[:counts.index("</table>")]


def test_html_escapes_hostile_metadata(html):
    assert SCRIPT not in html and IMG_TAG not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html


def test_html_is_self_contained(html):
    sources = re.findall(r'\ssrc="([^"]*)"', html)
    assert sources and all(source.startswith("data:image/") for source in sources)
    assert "<link" not in html


# --- PDF --------------------------------------------------------------------------------

def test_pdf_text_has_disclaimer_studies_and_literal_script(pdf, tmp_path):
    assert pdf.startswith(b"%PDF-")
    text = pdf_text(pdf, tmp_path)
    assert text.count(DISCLAIMER) >= text.count("\f") >= 5  # on every page
    words = " ".join(text.split())  # undo line wrapping
    for study in STUDIES:
        assert f"Folder {SAMPLES / study}" in words
    assert SCRIPT in words and IMG_TAG in words
    assert SHA256[:12] in words


def test_pdf_is_tagged_pdf_a_with_its_metadata_in_xmp(pdf):
    """Checked with qpdf's library (pikepdf), independently of WeasyPrint. veraPDF, the
    reference PDF/A validator, is a Java program on neither PyPI nor Debian."""
    document = pikepdf.open(io.BytesIO(pdf))
    assert document.check_pdf_syntax() == []
    xmp = document.open_metadata()
    assert (xmp["pdfaid:part"], xmp["pdfaid:conformance"]) == ("3", "B")
    assert xmp["dc:title"] == report.DEFAULT_TITLE
    assert f"model {RUN.model_name} {RUN.model_version}" in xmp["dc:description"]
    assert "4 studies" in xmp["dc:description"] and SHA256 in xmp["dc:description"]
    assert xmp["xmp:CreateDate"] == RUN.finished
    assert xmp["xmp:CreatorTool"] == "pneumoscan 0.1.0"
    assert str(document.docinfo["/Title"]) == report.DEFAULT_TITLE  # the same as the XMP
    [intent] = document.Root.OutputIntents
    assert intent.S == "/GTS_PDFA1" and "/DestOutputProfile" in intent
    assert document.Root.MarkInfo.Marked and "/StructTreeRoot" in document.Root  # tagged
    for page in document.pages:
        for font in page.Resources.get("/Font", {}).values():
            descendant = font.DescendantFonts[0] if "/DescendantFonts" in font else font
            assert {"/FontFile", "/FontFile2", "/FontFile3"} & set(descendant.FontDescriptor.keys())


def test_per_study_pdf_names_its_study_in_its_metadata(tmp_path):
    loaded = load_path(SAMPLES / "dicom" / "RG1_UNCR.dcm")
    result = FileResult(loaded.path, loaded.study, "ok", probability=0.7, label="PNEUMONIA",
                        threshold=0.5, metadata=loaded.metadata)
    written = write_per_study(tmp_path, RUN, [result])
    xmp = pikepdf.open(next(p for p in written if p.suffix == ".pdf")).open_metadata()
    assert xmp["dc:title"] == "Study RG1 CompressedSamples · 26 Aug 2004 18:50"
    assert "study RG1 CompressedSamples · 26 Aug 2004 18:50; model" in xmp["dc:description"]


def test_a_study_runs_four_images_to_a_page_each_headed_and_footed_with_its_label(results,
                                                                                tmp_path):
    images = [dataclasses.replace(r, study="/scans/ward-7", metadata={})
              for r in results if r.status == "ok"]
    assert len(images) == 16
    pages = pdf_text(render_pdf(render_html(RUN, images)), tmp_path).split("\f")[:-1]
    assert len(pages) == 1 + 4  # the summary, then four pages of four images
    for number, page in enumerate(pages[1:]):
        assert page.count("P(pneumonia)") == 4
        lines = [line.strip() for line in page.splitlines() if line.strip()]
        heading = "ward-7 · PNEUMONIA" + (" … continued" if number else "")
        assert lines[0] == heading
        assert f"ward-7\nPage {number + 2} of 5\n{DISCLAIMER}" in "\n".join(lines)  # footer


def test_a_dicom_study_is_titled_by_what_people_read():
    loaded = load_path(SAMPLES / "dicom" / "RG1_UNCR.dcm")
    result = FileResult(loaded.path, loaded.study, "ok", metadata=loaded.metadata)
    heading = study_heading(group_studies([result])[0])
    assert heading.title == "RG1 CompressedSamples" and heading.when == "26 Aug 2004 18:50"
    assert heading.details == ("Patient ID 9RG1", "Accession exam Number", "THORAX", "CR PA",
                               "female, 64 y")
    assert heading.small_print[0] == f"Study UID {loaded.study}"
    assert "Birth date: 5 Mar 1940" in heading.small_print


@pytest.mark.parametrize("dicom, text", [("Doe^Jane^Q^Dr^MD", "Dr Jane Q Doe MD"),
                                         ("SMITH", "SMITH"), ("", ""),
                                         ("Yamada^Tarou=山田^太郎", "Tarou Yamada")])
def test_person_names_read_given_family(dicom, text):
    assert person_name(dicom) == text


def test_dates_and_ages_read_as_such():
    assert study_date("20040826", "0905") == "26 Aug 2004 09:05"
    assert study_date("20041332") == "20041332"  # not a date: shown as it is
    assert age("045Y", "", "") == "45 y" and age("", "19400305", "20040826") == "64 y"
    assert age("", "19400305", "20040304") == "63 y" and age("", "2000", "20040826") is None


def test_a_source_checkout_renders_with_its_own_templates(tmp_path):
    """pneumoscan imported from a clone (as `python -m pytest` in one does) while the
    installed copy is elsewhere: the clone's own `templates/` folder serves the report."""
    repo = Path(__file__).resolve().parents[1]
    checkout = tmp_path / "checkout"
    shutil.copytree(repo / "pneumoscan", checkout / "pneumoscan", symlinks=True,
                    ignore=shutil.ignore_patterns("*.onnx", "__pycache__"))
    shutil.copytree(repo / "templates", checkout / "templates")
    (checkout / "templates" / "report.css").write_text(
        (repo / "templates" / "report.css").read_text() + "\n/* the checkout's own */\n")
    script = ("import pneumoscan, pneumoscan.report.html as r, pneumoscan.report.pdf as p;"
              "print(pneumoscan.__file__); print(repr(r._stylesheet()[-30:]));"
              "print(p.render_pdf('<p>x</p>')[:5])")
    done = subprocess.run([sys.executable, "-c", script], cwd=checkout, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(checkout)})
    assert done.returncode == 0, done.stderr
    module, css_tail, pdf_head = done.stdout.splitlines()
    assert module.startswith(str(checkout))
    assert "the checkout's own" in css_tail and pdf_head == "b'%PDF-'"


def test_pdf_page_converts_to_an_image(pdf, tmp_path):
    needs_tool("pdftoppm")
    (tmp_path / "report.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "60", "-png", "-f", "2", "-l", "2",
                    str(tmp_path / "report.pdf"), str(tmp_path / "page")], check=True)
    page = decode(next(tmp_path.glob("page*.png")).read_bytes())
    assert abs(page.width - 496) <= 1 and abs(page.height - 702) <= 1  # A4 at 60 dpi
    assert len(np.unique(np.asarray(page.convert("RGB")).reshape(-1, 3), axis=0)) > 1000


def test_no_table_row_stands_alone_on_a_page(tmp_path):
    """A table that runs onto a new page takes at least two rows with it (one row alone
    there, under no heading, reads as a stray line; the samples' report had one)."""
    def rows_per_page(count: int) -> list[int]:
        skipped = [FileResult(Path(f"/scans/file-{i:04d}.txt"), None, "skipped",
                              "unknown file type") for i in range(count)]
        pages = pdf_text(render_pdf(render_html(RUN, skipped)), tmp_path).split("\f")
        return [len(re.findall(r"file-\d{4}\.txt", page)) for page in pages if page.strip()]

    full_page = rows_per_page(200)[0]  # the rows that page one holds
    spilled = rows_per_page(full_page + 1)
    assert sum(spilled) == full_page + 1 and len(spilled) == 2
    assert min(spilled) >= 2, spilled


# --- nothing is fetched -----------------------------------------------------------------

@pytest.fixture
def fetched(monkeypatch) -> list[tuple[str, str]]:
    """(url, "served" | "refused") for every URL WeasyPrint asks for; and any socket use
    recorded as ("socket", ...)."""
    calls: list[tuple[str, str]] = []
    original = LocalOnlyFetcher.fetch

    def spy(self, url, headers=None):
        try:
            response = original(self, url, headers)
        except ValueError:
            calls.append((url, "refused"))
            raise
        calls.append((url, "served"))
        return response

    def no_network(*args, **kwargs):
        calls.append(("socket", repr(args)))
        raise OSError("network use in a test")

    monkeypatch.setattr(LocalOnlyFetcher, "fetch", spy)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return calls


def test_a_remote_url_in_metadata_is_only_text(results, fetched):
    html = render_html(RUN, results[:1])
    assert f"· {REMOTE} ·" in html  # the study date, as text: it is no date
    render_pdf(html)
    assert fetched and all(url.startswith("data:") for url, _ in fetched)


def test_remote_and_local_urls_in_crafted_markup_are_refused(fetched):
    outside = Path(report.__file__).resolve()
    crafted = (f'<link rel="stylesheet" href="https://example.invalid/a.css">'
               f'<img src="{REMOTE}"><img src="{outside.as_uri()}">'
               f'<img src="file://example.invalid/etc/passwd"><img src="../pneumoscan/report.py">'
               f'<p style="background: url(ftp://example.invalid/b.png)">x</p>')
    assert render_pdf(crafted).startswith(b"%PDF-")
    refused = {url for url, outcome in fetched if outcome == "refused"}
    assert {REMOTE, "https://example.invalid/a.css", outside.as_uri(),
            "file://example.invalid/etc/passwd", "ftp://example.invalid/b.png"} <= refused
    assert not [call for call in fetched if call[1] == "served" or call[0] == "socket"]


def test_fetcher_serves_data_uris_and_template_files_only():
    fetcher = LocalOnlyFetcher()
    css = fetcher.fetch(fetcher.templates_url + "report.css")
    assert css.content_type == "text/css" and b"@page" in css.read()
    png = fetcher.fetch(report.data_uri(colour_bar_png()))
    assert png.content_type == "image/png" and png.read() == colour_bar_png()
    for url in (REMOTE, fetcher.templates_url + "../pneumoscan/report.py",
                fetcher.templates_url + "missing.css", "file:///etc/passwd"):
        with pytest.raises(ValueError, match="refused"):
            fetcher.fetch(url)


def test_weasyprint_leaves_truncated_scans_refused(tmp_path):
    """Importing WeasyPrint makes Pillow accept truncated images process-wide unless undone."""
    render_pdf("<p>x</p>")
    good = next(SAMPLES.glob("study-normal-1/*.jpeg")).read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(good[: len(good) // 3])
    assert load_path(tmp_path / "cut.jpeg").status == "error"


def test_data_uris_decode_both_ways():
    assert decode_data_uri("data:image/png;base64,iVBORw==") == ("image/png", b"\x89PNG")
    assert decode_data_uri("data:,a%20b") == ("text/plain", b"a b")


# --- files ------------------------------------------------------------------------------

HOSTILE_KEYS = ["../../../../tmp/escape", "/etc/passwd", "a\x00b", "x" * 5000, "a/b", "a_b",
                "\udcff undecodable"]


def test_study_file_stems_are_plain_short_and_distinct():
    keys = HOSTILE_KEYS + ["", ".", "..", "CON", "~root", "patient 12 / CT / ø", "-rf"]
    stems = [study_file_stem(key) for key in keys]
    assert len(set(stems)) == len(stems)
    for stem in stems:
        assert re.fullmatch(r"study-[A-Za-z0-9._-]+", stem) and len(stem) <= 90


@pytest.mark.slow
def test_per_study_reports_stay_in_their_folder(tmp_path):
    def tiny(key):
        return FileResult(Path("/x/y.png"), key, "skipped", "not an image")
    folder = tmp_path / "reports"
    written = write_per_study(folder, RUN, [tiny(key) for key in HOSTILE_KEYS])
    assert len(written) == 2 * len(HOSTILE_KEYS)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)
    assert all(p.parent == folder and p.suffix in (".html", ".pdf") for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]


@pytest.mark.slow
def test_per_study_reports_hold_their_own_study(results, tmp_path):
    written = write_per_study(tmp_path, RUN, results)
    assert len(written) == 2 * len(STUDIES)
    html = (tmp_path / f"{study_file_stem(str(SAMPLES / 'study-normal-2'))}.html").read_text()
    assert "cut.dcm" in html and "notes.txt" not in html and "study-pneumonia" not in html
    # One study needs no page of counts and tables; the model and threshold are still said.
    assert 'class="summary"' not in html and 'class="counts"' not in html
    assert f"SHA-256 {SHA256}" in html and "decision threshold 0.500" in html


def test_a_study_with_nothing_classified_still_gets_a_report_listing_its_files(results, tmp_path):
    unreadable = [r for r in results if r.status != "ok"]
    lone = [dataclasses.replace(r, study="lone-study") for r in unreadable]
    [html_path, pdf_path] = write_per_study(tmp_path, RUN, lone)
    html = html_path.read_text()
    assert "lone-study · NOT CLASSIFIED" in html
    assert all(r.path.name in html and r.reason in html for r in lone)
    assert "truncated JPEG data" in pdf_text(pdf_path.read_bytes(), tmp_path)


def test_per_study_reports_from_worker_processes_are_those_made_in_one(results, tmp_path):
    """Enough studies are rendered in worker processes; the files are the same."""
    many = [dataclasses.replace(r, study=f"{r.study}-{copy}") for copy in range(3)
            for r in results if r.study]
    scan = api.Scan(run=RUN, results=many)
    serial = api.write_per_study(tmp_path / "one", scan, processes=1)
    parallel = api.write_per_study(tmp_path / "two", scan, processes=2)
    assert len(serial) == 2 * 3 * len(STUDIES) >= 2 * api.PARALLEL_STUDIES_FROM
    assert [p.name for p in parallel] == [p.name for p in serial]
    for one, two in zip(serial, parallel):
        if one.suffix == ".html":
            assert two.read_bytes() == one.read_bytes()
        else:
            assert pdf_text(two.read_bytes(), tmp_path) == pdf_text(one.read_bytes(), tmp_path)
        assert stat.S_IMODE(two.stat().st_mode) == 0o600


@pytest.mark.parametrize("suffix", [".html", ".pdf"])
def test_reports_are_owner_only_and_written_whole(results, tmp_path, suffix):
    path = write_report(tmp_path / f"report{suffix}", RUN, results[:2])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes().startswith(b"%PDF-" if suffix == ".pdf" else b"<!DOCTYPE html>")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.pdf"
    path.write_bytes(b"old")

    def broken_replace(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.pdf"]


def test_write_report_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=".html or .pdf"):
        write_report(tmp_path / "report.txt", RUN, [])
    assert not list(tmp_path.iterdir())


def test_mode_can_be_widened_on_request(tmp_path):
    write_atomic(tmp_path / "shared.html", b"x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "shared.html").stat().st_mode) == 0o644


@pytest.mark.slow
def test_pneumoscan_run_writes_both_reports(shipped_model, tmp_path):
    """End to end: real model, real CAMs, the samples folder with its DICOM files."""
    out, per_study = tmp_path / "run.pdf", tmp_path / "studies"
    result = CliRunner().invoke(main, ["run", str(SAMPLES), "--model", str(shipped_model),
                                       "--device", "cpu", "--out", str(out),
                                       "--per-study", str(per_study)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    words = " ".join(pdf_text(out.read_bytes(), tmp_path).split())
    for study in STUDIES:
        assert str(SAMPLES / study) in words
    assert "RG3_J2KI.dcm" in words and "MR2_J2KI.dcm" in words  # skipped, with reasons
    pdfs = sorted(p.stem for p in per_study.glob("*.pdf"))
    assert pdfs and pdfs == sorted(p.stem for p in per_study.glob("*.html"))
    assert len(pdfs) >= len(STUDIES) + 1
