"""A PACS as source and destination, against a real Orthanc (tests/orthanc.py) started by the
tests: pneumoscan reads the sample studies by DICOMweb, sends its SR, SC and PDF back by
STOW-RS (or C-STORE), and the server's REST API shows where they landed."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pydicom
import pytest
from conftest import SAMPLES, run_pneumoscan
from orthanc import PASSWORD, USER, Orthanc

from pneumoscan import api
from pneumoscan.dicomout.source import derived_uid
from pneumoscan.inputs.dicomweb import PASSWORD_ENV, USER_ENV, DicomWebSource
from pneumoscan.workers import available_cores

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
KNEE_STUDY = "1.3.6.1.4.1.5962.1.2.11.20040826185059.5457"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.5.20040826185059.5457"
# Enough that the server's death at the first result leaves some unretrieved: the run
# prepares up to three batches ahead of the model, which runs a batch a core ahead of the
# results (batches of one image here).
SECOND_STUDY_IMAGES = 3 + available_cores() + 5


def second_study(folder: Path) -> list[Path]:
    """A second chest study: the RG1 radiograph as another patient's study, new UIDs."""
    paths = []
    for i in range(SECOND_STUDY_IMAGES):
        ds = pydicom.dcmread(SAMPLES / "dicom" / "RG1_UNCR.dcm")
        ds.StudyInstanceUID = derived_uid("test-study")
        ds.SeriesInstanceUID = derived_uid("test-series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derived_uid("test", str(i))
        ds.PatientID, ds.PatientName = "PSC-TEST-2", "Second^Patient"
        paths.append(folder / f"second-{i}.dcm")
        ds.save_as(paths[-1])
    return paths


@pytest.fixture
def orthanc(tmp_path, monkeypatch):
    """A running Orthanc holding the sample DICOM files; credentials in the environment."""
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    for path in sorted((SAMPLES / "dicom").glob("*.dcm")):
        server.upload(path)
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    yield server
    server.kill()


def kinds(server: Orthanc, study: str) -> list[str]:
    return sorted(i["Modality"] for i in server.instances_of_study(study))


def test_pull_classify_push_and_a_second_run_fetches_and_sends_nothing(orthanc, tmp_path):
    out = tmp_path / "out"
    credentials = {USER_ENV: USER, PASSWORD_ENV: PASSWORD}
    first = run_pneumoscan("run", orthanc.dicomweb_url, "--push", "--json", out / "r.json",
                           "--log", out / "run.jsonl", env=credentials, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "sent for 1 studies; not sent for 0" in first.stderr
    # The chest study gets a PDF, and an SR and a CAM capture per image; the knee (not a
    # chest) and the MR (not queried) nothing.
    assert kinds(orthanc, RG1_STUDY) == ["CR"] * 3 + ["DOC"] + ["SEG"] * 3 + ["SR"] * 3
    assert kinds(orthanc, KNEE_STUDY) == ["CR"]
    assert kinds(orthanc, MR_STUDY) == ["MR"]
    instances = orthanc.instances_of_study(RG1_STUDY)
    sources = {i["SOPInstanceUID"] for i in instances if i["Modality"] == "CR"}
    results = json.loads((out / "r.json").read_text())["results"]
    assert {Path(r["path"]).name for r in results if r["status"] == "ok"} == sources
    assert {r["study"] for r in results} == {RG1_STUDY, KNEE_STUDY}
    for sr in [i for i in instances if i["Modality"] == "SR"]:
        assert sr["SeriesDescription"].startswith("pneumoscan")
        assert sr["PatientID"] == "9RG1"

    second = run_pneumoscan("run", orthanc.dicomweb_url, "--push", "--json", out / "r.json",
                            "--log", out / "run.jsonl", env=credentials, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "4 files (4 unchanged since the last run)" in second.stderr
    assert "sent for 0 studies; not sent for 0" in second.stderr
    assert len(orthanc.instances_of_study(RG1_STUDY)) == 10
    # Credentials appear in no output.
    for text in (first.stderr, second.stderr, (out / "r.json").read_text(),
                 (out / "run.jsonl").read_text()):
        assert PASSWORD not in text


def test_credentials_from_a_netrc_file_and_a_clear_error_without_them(orthanc, tmp_path,
                                                                      monkeypatch):
    monkeypatch.delenv(USER_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc of the user running the tests
    with pytest.raises(api.RunError, match="HTTP 401"):
        api.run(api.RunOptions(orthanc.dicomweb_url, json=tmp_path / "r.json"))
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    studies, bad = DicomWebSource(orthanc.dicomweb_url).studies()
    assert set(studies) == {RG1_STUDY, KNEE_STUDY} and bad == []


def test_credentials_in_the_url_are_refused(orthanc, tmp_path):
    url = orthanc.dicomweb_url.replace("http://", f"http://{USER}:{PASSWORD}@")
    with pytest.raises(api.RunError, match="credentials do not belong in the DICOMweb URL"
                       ) as raised:
        api.run(api.RunOptions(url, json=tmp_path / "r.json"))
    assert PASSWORD not in str(raised.value) and raised.value.exit_code == api.EXIT_USAGE
    assert list(tmp_path.iterdir()) == [orthanc.folder]  # no state, no log


def test_since_limits_the_query_to_studies_from_that_date(orthanc, tmp_path):
    source = DicomWebSource(orthanc.dicomweb_url)
    assert set(source.studies(date(2004, 8, 26))[0]) == {RG1_STUDY, KNEE_STUDY}
    assert source.studies(date(2004, 8, 27)) == ({}, [])
    later = api.run(api.RunOptions(orthanc.dicomweb_url, json=tmp_path / "a.json",
                                   since=date(2004, 8, 27)))
    assert later.scan.results == [] and later.exit_code == api.EXIT_OK


def test_c_store_to_another_pacs(orthanc, tmp_path):
    archive = Orthanc(tmp_path / "archive")
    archive.start()
    try:
        summary = api.run(api.RunOptions(orthanc.dicomweb_url, json=tmp_path / "r.json",
                                         push=archive.cstore_url))
        assert summary.pushed == [RG1_STUDY] and summary.push_failures == []
        assert kinds(archive, RG1_STUDY) == ["DOC"] + ["SEG"] * 3 + ["SR"] * 3
    finally:
        archive.kill()


class KillServerAtFirstResult(api.RunEvents):
    def __init__(self, server: Orthanc):
        self.server = server

    def result(self, result):
        self.server.kill()


def test_server_killed_mid_run_gives_clear_errors_and_the_next_run_completes(orthanc, tmp_path):
    for path in second_study(tmp_path):
        orthanc.upload(path)
    options = api.RunOptions(orthanc.dicomweb_url, json=tmp_path / "r.json", push="source",
                             batch_size=1)
    broken = api.run(options, KillServerAtFirstResult(orthanc))
    errors = [r for r in broken.scan.results if r.status == "error"]
    done = [r for r in broken.scan.results if r.status != "error"]
    assert errors and done  # killed after some instances were retrieved, before others
    for error in errors:
        assert error.reason.startswith("cannot retrieve instance")
    assert broken.pushed == [] and broken.push_failures
    for failure in broken.push_failures:
        assert "STOW-RS to" in failure and "failed" in failure
    assert broken.exit_code == api.EXIT_UNREADABLE

    orthanc.start()
    recovered = api.run(options)
    assert recovered.exit_code == api.EXIT_OK
    assert recovered.scan.from_ledger == len(done)  # only what failed is retrieved again
    assert sorted(recovered.pushed) == sorted([RG1_STUDY, derived_uid("test-study")])
    assert kinds(orthanc, derived_uid("test-study")) == (
        ["CR"] * SECOND_STUDY_IMAGES + ["DOC"] + ["SEG"] * SECOND_STUDY_IMAGES
        + ["SR"] * SECOND_STUDY_IMAGES)
    assert api.run(options).pushed == []
