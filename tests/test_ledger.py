"""The state ledger through `api.scan`: what a re-run computes again and what it reuses,
locking, and pseudonyms. Inputs are copies of real chest X-rays; the model is the small
real one from conftest."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import onnx
import pytest
from conftest import RAMP_12_BIT, cr_dataset, save

from pneumoscan import api
from pneumoscan.inference import pipeline
from pneumoscan.records import FileResult
from pneumoscan.report import html as report
from pneumoscan.results.anonymize import PSEUDONYM_PREFIX, anonymized
from pneumoscan.results.ledger import Ledger, StateError, StateLocked

PER_STUDY = 6


@pytest.fixture(scope="module")
def model(shipped_model):
    return api.open_model(shipped_model, "cpu")


@pytest.fixture(scope="module")
def spare_images(kermany224) -> list[Path]:
    """Real images to add to a folder or to change a file into: none of them in `scans`."""
    return [path for label in ("NORMAL", "PNEUMONIA")
            for path in sorted((kermany224 / label).iterdir())[PER_STUDY:]]


@pytest.fixture
def scans(tmp_path, kermany224) -> Path:
    """Two study folders of real images, one NORMAL and one PNEUMONIA."""
    root = tmp_path / "scans"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label.lower()).mkdir(parents=True)
        for source in sorted((kermany224 / label).iterdir())[:PER_STUDY]:
            shutil.copy(source, root / label.lower() / source.name)
    return root


@pytest.fixture
def decoded(monkeypatch) -> list[Path]:
    """The paths the pipeline decodes from now on."""
    paths = []
    real_load = pipeline.load

    def spying_load(item, *args, **kwargs):
        paths.append(item.path)
        return real_load(item, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load", spying_load)
    return paths


def scan_with_state(state: Path, root: Path, model, **options) -> api.Scan:
    with Ledger.open(state) as ledger:
        return api.scan(root, model, render=False, ledger=ledger, **options)


def recorded_paths(state: Path) -> list[bytes]:
    with sqlite3.connect(state) as db:
        return [path for (path,) in db.execute("SELECT path FROM files")]


def comparable(results: list[FileResult]) -> dict[Path, dict]:
    return {r.path: r.to_json() for r in results}


def test_rerun_computes_only_new_and_changed_files(scans, model, tmp_path, decoded,
                                                   spare_images):
    state = tmp_path / "state.sqlite"
    first = scan_with_state(state, scans, model)
    assert first.from_ledger == 0 and len(decoded) == 2 * PER_STUDY
    decoded.clear()

    changed, removed, *unchanged = sorted(scans.rglob("*.jpeg"))
    shutil.copy(spare_images[0], changed)
    removed.unlink()
    added = scans / "normal" / "added later.jpeg"
    shutil.copy(spare_images[1], added)
    second = scan_with_state(state, scans, model)

    assert sorted(decoded) == sorted([changed, added])
    # The results still cover the whole folder, unchanged files as first computed.
    assert sorted(r.path for r in second.results) == sorted(unchanged + [changed, added])
    assert {r.path for r in second.results if r.from_ledger} == set(unchanged)
    before = comparable(first.results)
    assert all(before[r.path] == r.to_json() for r in second.results if r.from_ledger)
    # The removed file is forgotten; every other file has exactly one row.
    assert sorted(recorded_paths(state)) == sorted(
        os.fsencode(p.absolute()) for p in unchanged + [changed, added])


def test_a_touched_or_rewritten_file_is_hashed_not_decoded(scans, model, tmp_path, decoded):
    state = tmp_path / "state.sqlite"
    scan_with_state(state, scans, model)
    decoded.clear()
    touched, rewritten = sorted(scans.rglob("*.jpeg"))[:2]
    os.utime(touched, ns=(0, 0))
    rewritten.write_bytes(rewritten.read_bytes())
    again = scan_with_state(state, scans, model)
    assert decoded == [] and again.from_ledger == 2 * PER_STUDY


@pytest.fixture(scope="module")
def other_model(shipped_model, tmp_path_factory):
    """The same network under another version: another file, another SHA-256."""
    proto = onnx.load(str(shipped_model))
    for prop in proto.metadata_props:
        if prop.key == "pneumoscan.version":
            prop.value = "test-2"
    path = tmp_path_factory.mktemp("other-model") / "model.onnx"
    onnx.save(proto, str(path))
    return api.open_model(path, "cpu")


@pytest.mark.parametrize("change", ["force", "other model", "other threshold"])
def test_everything_is_computed_again(change, scans, model, other_model, tmp_path, decoded):
    state = tmp_path / "state.sqlite"
    first = scan_with_state(state, scans, model)
    decoded.clear()
    options = {"force": {"force": True}, "other threshold": {"threshold": 0.123}}.get(change, {})
    again = scan_with_state(state, scans, other_model if change == "other model" else model,
                            **options)
    assert len(decoded) == 2 * PER_STUDY and again.from_ledger == 0
    assert len(recorded_paths(state)) == 2 * PER_STUDY  # replaced, not added
    if change == "force":
        assert comparable(again.results) == comparable(first.results)


def test_only_the_reports_of_changed_studies_are_rendered_again(scans, model, tmp_path,
                                                               spare_images):
    state, whole = tmp_path / "state.sqlite", tmp_path / "all.html"
    per_study = tmp_path / "studies"

    def run() -> tuple[list[Path], list[Path]]:
        with Ledger.open(state) as ledger:
            scan = api.scan(scans, model, ledger=ledger)
            return (api.write_report(whole, scan, ledger),
                    api.write_per_study(per_study, scan, ledger))

    def identities() -> dict[Path, tuple[int, int]]:
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in per_study.iterdir()}

    assert run()[0] == [whole] and len(identities()) == 4  # HTML and PDF of each study
    before = identities()
    normal = {p for p in before if "_normal-" in p.name}
    assert len(normal) == 2
    shutil.copy(spare_images[0], sorted((scans / "normal").iterdir())[0])
    wrote_whole, written = run()
    assert wrote_whole == [whole] and set(written) == normal
    after = identities()
    assert all(after[p] == before[p] for p in before.keys() - normal)  # not touched

    assert run() == ([], [])  # nothing changed: nothing rendered
    removed = next(iter(normal))
    removed.unlink()
    assert set(run()[1]) == normal  # a report that went missing is made again


def test_a_study_whose_rendering_was_cut_short_is_rendered_again(scans, model, tmp_path,
                                                                  spare_images, monkeypatch):
    """Even when its results go back to those of its previous reports: the files of an
    interrupted rendering may show results that are neither."""
    state, per_study = tmp_path / "state.sqlite", tmp_path / "studies"

    def run() -> list[Path]:
        with Ledger.open(state) as ledger:
            return api.write_per_study(per_study, api.scan(scans, model, ledger=ledger), ledger)

    normal = {p for p in run() if "_normal-" in p.name}
    changed = sorted((scans / "normal").iterdir())[0]
    original = changed.read_bytes()
    shutil.copy(spare_images[0], changed)
    write_per_study = report.write_per_study

    def killed_after_writing(*args, **kwargs):
        write_per_study(*args, **kwargs)
        raise KeyboardInterrupt  # before the ledger learns the files were written

    monkeypatch.setattr(report, "write_per_study", killed_after_writing)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(report, "write_per_study", write_per_study)
    changed.write_bytes(original)
    assert set(run()) == normal


def test_a_state_file_of_the_first_format_is_upgraded_and_its_scores_kept(scans, model,
                                                                        tmp_path, decoded):
    """Format 1 kept two images per file; format 2 keeps one picture. Upgrading keeps every
    score, and a report run makes the pictures again."""
    state = tmp_path / "state.sqlite"
    with Ledger.open(state) as ledger:
        first = api.scan(scans, model, ledger=ledger)
        first_pictures = [bytes(r.picture) for r in first.results]  # read from the state
    with sqlite3.connect(state) as db:  # back to the first format, images and all
        db.executescript("ALTER TABLE files DROP COLUMN picture;"
                         " ALTER TABLE files ADD COLUMN image_png BLOB;"
                         " ALTER TABLE files ADD COLUMN overlay_png BLOB;"
                         " UPDATE files SET image_png = x'ffd8', overlay_png = x'ffd8';"
                         " PRAGMA user_version = 1;")
    decoded.clear()
    upgraded = scan_with_state(state, scans, model)
    assert decoded == [] and upgraded.from_ledger == 2 * PER_STUDY
    assert comparable(upgraded.results) == comparable(first.results)
    with Ledger.open(state) as ledger:
        rendered = api.scan(scans, model, ledger=ledger)
        assert [bytes(r.picture) for r in rendered.results] == first_pictures
    assert len(decoded) == 2 * PER_STUDY
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)


def test_a_state_file_of_the_second_format_has_its_results_computed_again_with_scope(
        scans, model, tmp_path, decoded):
    """Format 2 results have no in_scope/scope_reasons: the ledger does not classify, so
    the upgrade has them computed again (the same scores), now with their scope."""
    state = tmp_path / "state.sqlite"
    with Ledger.open(state) as ledger:
        first = api.scan(scans, model, ledger=ledger)
    with sqlite3.connect(state) as db:  # back to the second format: results without scope
        for path, text in db.execute("SELECT path, result FROM files").fetchall():
            result = json.loads(text)
            del result["in_scope"], result["scope_reasons"]
            db.execute("UPDATE files SET result = ? WHERE path = ?", (json.dumps(result), path))
        db.execute("PRAGMA user_version = 2")
    decoded.clear()
    upgraded = scan_with_state(state, scans, model)
    assert len(decoded) == 2 * PER_STUDY and upgraded.from_ledger == 0
    assert [(r.path, r.probability, r.label, r.in_scope, r.scope_reasons)
            for r in upgraded.results] == [
        (r.path, r.probability, r.label, r.in_scope, r.scope_reasons) for r in first.results]
    assert all(r.in_scope is not None for r in upgraded.results)
    # Computed again, recorded with their scope: the next run takes them all from the state.
    assert scan_with_state(state, scans, model).from_ledger == 2 * PER_STUDY
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)


def test_a_report_run_after_a_json_only_run_makes_the_images(scans, model, tmp_path, decoded):
    state = tmp_path / "state.sqlite"
    scan_with_state(state, scans, model)
    decoded.clear()

    def images(scan: api.Scan) -> list[bytes | None]:
        return [bytes(r.picture) if r.picture else None for r in scan.results]

    with Ledger.open(state) as ledger:
        rendered = images(api.scan(scans, model, ledger=ledger))
    assert len(decoded) == 2 * PER_STUDY and all(rendered)
    decoded.clear()
    with Ledger.open(state) as ledger:
        again = images(api.scan(scans, model, ledger=ledger))
    assert decoded == [] and again == rendered
    assert scan_with_state(state, scans, model).from_ledger == 2 * PER_STUDY


def test_content_changing_while_read_is_not_recorded(scans, model, tmp_path, decoded,
                                                     monkeypatch):
    """A file still being written when it is read is computed again by the next run."""
    growing = sorted(scans.rglob("*.jpeg"))[3]
    spying_load = pipeline.load

    def load_while_written(item, *args, **kwargs):
        result = spying_load(item, *args, **kwargs)
        if item.path == growing:
            with open(growing, "ab") as fh:
                fh.write(b"\0" * 100)
        return result

    monkeypatch.setattr(pipeline, "load", load_while_written)
    state = tmp_path / "state.sqlite"
    scan_with_state(state, scans, model)
    assert os.fsencode(growing.absolute()) not in recorded_paths(state)
    monkeypatch.setattr(pipeline, "load", spying_load)
    decoded.clear()
    scan_with_state(state, scans, model)
    assert decoded == [growing]


def test_the_state_file_is_locked_while_open(tmp_path):
    state = tmp_path / "state.sqlite"
    opened = threading.Event()

    def open_waiting() -> None:
        with Ledger.open(state, wait=True):
            opened.set()

    with Ledger.open(state):
        with pytest.raises(StateLocked, match="in use by another pneumoscan run"):
            Ledger.open(state)
        waiter = threading.Thread(target=open_waiting)
        waiter.start()
        assert not opened.wait(0.5)
    assert opened.wait(10)
    waiter.join()


def test_the_state_file_is_private(tmp_path, scans, model):
    state = tmp_path / "state.sqlite"
    scan_with_state(state, scans, model)
    for path in tmp_path.glob("state.sqlite*"):  # with SQLite's WAL files
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_file_that_is_not_a_state_file_is_refused_untouched(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"results": []}))
    before = results.read_bytes()
    with pytest.raises(StateError, match="not a pneumoscan state file"):
        Ledger.open(results)
    assert results.read_bytes() == before


PATIENTS = {"a": ("Doe^Jane", "P-12345", "19700101"), "b": ("Roe^Richard", "P-67890", "19800202")}


def test_anonymized_outputs_carry_a_stable_pseudonym_and_no_identity(tmp_path, model,
                                                                     pdftotext):
    root = tmp_path / "scans"
    root.mkdir()
    for key, (name, patient_id, birth) in PATIENTS.items():
        save(cr_dataset(RAMP_12_BIT, PatientName=name, PatientID=patient_id,
                        PatientBirthDate=birth, StudyInstanceUID=f"1.2.3.{ord(key)}"),
             root / f"{key}.dcm")
    state = tmp_path / "state.sqlite"
    results, html, pdf = (tmp_path / f"out.{suffix}" for suffix in ("json", "html", "pdf"))
    pseudonyms = []
    for _ in range(2):  # the pseudonym key lives in the state: same pseudonyms next run
        with Ledger.open(state) as ledger:
            scan = api.anonymize(api.scan(root, model, ledger=ledger), ledger)
            api.write_json(results, scan)
            api.write_report(html, scan, ledger)
            api.write_report(pdf, scan, ledger)
        pseudonyms.append([r.metadata["PatientID"] for r in scan.results])
    assert pseudonyms[0] == pseudonyms[1]
    assert len(set(pseudonyms[0])) == 2 and all(p.startswith(PSEUDONYM_PREFIX)
                                                 for p in pseudonyms[0])
    pdf_text = subprocess.run([pdftotext, pdf, "-"], capture_output=True, text=True,
                              check=True).stdout
    # The HTML's embedded pictures are base64: any short name may occur in them by chance.
    html_text = re.sub(r"data:[^\"]+", "data:", html.read_text())
    for text in (results.read_text(), html_text, pdf_text):
        assert all(pseudonym in text for pseudonym in pseudonyms[0])
        for name, patient_id, birth in PATIENTS.values():
            for value in (name, name.split("^")[0], patient_id, birth):
                assert value not in text


def test_without_patient_id_the_name_and_birth_date_make_the_pseudonym():
    def result(**metadata) -> FileResult:
        return FileResult(Path("x.dcm"), "s", "ok", metadata=metadata)

    key = b"k" * 32
    same, other, anonymous = anonymized([
        result(PatientName="Doe^Jane", PatientBirthDate="19700101", Modality="CR"),
        result(PatientName="Doe^Jane", PatientBirthDate="19710101"),
        result(Modality="DX"),
    ], key)
    again = anonymized([result(PatientName="Doe^Jane", PatientBirthDate="19700101")], key)[0]
    assert same.metadata == {"Modality": "CR", "PatientID": again.metadata["PatientID"]}
    assert other.metadata["PatientID"] != same.metadata["PatientID"]
    assert anonymous.metadata == {"Modality": "DX"}


def recorded_remote_state(path: Path) -> tuple[list, list[str], object]:
    """A state holding one PACS instance's result (as scan_dicomweb records it)."""
    from pneumoscan.records import InputFile
    from pneumoscan.results.ledger import Basis

    items, uids = [InputFile(Path("1.2.3/1.2.3.4"), "dicom")], ["1.2.3.4"]
    basis = Basis("model-sha", 0.5, False)
    with Ledger.open(path) as ledger:
        (plan,) = ledger.plan_remote(items, uids, basis)
        result = FileResult(Path("1.2.3/1.2.3.4"), "1.2.3", "ok", probability=0.9,
                            label="PNEUMONIA", threshold=0.5, in_scope=True)
        assert ledger.record(plan, result, basis)
        assert ledger.plan_remote(items, uids, basis)[0].cached is not None
    return items, uids, basis


