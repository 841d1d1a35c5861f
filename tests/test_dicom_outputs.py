"""DICOM outputs (`--dicom-out`) of a run over the sample DICOM files, checked by
independent tools: dcmtk (dcmdump, dsrdump, dcm2pdf), dicom3tools' dciodvfy, and read back
with pydicom and highdicom."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import (
    PNEUMONIA_JPEG,
    SAMPLES,
    cr_dataset,
    installed_program,
    save,
)
from PIL import Image
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    SecondaryCaptureImageStorage,
)

from pneumoscan import api
from pneumoscan.results.anonymize import PSEUDONYM_PREFIX

RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
CHILD_STUDY = "1.2.826.0.1.3680043.8.498.4242"


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
    """The sample DICOM files, with the CAM as a Secondary Capture too (--dicom-sc)."""
    out = tmp_path_factory.mktemp("dicom-out")
    summary = run_dicom_out(out, dicom_sc=True)
    results = json.loads((out / "r.json").read_text())["results"]
    return summary, results, out


def outputs(summary: api.RunSummary) -> dict[str, list[pydicom.Dataset]]:
    """Output data sets by kind (SR, SEG, SC, PDF), read back from the files written."""
    by_kind: dict[str, list] = {"SR": [], "SEG": [], "SC": [], "PDF": []}
    for path in summary.written:
        if path.suffix == ".dcm":
            by_kind[path.name.split("-")[0]].append(pydicom.dcmread(path))
    return by_kind


def test_each_classified_image_gets_an_sr_a_seg_and_an_sc_and_its_study_one_pdf(first_run):
    summary, results, _ = first_run
    classified = [r for r in results if r["status"] == "ok"]
    assert {r["metadata"]["StudyInstanceUID"] for r in classified} == {RG1_STUDY}
    got = outputs(summary)
    assert len(got["SR"]) == len(got["SEG"]) == len(got["SC"]) == len(classified) == 3
    assert len(got["PDF"]) == 1  # the knee and the MR study get none: nothing classified
    for ds in got["SR"] + got["SEG"] + got["SC"] + got["PDF"]:
        assert ds.StudyInstanceUID == RG1_STUDY
        assert ds.PatientName == "CompressedSamples^RG1" and ds.PatientID == "9RG1"
        assert ds.PatientBirthDate == "19400305" and ds.AccessionNumber == "exam Number"
        assert ds.SeriesInstanceUID != classified[0]["metadata"]["SeriesInstanceUID"]
    # One new series per kind, its instances numbered apart.
    for kind in ("SR", "SEG", "SC"):
        assert len({ds.SeriesInstanceUID for ds in got[kind]}) == 1
        assert sorted(ds.InstanceNumber for ds in got[kind]) == [1, 2, 3]


@pytest.mark.parametrize("which", ["first_run", "child_run"])
def test_outputs_pass_dciodvfy_and_dcentvfy_without_errors(which, request):
    dciodvfy = tool("dciodvfy", "dicom3tools")
    written = [p for p in request.getfixturevalue(which)[0].written if p.suffix == ".dcm"]
    assert written
    for path in written:
        checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True,
                                 check=False)  # its status counts warnings too
        errors = [line for line in (checked.stdout + checked.stderr).splitlines()
                  if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"
    # Across the outputs of a study: one patient, one study (description and all).
    dcentvfy = tool("dcentvfy", "dicom3tools")
    checked = subprocess.run([dcentvfy, *map(str, written)], capture_output=True, text=True,
                             check=False)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines()
              if line.startswith("Error")]
    assert errors == []


@pytest.fixture(scope="module")
def child_run(tmp_path_factory):
    """Two frontal chest CRs of a 4-year-old (the samples' Kermany images), inside the
    model's intended use: one NORMAL, one PNEUMONIA."""
    out = tmp_path_factory.mktemp("dicom-out-child")
    scans = out / "scans"
    scans.mkdir()
    # NORMAL2-IM-1442: the sample NORMAL scan furthest from the threshold (0.03).
    normal = SAMPLES / "study-normal-2" / "NORMAL2-IM-1442-0001.jpeg"
    for number, jpeg in enumerate((normal, PNEUMONIA_JPEG), start=1):
        with Image.open(jpeg) as image:
            pixels = np.asarray(image.convert("L"))
        save(cr_dataset(pixels, PatientAge="004Y", PatientID="CHILD-1",
                        StudyInstanceUID=CHILD_STUDY, SeriesInstanceUID=CHILD_STUDY + ".1",
                        StudyDescription="Chest PA", PatientOrientation=["L", "F"]),
             scans / f"image-{number}.dcm")
    summary = api.run(api.RunOptions(scans, json=out / "r.json", dicom_out=out / "dicom"))
    results = json.loads((out / "r.json").read_text())["results"]
    assert [r["in_scope"] for r in results] == [True, True]
    assert {r["label"] for r in results} == {"NORMAL", "PNEUMONIA"}
    return summary, results, out


@pytest.mark.parametrize("which", ["first_run", "child_run"])
def test_sr_is_an_ihe_air_result_read_back_by_highdicom(which, request):
    """Adults (the samples) are out of scope: no finding stated, the reason in a Comment;
    the children's SRs state the Presence of pneumonia as the model decided."""
    dsrdump = tool("dsrdump", "dcmtk")
    summary, results, out = request.getfixturevalue(which)
    by_sop = {r["metadata"]["SOPInstanceUID"]: r for r in results if r["status"] == "ok"}
    run = json.loads((out / "r.json").read_text())["run"]
    srs = outputs(summary)["SR"]
    assert len(srs) == len(by_sop)
    assert sorted(ds.InstanceNumber for ds in srs) == list(range(1, len(srs) + 1))
    for ds in srs:
        assert ds.SOPClassUID == Comprehensive3DSRStorage
        sr = hd.sr.srread(ds.filename)
        assert isinstance(sr, hd.sr.Comprehensive3DSR)
        (group,) = sr.content.get_image_measurement_groups()
        assert group.finding_type.meaning == "Pneumonia"
        assert group.finding_category.meaning == "Finding"
        assert [site.value.meaning for site in group.finding_sites] == ["Lung"]
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item
                 for item in _walk(ds.ContentSequence)}
        source = items["Source of Measurement"].ReferencedSOPSequence[0]
        result = by_sop[source.ReferencedSOPInstanceUID]
        assert source.ReferencedSOPClassUID == result["metadata"]["SOPClassUID"]
        library = items["Image Library"]
        assert library.ContentSequence[0].ContentSequence[0].ReferencedSOPSequence[0] \
            .ReferencedSOPInstanceUID == source.ReferencedSOPInstanceUID
        probability = items["Probability"].MeasuredValueSequence[0].NumericValue
        threshold = items["Threshold Value"].MeasuredValueSequence[0].NumericValue
        assert float(probability) == pytest.approx(result["probability"], abs=1e-6)
        assert float(threshold) == pytest.approx(result["threshold"], abs=1e-6)
        presence = [e for e in group.get_qualitative_evaluations()
                    if e.name.meaning == "Presence"]
        if result["in_scope"]:
            assert [e.value.meaning for e in presence] == [
                "Present" if result["label"] == "PNEUMONIA" else "Absent"]
            assert "Comment" not in items
        else:
            assert presence == []  # no finding asserted
            comment = items["Comment"].TextValue
            assert comment.startswith("Outside the model's intended use")
            assert result["scope_reasons"][0] in comment
        # The algorithm: observer device named after it, and its Contributing Equipment
        # item as IHE AIR has it, the same UID.
        assert items["Device Observer Name"].TextValue == run["model"]["name"]
        (algorithm,) = [e for e in ds.ContributingEquipmentSequence
                        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
        purpose = algorithm.PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
            "99IHE", "Processing Algorithm")
        assert algorithm.DeviceUID == items["Device Observer UID"].UID
        assert algorithm.Manufacturer == "pneumoscan"
        assert algorithm.ManufacturerModelName == run["model"]["name"]
        assert f"{run['model']['name']} {run['model']['version']}" in algorithm.SoftwareVersions
        assert algorithm.ContributionDateTime.startswith(run["started"][:10].replace("-", ""))
        assert items["Algorithm Name"].TextValue == run["model"]["name"]
        assert items["Algorithm Version"].TextValue == run["model"]["version"]
        parameters = {item.TextValue for item in _walk(ds.ContentSequence)
                      if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"}
        assert f"sha256={run['model']['sha256']}" in parameters
        assert ds.StudyDescription == result["metadata"]["StudyDescription"]
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == result["metadata"]["StudyInstanceUID"]
        dumped = subprocess.run([dsrdump, str(ds.filename)], capture_output=True, text=True,
                                check=True).stdout
        assert "Imaging Measurement Report" in dumped
        assert ('"Presence")=' in dumped) == result["in_scope"]


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
    again = run_dicom_out(tmp_path, force=True, dicom_sc=True)

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
    made = outputs(summary)
    assert [len(made[kind]) for kind in ("SR", "SEG", "PDF")] == [3, 3, 1]
    for kind in made.values():
        for ds in kind:
            assert ds.PatientID == pseudonym and ds.PatientName.family_name == pseudonym
            assert not ds.get("PatientBirthDate") and not ds.get("ReferringPhysicianName")
            assert "CompressedSamples" not in str(ds)


def test_out_of_scope_images_are_counted_apart_and_the_capture_says_so_first(first_run):
    """The three adult radiographs of the samples: outside the intended use, counted in
    neither PNEUMONIA nor NORMAL, and their CAM capture's banner opens with it."""
    from pneumoscan.dicomout.sc import _banner_text
    from pneumoscan.results.ledger import result_from_json

    summary, results, _ = first_run
    counts = summary.scan.counts()
    assert (counts.classified, counts.out_of_scope, counts.normal, counts.pneumonia) == (
        3, 3, 0, 0)
    for record in [r for r in results if r["status"] == "ok"]:
        result = result_from_json(record, Path(record["path"]))
        banner = _banner_text(result, summary.scan.run)
        assert banner[0].startswith("OUTSIDE INTENDED USE - no finding stated: patient aged 64")
    from pneumoscan.dicomout.sc import FONT_SIZE, MARGIN
    from pneumoscan.report.pictures import display_size, picture_size

    for capture in outputs(summary)["SC"]:
        shown = picture_size(*display_size(1841, 1955))  # RG1's columns and rows
        assert capture.Columns == shown[0]
        # Under the picture a line of the colour scale's numbers; above it the banner: the
        # scope line (wrapped) first, then the usual two.
        banner_lines = (capture.Rows - shown[1] - MARGIN) // (FONT_SIZE + MARGIN) - 1
        assert banner_lines >= 3


@pytest.mark.parametrize("which", ["first_run", "child_run"])
def test_the_heat_map_is_a_fractional_segmentation_on_the_source_grid(which, request):
    """highdicom reads it back: one FRACTIONAL segment "Pneumonia" at the source's rows and
    columns, referring to the source image, its values the result's CAM stretched over
    the image. Without --dicom-sc, no Secondary Capture."""
    from pneumoscan.dicomout.seg import cam_on_source_grid

    summary, results, _ = request.getfixturevalue(which)
    by_sop = {r["metadata"]["SOPInstanceUID"]: r for r in results if r["status"] == "ok"}
    got = outputs(summary)
    assert len(got["SEG"]) == len(by_sop) and len(got["SC"]) == (3 if which == "first_run" else 0)
    for ds in got["SEG"]:
        seg = hd.seg.segread(ds.filename)
        assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
        (reference,) = [item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                        for item in series.ReferencedInstanceSequence]
        result = by_sop[reference]
        rows, columns = int(result["metadata"]["Rows"]), int(result["metadata"]["Columns"])
        assert (seg.Rows, seg.Columns) == (rows, columns)
        assert seg.get_segment_description(1).segmented_property_type.meaning == "Pneumonia"
        stored = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[reference], rescale_fractional=True)[0, :, :, 0]
        expected = cam_on_source_grid(np.array(result["cam"]), rows, columns)
        assert stored.shape == expected.shape
        assert np.abs(stored.astype(np.float64) - expected).max() <= 1 / 255 + 1e-6
        assert ds.StudyDescription == result["metadata"]["StudyDescription"]
        assert ds.SeriesDescription.startswith("pneumoscan CAM heat map")


