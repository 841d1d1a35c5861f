"""Hostile and broken input end to end: a folder holding every case goes through
`pneumoscan run`, each file with its reason; a very large image at bounded memory; files
that vanish or cannot be opened. Per-file behaviour is tested in test_loading, test_dicom
and test_discover; the broken files are made here from real ones, none is committed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import (
    CLI_CWD,
    CLI_ENV,
    DICOM_SAMPLES,
    RAMP_12_BIT,
    SAMPLE_JPEG,
    cr_dataset,
    invoke_cli,
    make_messy_folder,
    png_chunk,
    run_pneumoscan,
    save,
)
from markupsafe import escape
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000MC

from pneumoscan import api
from pneumoscan.api import EXIT_UNREADABLE
from pneumoscan.run import scan as folder_scan
from pneumoscan.results.ledger import Ledger

OK = ("ok", None)


def write_hostile_corpus(root: Path, chest: np.ndarray) -> dict[Path, tuple[str, str | None]]:
    """Every hostile case in one folder; returns each entry's (status, reason part)."""
    expected = {path: ("skipped", reason)
                for path, reason in make_messy_folder(root / "messy").items()}
    expected |= {root / "messy" / "study 1" / "series a" / "chest pa.jpeg": OK,
                 root / "messy" / "link to chest.jpeg": OK,
                 root / "messy" / "study 1" / "series a" / "IM0001":
                     ("skipped", "body part examined is EXTREMITY")}
    raster, dicom = root / "raster", root / "dicom"
    raster.mkdir()
    dicom.mkdir()

    whole_png = raster / "whole chest.png"
    Image.fromarray(chest).save(whole_png)
    Image.fromarray(chest.astype(np.uint16) * 64).save(raster / "16 bit.png")
    Image.fromarray(np.dstack([chest] * 3 + [np.full_like(chest, 200)]), "RGBA").save(
        raster / "rgba.png")
    Image.fromarray(chest).convert("CMYK").save(raster / "cmyk.jpeg")
    shutil.copy(SAMPLE_JPEG, os.path.join(os.fsencode(raster), b"caf\xe9 scan.jpeg"))
    jpeg_bytes = SAMPLE_JPEG.read_bytes()
    (raster / "truncated.jpeg").write_bytes(jpeg_bytes[:len(jpeg_bytes) // 2])
    (raster / "truncated.png").write_bytes(whole_png.read_bytes()[:whole_png.stat().st_size // 2])
    bomb_header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    (raster / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", bomb_header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))
    expected |= {raster / name: OK for name in
                 ("whole chest.png", "16 bit.png", "rgba.png", "cmyk.jpeg", "café scan.jpeg")}
    expected |= {raster / "truncated.jpeg": ("error", "truncated or corrupt JPEG"),
                 raster / "truncated.png": ("error", "truncated or corrupt PNG"),
                 raster / "bomb.png": ("error", "decompression bomb")}
    # "café" above was written as Latin-1 bytes: its path is the undecodable one.
    expected[Path(os.fsdecode(os.path.join(os.fsencode(raster), b"caf\xe9 scan.jpeg")))] = \
        expected.pop(raster / "café scan.jpeg")

    unsupported = cr_dataset(RAMP_12_BIT)
    unsupported.PixelData = encapsulate([RAMP_12_BIT.tobytes()])
    unsupported.file_meta.TransferSyntaxUID = JPEG2000MC
    datasets = {
        "chest.dcm": (cr_dataset(RAMP_12_BIT), OK),
        "no pixels.dcm": (cr_dataset(RAMP_12_BIT, PixelData=None), ("error", "no pixel data")),
        "unsupported.dcm": (unsupported, ("error", "unsupported transfer syntax")),
        "rgb.dcm": (cr_dataset(RAMP_12_BIT, PhotometricInterpretation="RGB"),
                    ("skipped", "colour image (RGB)")),
        "multiframe.dcm": (cr_dataset(RAMP_12_BIT, NumberOfFrames=2),
                           ("skipped", "multi-frame object (2 frames)")),
    }
    # A real JPEG 2000 chest CR cut in half: every decoder fails, each says why.
    cut = pydicom.dcmread(DICOM_SAMPLES / "RG1_J2KR.dcm")
    frame = next(generate_frames(cut.PixelData, number_of_frames=1))
    cut.PixelData = encapsulate([frame[:len(frame) // 2]])
    datasets["cut jpeg 2000.dcm"] = (cut, ("error", "pylibjpeg: Error decoding the J2K data"))
    with warnings.catch_warnings():  # pydicom warns that this is not a valid UID
        warnings.simplefilter("ignore")
        datasets["odd uid.dcm"] = (cr_dataset(RAMP_12_BIT, StudyInstanceUID="not a/uid"), OK)
        for name, (ds, outcome) in datasets.items():
            expected[save(ds, dicom / name)] = outcome
    text_dcm = dicom / "text.dcm"
    text_dcm.write_text("not a DICOM file\n" * 20)
    expected[text_dcm] = ("skipped", "unknown file type")

    if os.geteuid() != 0:  # root reads any file: the case cannot be made (own test below)
        (raster / "unreadable.png").write_bytes(whole_png.read_bytes())
        (raster / "unreadable.png").chmod(0)
        expected[raster / "unreadable.png"] = ("error", "Permission denied")
    return expected


def test_every_hostile_case_is_accounted_for_and_the_run_goes_on(tmp_path, chest,
                                                                   shipped_model):
    expected = write_hostile_corpus(tmp_path / "scans", chest)
    out = tmp_path / "out" / "results.json"
    outcomes = []
    for _ in range(2):  # the second run takes what it can from the state
        run = run_pneumoscan("run", tmp_path / "scans", "--json", out, "--model", shipped_model)
        assert run.returncode == EXIT_UNREADABLE, run.stderr
        # Each file's reason is in its result; no library tracebacks or warnings besides.
        assert not re.search(r"Traceback|ERROR|Warning", run.stderr), run.stderr
        outcomes.append(json.loads(out.read_text())["results"])
    assert outcomes[0] == outcomes[1]

    results = {Path(r["path"]): r for r in outcomes[0]}
    assert len(results) == len(outcomes[0]) and results.keys() == expected.keys()
    for path, (status, reason) in expected.items():
        result = results[path]
        assert result["status"] == status, result
        if reason is None:
            assert result["label"] in ("NORMAL", "PNEUMONIA")
        else:
            assert reason in result["reason"], result


# Peak resident memory of the scan alone. Not getrusage: its maximum survives exec, so a
# child of pytest starts with pytest's own peak. VmHWM is the process's own, reset here.
MEASURE_PEAK_MEMORY = """
import json, sys
from pathlib import Path
from pneumoscan import api

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field + ":"))

model = api.open_model(Path(sys.argv[1]), "cpu")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # peak := now
before = kib("VmRSS")
scan = api.scan(Path(sys.argv[2]), model, render=False)
print(json.dumps({"status": scan.results[0].status, "added_mib": (kib("VmHWM") - before) / 1024}))
"""


def test_a_very_large_image_is_classified_without_full_size_copies(tmp_path, shipped_model):
    """An 8000 x 8000 PNG of a real X-ray: 61 MiB of grey pixels once decoded. Decoding it
    needs one such buffer; the run must not add more than one more (before the image was
    shrunk right after decoding, it took 3.8)."""
    side = 8000
    folder = tmp_path / "large"
    folder.mkdir()
    with Image.open(SAMPLE_JPEG) as img:
        img.convert("L").resize((side, side), Image.Resampling.BILINEAR).save(
            folder / "large.png", compress_level=1)
    run = subprocess.run([sys.executable, "-c", MEASURE_PEAK_MEMORY, str(shipped_model),
                          str(folder)], env=CLI_ENV, cwd=CLI_CWD, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    full_size_mib = side * side / 2**20
    assert measured["status"] == "ok"
    assert measured["added_mib"] < 2 * full_size_mib, measured


@pytest.fixture(scope="module")
def model(shipped_model):
    return api.open_model(shipped_model, "cpu")


@pytest.mark.parametrize("with_state", [False, True], ids=["no state", "state"])
def test_a_file_gone_between_discovery_and_reading(with_state, tmp_path, chest, model,
                                                   monkeypatch):
    root = tmp_path / "scans"
    root.mkdir()
    for name in ("a.png", "gone.png", "z.png"):
        Image.fromarray(chest).save(root / name)
    discover = folder_scan.discover

    def discover_then_delete(folder):
        items = list(discover(folder))
        (root / "gone.png").unlink()
        return items

    monkeypatch.setattr(folder_scan, "discover", discover_then_delete)
    with Ledger.open(tmp_path / "state.sqlite") as ledger:
        scan = api.scan(root, model, render=False, ledger=ledger if with_state else None)
    assert [(r.path.name, r.status, r.reason) for r in scan.results] == [
        ("a.png", "ok", None),
        ("gone.png", "error", "file disappeared before it could be read"),
        ("z.png", "ok", None)]
    assert scan.exit_code == EXIT_UNREADABLE


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions, "
                                              "so an unreadable file cannot be made")
def test_an_unreadable_file_is_an_error(tmp_path, chest, model):
    root = tmp_path / "scans"
    root.mkdir()
    Image.fromarray(chest).save(root / "locked.png")
    (root / "locked.png").chmod(0)
    with Ledger.open(tmp_path / "state.sqlite") as ledger:
        [result] = api.scan(root, model, render=False, ledger=ledger).results
    assert (result.status, result.reason) == ("error", "cannot open: Permission denied")


SCRIPT = "<script>alert(1)</script>"
IMG_TAG = "<img src=x onerror=alert(2)>"
REMOTE_IMG = '<img src="http://example.invalid/x.png">'


def test_hostile_dicom_text_stays_text_and_fetches_nothing(tmp_path, shipped_model, monkeypatch,
                                                           pdftotext):
    """Markup in DICOM attributes, read by the real loader, is text in the HTML and PDF
    reports; a study UID made to climb out of the report folder does not; nothing is
    fetched over the network."""
    network = []

    def no_network(*args, **kwargs):
        network.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    root, reports = tmp_path / "scans", tmp_path / "reports"
    root.mkdir()
    with warnings.catch_warnings():  # pydicom warns that these are not valid values
        warnings.simplefilter("ignore")
        save(cr_dataset(RAMP_12_BIT, PatientName=SCRIPT, PatientID=IMG_TAG,
                        SOPInstanceUID=REMOTE_IMG, StudyInstanceUID="../../../../escape"),
             root / "hostile.dcm")
    result = invoke_cli("run", root, "--model", shipped_model, "--per-study", reports,
                        "--state", tmp_path / "state.sqlite", "--log", tmp_path / "log.jsonl")
    assert result.exit_code == 0, result.output

    html_path, pdf_path = sorted(reports.iterdir())  # both in the folder, nothing else
    assert (html_path.suffix, pdf_path.suffix) == (".html", ".pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "log.jsonl", "reports", "scans", "state.sqlite"]
    html = html_path.read_text()
    for markup in (SCRIPT, IMG_TAG, REMOTE_IMG):
        assert markup not in html and escape(markup) in html  # as autoescape writes it
    assert all(src.startswith("data:image/") for src in re.findall(r' src="([^"]*)"', html))
    pdf_text = subprocess.run([pdftotext, pdf_path, "-"], capture_output=True, text=True,
                              check=True).stdout
    assert SCRIPT in pdf_text and IMG_TAG in pdf_text  # shown as the text it is
    assert network == []