@pytest.mark.parametrize("damage, message", [
    ("UPDATE files SET result = '{not json'", "is damaged: cannot read recorded results"),
    ("DROP TABLE files", "cannot read recorded results: no such table: files"),
])
def test_a_damaged_state_read_for_a_pacs_is_one_state_error(damage, message, tmp_path):
    """plan_remote maps SQLite's errors and damaged rows as plan does."""
    state = tmp_path / "state.sqlite"
    items, uids, basis = recorded_remote_state(state)
    with Ledger.open(state) as ledger:
        ledger._db.execute(damage)
        with pytest.raises(StateError, match=message):
            ledger.plan_remote(items, uids, basis)


def test_a_bug_of_ours_inside_the_ledger_is_not_called_a_damaged_state(tmp_path,
                                                                       monkeypatch):
    """Only recorded rows that make no sense are "damaged"; a ValueError or KeyError of
    our own code while recording stays what it is."""
    state = tmp_path / "state.sqlite"
    items, uids, basis = recorded_remote_state(state)

    def broken_to_json(self):
        raise KeyError("a field our own code forgot")

    monkeypatch.setattr(FileResult, "to_json", broken_to_json)
    with Ledger.open(state) as ledger:
        (plan,) = ledger.plan_remote(items, uids, basis, force=True)
        with pytest.raises(KeyError, match="a field our own code forgot"):
            ledger.record(plan, FileResult(items[0].path, "1.2.3", "ok"), basis)