def test_per_study_and_dicom_out_render_each_study_pdf_once(tmp_path, monkeypatch):
    """With --per-study and --dicom-out, the Encapsulated PDF carries the per-study PDF
    this run rendered: the same bytes, rendered once."""
    from pneumoscan.report import html as report

    rendered: list[int] = []

    def counted(html: str) -> bytes:
        pdf = render_pdf(html)
        rendered.append(len(pdf))
        return pdf

    render_pdf = report.render_pdf
    monkeypatch.setattr(report, "render_pdf", counted)
    summary = run_dicom_out(tmp_path, per_study=tmp_path / "studies")
    per_study_pdfs = [p for p in summary.written if p.suffix == ".pdf"]
    encapsulated = outputs(summary)["PDF"]
    # The sample DICOM folder's studies each get a per-study report; one has a classified
    # DICOM image and so an Encapsulated PDF.
    assert len(per_study_pdfs) == len(rendered) >= 2 and len(encapsulated) == 1
    [study_pdf] = [p for p in per_study_pdfs if RG1_STUDY in p.name]
    document = encapsulated[0]
    carried = bytes(document.EncapsulatedDocument)[:document.EncapsulatedDocumentLength]
    assert carried == study_pdf.read_bytes()


def test_results_from_the_state_get_the_same_heat_map(first_run, tmp_path):
    """The CAM grid is kept in the state: a later run whose results all come from it
    writes the same Segmentations (into another folder, where they are due)."""
    summary, _, out = first_run
    later = api.run(api.RunOptions(SAMPLES / "dicom", json=out / "r.json",
                                   dicom_out=tmp_path / "again"))
    assert later.scan.from_ledger == len(later.scan.results)
    again = {ds.SOPInstanceUID: ds for ds in outputs(later)["SEG"]}
    first = outputs(summary)["SEG"]
    assert sorted(again) == sorted(ds.SOPInstanceUID for ds in first)
    for ds in first:
        assert again[ds.SOPInstanceUID].PixelData == ds.PixelData
