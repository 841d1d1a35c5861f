"""DICOM outputs (`--dicom-out`) of a run over the sample DICOM files, checked by
independent tools: dcmtk (dcmdump, dsrdump, dcm2pdf), dicom3tools' dciodvfy, and read back
with pydicom and highdicom."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from conftest import SAMPLES, installed_program
from pydicom.uid import EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from pneumoscan import api
from pneumoscan.results.anonymize import PSEUDONYM_PREFIX

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"


def tool(name: str, package: str) -> str:
    """An independent validator; in CI (.ci/run installs them) a missing one fails."""
    import os
    import shutil

    if os.environ.get("CI") and shutil.which(name) is None:
        pytest.fail(f"{name} missing in CI (Debian package {package}; .ci/run installs it)")
    return installed_program(name, package)


def run_dicom_out(out: Path, **options) -> api.RunSummary:
    return api.run(api.RunOptions(SAMPLES / "dicom", json=out / "r.json",
                                  dicom_out=out / "dicom", **options))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dicom-out")
    summary = run_dicom_out(out)
    results = json.loads((out / "r.json").read_text())["results"]
    return summary, results, out


def outputs(summary: api.RunSummary) -> dict[str, list[pydicom.Dataset]]:
    """Output data sets by kind (SR, SC, PDF), read back from the files written."""
    by_kind: dict[str, list] = {"SR": [], "SC": [], "PDF": []}
    for path in summary.written:
        if path.suffix == ".dcm":
            by_kind[path.name.split("-")[0]].append(pydicom.dcmread(path))
    return by_kind


def test_each_classified_image_gets_an_sr_and_an_sc_and_its_study_one_pdf(first_run):
    summary, results, _ = first_run
    classified = [r for r in results if r["status"] == "ok"]
    assert {r["metadata"]["StudyInstanceUID"] for r in classified} == {RG1_STUDY}
    got = outputs(summary)
    assert len(got["SR"]) == len(got["SC"]) == len(classified) == 3
    assert len(got["PDF"]) == 1  # the knee and the MR study get none: nothing classified
    for ds in got["SR"] + got["SC"] + got["PDF"]:
        assert ds.StudyInstanceUID == RG1_STUDY
        assert ds.PatientName == "CompressedSamples^RG1" and ds.PatientID == "9RG1"
        assert ds.PatientBirthDate == "19400305" and ds.AccessionNumber == "exam Number"
        assert ds.SeriesInstanceUID != classified[0]["metadata"]["SeriesInstanceUID"]
    # One new series per kind.
    for kind in ("SR", "SC"):
        assert len({ds.SeriesInstanceUID for ds in got[kind]}) == 1


def test_outputs_pass_dciodvfy_without_errors(first_run):
    dciodvfy = tool("dciodvfy", "dicom3tools")
    for path in [p for p in first_run[0].written if p.suffix == ".dcm"]:
        checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True,
                                 check=False)  # its status counts warnings too
        errors = [line for line in (checked.stdout + checked.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


def test_sr_says_probability_threshold_decision_model_and_source_image(first_run):
    dsrdump = tool("dsrdump", "dcmtk")
    summary, results, _ = first_run
    by_sop = {r["metadata"]["SOPInstanceUID"]: r for r in results if r["status"] == "ok"}
    run = json.loads((first_run[2] / "r.json").read_text())["run"]
    for ds in outputs(summary)["SR"]:
        assert isinstance(hd.sr.srread(ds.filename), hd.sr.ComprehensiveSR)  # highdicom reads it
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item
                 for item in _walk(ds.ContentSequence)}
        source = items["Source of Measurement"].ReferencedSOPSequence[0]
        result = by_sop[source.ReferencedSOPInstanceUID]
        assert source.ReferencedSOPClassUID == result["metadata"]["SOPClassUID"]
        probability = items["Probability"].MeasuredValueSequence[0].NumericValue
        threshold = items["Threshold Value"].MeasuredValueSequence[0].NumericValue
        assert float(probability) == pytest.approx(result["probability"], abs=1e-6)
        assert float(threshold) == pytest.approx(result["threshold"], abs=1e-6)
        decision = items["Pneumonia"].ConceptCodeSequence[0].CodeMeaning
        assert decision == ("Present" if result["label"] == "PNEUMONIA" else "Absent")
        assert items["Algorithm Name"].TextValue == run["model"]["name"]
        assert items["Algorithm Version"].TextValue == run["model"]["version"]
        parameters = {item.TextValue for item in _walk(ds.ContentSequence)
                      if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"}
        assert f"sha256={run['model']['sha256']}" in parameters
        equipment = ds.ContributingEquipmentSequence[0]
        assert run["model"]["sha256"] in equipment.ContributionDescription
        # The evidence lists the source image, and dcmtk reads the document through.
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == RG1_STUDY
        dumped = subprocess.run([dsrdump, str(ds.filename)], capture_output=True, text=True,
                                check=True).stdout
        assert "Imaging Measurement Report" in dumped and '"Pneumonia")=' in dumped


def _walk(sequence):
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_encapsulated_pdf_gives_back_the_study_report(first_run, tmp_path, pdftotext):
    dcm2pdf = tool("dcm2pdf", "dcmtk")
    (pdf,) = outputs(first_run[0])["PDF"]
    assert pdf.SOPClassUID == EncapsulatedPDFStorage and pdf.Modality == "DOC"
    extracted = tmp_path / "report.pdf"
    subprocess.run([dcm2pdf, str(pdf.filename), str(extracted)], check=True)
    embedded = bytes(pdf.EncapsulatedDocument)[:pdf.EncapsulatedDocumentLength]
    assert extracted.read_bytes() == embedded and embedded.startswith(b"%PDF-")
    text = subprocess.run([pdftotext, str(extracted), "-"], capture_output=True, text=True,
                          check=True).stdout
    assert RG1_STUDY in text and "P(pneumonia)" in text
    referenced = {item.ReferencedSOPInstanceUID for item in pdf.SourceInstanceSequence}
    assert len(referenced) == 3


def test_cam_capture_is_derived_with_the_warning_burned_in(first_run):
    dcmdump = tool("dcmdump", "dcmtk")
    for ds in outputs(first_run[0])["SC"]:
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "YES"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID.startswith("1.3.6.1.4.1.5962")
        banner = hd.imread(ds.filename).pixel_array[:40]
        # The banner is black with white text on it; the picture under it is the X-ray.
        assert (banner == 0).mean() > 0.5 and (banner > 200).any()
        dumped = subprocess.run([dcmdump, str(ds.filename)], capture_output=True, text=True,
                                check=True).stdout
        assert "DERIVED\\SECONDARY" in dumped and "(0028,0301) CS [YES]" in dumped


def test_a_rerun_replaces_the_same_instances(first_run, tmp_path):
    again = run_dicom_out(tmp_path, force=True)

    def names(summary):
        return sorted(p.name for p in summary.written if p.suffix == ".dcm")

    def series(summary):
        return {ds.SeriesInstanceUID for kind in outputs(summary).values() for ds in kind}

    assert names(again) == names(first_run[0])
    assert series(again) == series(first_run[0])


def test_anonymize_puts_the_pseudonym_of_the_json_in_every_output(tmp_path):
    summary = run_dicom_out(tmp_path, anonymize=True)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    (pseudonym,) = {r["metadata"]["PatientID"] for r in results if r["status"] == "ok"}
    assert pseudonym.startswith(PSEUDONYM_PREFIX)
    got = outputs(summary)
    # The outputs exist: 3 SR, 3 SC and the PDF, as without --anonymize (they were none).
    assert [len(got[kind]) for kind in ("SR", "SC", "PDF")] == [3, 3, 1]
    studies = {r["metadata"]["StudyInstanceUID"] for r in results if r["status"] == "ok"}
    assert len(studies) == 1 and RG1_STUDY not in studies
    for ds in got["SR"] + got["SC"] + got["PDF"]:
        assert ds.PatientID == pseudonym and ds.PatientName.family_name == pseudonym
        assert not ds.get("PatientBirthDate") and not ds.get("ReferringPhysicianName")
        assert not ds.get("AccessionNumber") and not ds.get("StudyDate")
        assert ds.StudyInstanceUID in studies  # the pseudonymous study, not the source's
        assert "CompressedSamples" not in str(ds) and "9RG1" not in str(ds)
        assert RG1_STUDY not in str(ds)
