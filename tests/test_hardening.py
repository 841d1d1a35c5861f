"""What an attacker and a bad night in cron found (issue 11), each break reproduced: files
swapped for FIFOs and devices after discovery, a stale lock holder, crafted DICOM values,
impossible pixel transforms, a very deep folder, links at the state and log paths, terminal
injection, identity leaking past --anonymize, stale per-study reports, orphaned render
workers, a sick or truncated state file, reports of many images. The seeded fuzz corpus is
in test_fuzz.py."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan import api
from pneumoscan.inference.pipeline import Job, await_job, classify, stuck
from pneumoscan.inputs.discover import MAX_DEPTH, discover
from pneumoscan.inputs.loading import load_path
from pneumoscan.records import FileResult, InputFile, RunInfo
from pneumoscan.report import html as report
from pneumoscan.workers import available_cores
from pneumoscan.results.ledger import HUNG_AFTER_S, Basis, Ledger, StateLocked, describe_holder
from pneumoscan.results.runlog import RunLog

from conftest import (CLI_CWD, CLI_ENV, RAMP_12_BIT, cr_dataset, invoke_cli, pneumoscan_command,
                      remove_tree, run_pneumoscan, save)

# A hung test must fail, not hang the suite.
HANG_S = 60


@pytest.fixture(scope="module")
def model(shipped_model):
    return api.open_model(shipped_model, "cpu")


def without_hanging(function, *args):
    """function(*args) in a thread; fails the test if it has not returned within HANG_S."""
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(value=function(*args)), daemon=True)
    worker.start()
    worker.join(HANG_S)
    assert not worker.is_alive(), f"{function.__name__} still blocked after {HANG_S} s"
    return outcome["value"]


def save_chest(path: Path, chest: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(chest).save(path)
    return path


# --- 1. a file swapped for a FIFO or a device after discovery; the watchdog; the holder --

def swap_after_discovery(root: Path) -> list:
    """Discover `root`, then replace files as another system might before they are read:
    a FIFO, a link to /dev/zero in place of a file, a link that now points at /dev/zero."""
    items = list(discover(root))
    (root / "fifo.png").unlink()
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").unlink()
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "linked.png").unlink()
    (root / "linked.png").symlink_to("/dev/zero")
    return items


SWAPPED = {"a.png": ("ok", None),
           "fifo.png": ("error", "not a regular file now (a pipe (FIFO))"),
           "linked.png": ("error", "not a regular file now (a device)"),
           "target.png": ("ok", None),
           "zero.png": ("error", "replaced by a symbolic link after it was found; "
                                 "not followed")}


@pytest.fixture
def swappable(tmp_path, chest) -> Path:
    root = tmp_path / "scans"
    for name in ("a.png", "fifo.png", "zero.png", "target.png"):
        save_chest(root / name, chest)
    (root / "linked.png").symlink_to("target.png")
    return root


def test_files_swapped_for_a_fifo_or_a_device_after_discovery_are_errors(swappable, model):
    items = swap_after_discovery(swappable)
    results = without_hanging(lambda: list(classify(items, model)))
    outcomes = {r.path.name: (r.status, r.reason and r.reason.split(": ", 1)[1])
                for r in results}
    assert outcomes == SWAPPED


def test_the_state_hashes_no_fifo_or_device(swappable, tmp_path):
    items = swap_after_discovery(swappable)

    def plan() -> list:
        with Ledger.open(tmp_path / "state.sqlite") as ledger:
            return ledger.plan(items, Basis("m", 0.5, False))

    plans = without_hanging(plan)
    hashed = {plan.item.path.name for plan in plans if plan.content_sha256}
    assert hashed == {"a.png", "target.png"}


def test_a_file_that_never_ends_is_abandoned_and_the_run_goes_on(tmp_path):
    """The watchdog, on work that really never ends (a worker blocked for good): the file
    becomes an error once it has run `timeout` seconds, and the process knows a thread is
    stuck, so that it exits without waiting for it."""
    item = InputFile(tmp_path / "never.png", "png")
    job = Job(item)
    job.future, job.started = Future(), time.monotonic()  # taken by a worker, never done
    prepared = without_hanging(await_job, job, 0.2)
    assert (prepared.outcome.status, prepared.outcome.reason) == (
        "error", "abandoned: reading and decoding took longer than 0.2 s (a stuck decoder, "
                 "or a file that never ends)")
    assert stuck()
    job.future.set_result(None)  # it ended after all
    assert not stuck()


HOLD_STATE = """
import sys, time
from pneumoscan.results.ledger import Ledger
with Ledger.open(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_locked_out_run_names_the_holder_and_says_when_it_looks_hung(tmp_path):
    state = tmp_path / "r.pneumoscan.sqlite"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STATE, str(state)], env=CLI_ENV,
                              cwd=CLI_CWD, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StateLocked) as locked:
            Ledger.open(state)
        assert locked.value.holder["pid"] == holder.pid and not locked.value.hung
        assert f"PID {holder.pid}, started " in str(locked.value)
        run = run_pneumoscan("run", tmp_path, "--json", tmp_path / "r.json")
        assert run.returncode == api.EXIT_LOCKED
        assert f"in use by another pneumoscan run (PID {holder.pid}, started" in run.stderr
        # The same holder, seen once its progress is older than any run may go without.
        later = locked.value.holder["progress"] + HUNG_AFTER_S + 60
        text = describe_holder(locked.value.holder, later)
        assert "it looks hung" in text and f"kill {holder.pid}" in text
    finally:
        holder.kill()
        holder.wait()


# --- 2 and 6. crafted DICOM text: bounded, printable, one line, quoted by no reason --------

HOSTILE_TEXT = "\n\x1b[2J\x1b]0;owned\x07\r\x00\x9b2J"


def test_huge_dicom_values_are_bounded_and_render_quickly(tmp_path, shipped_model, pdftotext):
    """A 100,000-character StudyInstanceUID and 300 KB values took `run --out x.pdf`
    606 s; every value shown is now within its VR's length (run_pneumoscan's 300 s limit,
    not a tighter one that a loaded machine could miss, would catch that again)."""
    root, out = tmp_path / "scans", tmp_path / "out"
    root.mkdir()
    huge = "1." + "2" * 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(cr_dataset(RAMP_12_BIT, StudyInstanceUID=huge, SOPInstanceUID=huge,
                        PatientName="N" * 300_000, PatientID="I" * 150_000,
                        AccessionNumber="A" * 150_000, ViewPosition="P" + "A" * 150_000),
             root / "huge.dcm")
    run = run_pneumoscan("run", root, "--out", out / "x.pdf", "--per-study", out / "studies",
                         "--json", out / "x.json", "--model", shipped_model)
    assert run.returncode == 0, run.stderr
    [result] = json.loads((out / "x.json").read_text())["results"]
    limits = {"StudyInstanceUID": 64, "SOPInstanceUID": 64, "PatientName": 194,
              "PatientID": 64, "AccessionNumber": 16, "ViewPosition": 16}
    assert {k: len(result["metadata"][k]) <= limit for k, limit in limits.items()} == {
        k: True for k in limits}
    assert len(result["study"]) <= 64
    pdf_text = subprocess.run([pdftotext, out / "x.pdf", "-"], capture_output=True, text=True,
                              check=True).stdout
    assert "I" * 40 in pdf_text.replace("\n", "")  # the patient ID, cut to its 64 characters


def test_dicom_text_reaches_no_reason_log_terminal_or_report_raw(tmp_path, shipped_model):
    root, out = tmp_path / "scans", tmp_path / "out"
    root.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = {
            "body part.dcm": dict(BodyPartExamined="KNEE" + HOSTILE_TEXT),
            "description.dcm": dict(BodyPartExamined=None,
                                    StudyDescription="HAND" + HOSTILE_TEXT * 100),
            "view.dcm": dict(ViewPosition="LAT" + HOSTILE_TEXT),
            "modality.dcm": dict(Modality="M" + HOSTILE_TEXT),
            "classified.dcm": dict(PatientName="Pat" + HOSTILE_TEXT,
                                   StudyInstanceUID="1.2" + HOSTILE_TEXT),
        }
        for name, attributes in datasets.items():
            save(cr_dataset(RAMP_12_BIT, **attributes), root / name)
    # A file name made to move a terminal's cursor and split log lines.
    save_chest(root / "name\x1b[1A\x1b[2K\nfake.png", np.zeros((64, 64), np.uint8))
    log = tmp_path / "run.jsonl"
    run = run_pneumoscan("run", root, "--out", out / "r.html", "--json", out / "r.json",
                         "--log", log, "--model", shipped_model)
    assert run.returncode == api.EXIT_UNREADABLE, run.stderr  # the black PNG is an error
    unprintable = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
    assert not unprintable.search(run.stderr), repr(run.stderr)
    results = json.loads((out / "r.json").read_text())["results"]
    assert len(results) == 6
    for result in results:
        assert result["reason"] is None or (
            not unprintable.search(result["reason"]) and "\n" not in result["reason"]
            and len(result["reason"]) <= 500), result
        for value in result["metadata"].values():
            assert not unprintable.search(value), result
    reasons = {Path(r["path"]).name: r["reason"] for r in results}
    assert reasons["body part.dcm"] == ("body part examined is of an unlisted value, "
                                        "not the chest")
    assert reasons["description.dcm"] == ("no body part examined, and StudyDescription "
                                          "names HAND, not the chest")
    assert reasons["modality.dcm"] == ("modality of an unlisted value: not a radiograph "
                                       "(CR or DX)")
    assert reasons["view.dcm"].startswith("view position naming LAT")
    for line in log.read_text().splitlines():
        event = json.loads(line)
        assert not unprintable.search(event.get("reason") or ""), event
    html = (out / "r.html").read_text()
    assert "\x00" not in html and "\x1b" not in html and "\x9b" not in html


# --- 3. impossible pixel transforms; blank images --------------------------------------

@pytest.mark.parametrize("attributes, reason", [
    ({"RescaleSlope": "NaN"}, "RescaleSlope is nan"),
    ({"RescaleSlope": "inf"}, "RescaleSlope is inf"),
    ({"RescaleSlope": "1e308"}, "the modality LUT"),
    ({"RescaleSlope": "0"}, "RescaleSlope is 0"),
    ({"RescaleIntercept": "NaN"}, "RescaleIntercept is nan"),
    ({"RescaleIntercept": "1e308"}, "the modality LUT"),
    ({"RescaleIntercept": "-inf"}, "RescaleIntercept is -inf"),
    ({"WindowCenter": "NaN", "WindowWidth": "400"}, "WindowCenter is nan"),
    ({"WindowCenter": "1e308", "WindowWidth": "400"}, "maps every pixel to one grey level"),
    ({"WindowCenter": "-1e308", "WindowWidth": "400"}, "maps every pixel to one grey level"),
    ({"WindowCenter": "2000", "WindowWidth": "inf"}, "WindowWidth is inf"),
    ({"WindowCenter": "2000", "WindowWidth": "1e308"}, "maps every pixel to one grey level"),
    ({"WindowCenter": "2000", "WindowWidth": "0"}, "WindowWidth is 0"),
    ({"PixelData": np.full((64, 64), 1000, np.uint16).tobytes()}, "blank image"),
])
def test_impossible_pixel_transforms_are_errors_not_classified(tmp_path, attributes, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save(cr_dataset(RAMP_12_BIT, **attributes), tmp_path / "x.dcm")
    result = load_path(path, (64, 64))
    assert isinstance(result, FileResult) and result.status == "error", result
    assert reason in result.reason


@pytest.mark.parametrize("grey", [0, 128, 255])
def test_a_blank_raster_image_is_never_classified(tmp_path, grey):
    path = save_chest(tmp_path / "blank.png", np.full((300, 300), grey, np.uint8))
    result = load_path(path, (64, 64))
    assert (result.status, result.reason) == (
        "error", f"blank image: every pixel is {grey} after decoding; not classified")


# --- 4. a very deep folder ----------------------------------------------------------------

def test_a_990_deep_folder_is_walked_without_recursion(tmp_path, chest):
    root = tmp_path / "scans"
    save_chest(root / "top.png", chest)
    deepest = str(root)
    for _ in range(990):  # one by one: Path.mkdir(parents=True) itself recurses
        deepest += "/d"
        os.mkdir(deepest)
    try:
        save_chest(Path(deepest) / "bottom.png", chest)
        save_chest(root.joinpath(*["d"] * 10) / "shallow.png", chest)
        found = list(discover(root))
    finally:
        # pytest removes old temporary folders with a recursive rmtree (Python < 3.12): left
        # here, this tree would stop a later session with RecursionError before any test.
        remove_tree(root / "d")
    assert [item.path.relative_to(root) for item in found] == [
        Path(*["d"] * (MAX_DEPTH + 1)), Path(*["d"] * 10, "shallow.png"), Path("top.png")]
    too_deep = found[0]
    assert (too_deep.kind, too_deep.skip_reason) == (
        None, f"folder nested more than {MAX_DEPTH} deep, not entered")


def test_pytest_can_clean_up_after_the_deep_folder_test(tmp_path):
    """A later session's clean-up of old temporary folders, run on the folder a session of
    the test above left: it must not die (RecursionError) but remove it."""
    from _pytest.pathlib import cleanup_numbered_dir

    session = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{Path(__file__).name}::test_a_990_deep_folder_is_walked_without_recursion"],
        env={**CLI_ENV, "PYTEST_DEBUG_TEMPROOT": str(tmp_path)}, cwd=CLI_CWD,
        capture_output=True, text=True, timeout=300)
    assert session.returncode == 0, session.stdout + session.stderr
    [user_root] = tmp_path.glob("pytest-of-*")
    left = user_root / "pytest-0"  # the session's base temporary folder
    assert left.joinpath("test_a_990_deep_folder_is_walk0", "scans", "top.png").is_file()
    cleanup_numbered_dir(user_root, "pytest-", keep=0,
                         consider_lock_dead_if_created_before=time.time())
    assert not left.exists()


# --- 5. links at the state and log paths --------------------------------------------------

@pytest.mark.parametrize("link_name", ["r.pneumoscan.sqlite", "r.pneumoscan.log.jsonl",
                                       "r.pneumoscan.sqlite-wal"])
def test_a_link_at_the_state_or_log_path_is_refused(tmp_path, link_name):
    target = tmp_path / "elsewhere"
    target.write_text("not to be written")
    target.chmod(0o644)
    (tmp_path / link_name).symlink_to(target)
    scans = tmp_path / "scans"
    scans.mkdir()
    result = invoke_cli("run", scans, "--json", tmp_path / "r.json")
    assert result.exit_code == api.EXIT_FATAL
    assert "symbolic link: refused" in result.output
    assert target.read_text() == "not to be written"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not (tmp_path / "r.json").exists()


def test_an_existing_state_and_log_are_made_owner_only(tmp_path):
    state, log = tmp_path / "state.sqlite", tmp_path / "log.jsonl"
    Ledger.open(state).close()
    RunLog(log).close()
    for path in (state, log):
        path.chmod(0o644)
    Ledger.open(state).close()
    RunLog(log).close()
    assert [stat.S_IMODE(p.stat().st_mode) for p in (state, log)] == [0o600, 0o600]


# --- 7. --anonymize leaks nothing ---------------------------------------------------------

PLANTED = {"PatientName": "Zyxwvut^Qqplmn", "PatientID": "PID77731",
           "PatientBirthDate": "19841231", "AccessionNumber": "ACC98765",
           "StudyDate": "20240315", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.7731",
           "ViewPosition": "QQPLMN"}
PLANTED_SOP_UID = "1.2.826.0.1.3680043.8.498.77319"
PLANTED_NAMES = ("Zyxwvut", "Qqplmn")


def planted_identifiers() -> list[str]:
    return [*PLANTED.values(), PLANTED_SOP_UID, *PLANTED_NAMES]


def test_anonymized_run_leaks_no_planted_identifier(tmp_path, chest, shipped_model, pdftotext):
    root, out = tmp_path / "scans", tmp_path / "out"
    patient = root / "Zyxwvut Qqplmn 1984"
    patient.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = np.asarray(Image.fromarray(chest).resize((128, 128)), dtype=np.uint16) * 16
        save(cr_dataset(image, **PLANTED, SOPInstanceUID=PLANTED_SOP_UID),
             patient / "qqplmn_PID77731.dcm")
        # Skipped by its description, which names the patient.
        save(cr_dataset(RAMP_12_BIT, **PLANTED, BodyPartExamined=None,
                        StudyDescription="KNEE Zyxwvut Qqplmn"), patient / "zyxwvut knee.dcm")
    save_chest(patient / "qqplmn chest.png", chest)
    (patient / "zyxwvut broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (patient / "qqplmn.txt").write_text("notes on Zyxwvut")
    log = tmp_path / "run.jsonl"
    common = ("--anonymize", "--json", out / "r.json", "--per-study", out / "studies",
              "--state", tmp_path / "state.sqlite", "--log", log, "--model", shipped_model, "-v")
    runs = [run_pneumoscan("run", root, "--out", out / "r.pdf", *common),
            run_pneumoscan("run", root, "--out", out / "r.html", *common, "--force")]
    assert [r.returncode for r in runs] == [api.EXIT_UNREADABLE] * 2, runs[0].stderr
    results = json.loads((out / "r.json").read_text())["results"]
    assert sorted(r["status"] for r in results) == ["error", "ok", "ok", "skipped", "skipped"]

    def text_of(path: Path) -> str:
        if path.suffix == ".pdf":
            return subprocess.run([pdftotext, path, "-"], capture_output=True, text=True,
                                  check=True).stdout
        return re.sub(r"data:image/[^\"]+", "", path.read_text())  # base64 is not text

    outputs = {"stderr 1": runs[0].stderr, "stderr 2": runs[1].stderr,
               "log": log.read_text(), "file names": " ".join(os.listdir(out / "studies"))}
    for path in [out / "r.json", out / "r.pdf", out / "r.html",
                 *(out / "studies").iterdir()]:
        outputs[path.name] = text_of(path)
    assert len(outputs) == 4 + 3 + 2 * 2  # two studies: a DICOM study, a folder
    leaks = {(where, planted) for where, text in outputs.items()
             for planted in planted_identifiers() if planted.lower() in text.lower()}
    assert leaks == set()
    assert all(r["metadata"].get("PatientID", "anon-").startswith("anon-") for r in results)
    assert all(Path(r["path"]).parts[0].startswith("anon-") for r in results)


# --- 8. per-study reports of vanished studies ----------------------------------------------

def test_per_study_reports_of_vanished_studies_are_removed(tmp_path, chest, shipped_model):
    root, studies = tmp_path / "scans", tmp_path / "studies"
    for folder in ("one", "two"):
        save_chest(root / folder / "x.png", chest)
    args = ("--per-study", studies, "--model", shipped_model)
    assert run_pneumoscan("run", root, *args).returncode == 0
    (studies / "notes.txt").write_text("not ours")
    before = set(os.listdir(studies))
    for path in (root / "two").iterdir():
        path.unlink()
    (root / "two").rmdir()
    run = run_pneumoscan("run", root, *args)
    assert run.returncode == 0, run.stderr
    after = set(os.listdir(studies))
    removed = before - after
    assert len(removed) == 2 and all("two" in name for name in removed)
    assert "notes.txt" in after and any("one" in name for name in after)
    assert "removed 2 per-study report files of studies no longer found" in run.stderr


# --- 9. render workers die with the run ----------------------------------------------------

def children(pid: int) -> dict[int, str]:
    """Processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", status, re.M):
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.skipif(available_cores() < 2, reason="one core: studies render in-process")
def test_render_workers_die_when_the_run_is_killed(tmp_path, chest, shipped_model):
    root = tmp_path / "scans"
    for study in range(api.PARALLEL_STUDIES_FROM * 2):
        for image in range(2):
            save_chest(root / f"study {study:02}" / f"{image}.png", chest)
    run = subprocess.Popen(pneumoscan_command("run", root, "--per-study", tmp_path / "studies",
                                              "--model", shipped_model),
                           env=CLI_ENV, cwd=CLI_CWD, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        workers: list[int] = []
        while not workers and run.poll() is None and time.monotonic() < deadline:
            workers = [pid for pid, cmd in children(run.pid).items() if "spawn_main" in cmd]
            time.sleep(0.05)
        assert workers, "the run ended or timed out before it started render workers"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + HANG_S
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)]


# --- 10 and 12. a sick or truncated state file ---------------------------------------------

@pytest.fixture
def recorded_state(tmp_path, chest, shipped_model) -> tuple[Path, Path]:
    """A scanned folder and the state of a completed run over it."""
    root = tmp_path / "scans"
    for name in ("a.png", "b.png"):
        save_chest(root / name, chest)
    state = tmp_path / "state.sqlite"
    result = invoke_cli("run", root, "--json", tmp_path / "r.json", "--state", state,
                        "--model", shipped_model)
    assert result.exit_code == 0, result.output
    return root, state


def sql(state: Path, statement: str) -> None:
    db = sqlite3.connect(state)
    with db:
        db.execute(statement)
    db.close()


def corrupt_pages(state: Path) -> None:
    data = bytearray(state.read_bytes())
    page = 4096
    rng = np.random.default_rng(11)
    data[page:] = rng.integers(0, 256, len(data) - page, dtype=np.uint8).tobytes()
    state.write_bytes(bytes(data))


SICKNESSES = {
    "damaged pages": (corrupt_pages, "database disk image is malformed"),
    "text not UTF-8": (lambda s: sql(s, "UPDATE files SET result = CAST(x'ff00fe' AS TEXT)"),
                       "Could not decode to UTF-8"),
    "no table files": (lambda s: sql(s, "DROP TABLE files"), "it has no table files"),
    "garbage result": (lambda s: sql(s, "UPDATE files SET result = '{not json'"),
                       "is damaged: cannot read recorded results: JSONDecodeError"),
    "no pseudonym key": (lambda s: sql(s, "DELETE FROM settings WHERE name = 'pseudonym_key'"),
                         "its pseudonym key is missing"),
    "truncated to 0 bytes": (lambda s: s.write_bytes(b""), "is empty (0 bytes)"),
}


@pytest.mark.parametrize("sickness", SICKNESSES)
def test_a_sick_state_file_is_one_clear_line_and_exit_1(sickness, recorded_state, tmp_path,
                                                        shipped_model):
    root, state = recorded_state
    make_sick, message = SICKNESSES[sickness]
    make_sick(state)
    sick = state.read_bytes()
    run = run_pneumoscan("run", root, "--json", tmp_path / "r.json", "--state", state,
                         "--model", shipped_model)
    assert run.returncode == api.EXIT_FATAL
    [line] = [line for line in run.stderr.splitlines() if line.startswith("pneumoscan: error:")]
    assert message in line and "Traceback" not in run.stderr, run.stderr
    if not sick:
        assert state.read_bytes() == b""  # not silently made afresh


FILL_THE_DISK = """
import json, resource, signal, sys
from pathlib import Path
from pneumoscan import api

model, root, state = (Path(arg) for arg in sys.argv[1:4])
limit = int(sys.argv[4])
api.open_model(model, "cpu")  # its optimised graph is cached before the disk fills
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write over the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    api.run(api.RunOptions(root, json=state.with_suffix(".json"), state=state, model=model,
                           device="cpu", batch_size=4))
except api.RunError as exc:
    print(json.dumps({"exit_code": exc.exit_code, "message": str(exc)}))
"""


def test_a_full_disk_during_a_state_write_is_exit_1_and_keeps_what_was_committed(
        tmp_path, chest, shipped_model, model):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail as on a full one."""
    root = tmp_path / "scans"
    for index in range(60):
        save_chest(root / f"{index:02}.png", np.roll(chest, index, axis=1))
    state = tmp_path / "state.sqlite"
    run = subprocess.run([sys.executable, "-c", FILL_THE_DISK, str(shipped_model), str(root),
                          str(state), str(96 * 1024)], env=CLI_ENV, cwd=CLI_CWD,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    assert outcome["exit_code"] == api.EXIT_FATAL
    assert re.fullmatch(rf"state file {re.escape(str(state))}: cannot record a result: "
                        r"(disk I/O error|database or disk is full)", outcome["message"])
    with Ledger.open(state) as ledger:
        scan = api.scan(root, model, ledger=ledger, render=False)
    assert 0 < scan.from_ledger < 60 and len(scan.results) == 60


# --- 11. reports of many images ----------------------------------------------------------

def test_a_pdf_of_a_very_large_run_is_its_summary(tmp_path, pdftotext, monkeypatch):
    run = RunInfo("model", "1", "0" * 64, "CPU", "test", "now", threshold=0.5)
    results = [FileResult(Path(f"/scans/s{i // 2}/{i}.png"), f"/scans/s{i // 2}", "ok",
                          probability=0.9, label="PNEUMONIA", threshold=0.5)
               for i in range(12)]
    results.append(FileResult(Path("/scans/x.txt"), "/scans", "skipped", "not an image"))
    html_path, pdf_path = tmp_path / "r.html", tmp_path / "r.pdf"
    report.write_report(html_path, run, results)
    assert html_path.read_text() == report.render_html(run, results)  # streamed, the same
    monkeypatch.setattr(report, "PDF_MAX_IMAGES", 10)
    monkeypatch.setattr(report, "PDF_SUMMARY_ROWS", 4)
    report.write_report(pdf_path, run, results)
    text = subprocess.run([pdftotext, pdf_path, "-"], capture_output=True, text=True,
                          check=True).stdout
    assert "This PDF sums up a run of 12 classified images" in text
    assert "… and 3 more studies" in text  # 7 studies, 4 rows
    assert "0.png" not in text and "11.png" not in text  # no page per study


# --- 12. a truncated JPEG 2000 file; an output that cannot be created (issue 22) ---------

def test_a_truncated_jpeg_2000_file_is_a_clean_error():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    assert path, "pydicom's test file needs pydicom-data (the test extra)"
    result = load_path(Path(path))
    assert result.status == "error"
    assert result.reason == ("no DICOM data element could be read: the file is truncated or "
                             "not DICOM")


def test_an_output_where_no_file_can_be_created_stops_the_run_before_any_work(tmp_path):
    # /proc: permission bits (and os.access, for root) say writable; creating a file fails.
    from conftest import DICOM_SAMPLES

    result = invoke_cli("run", DICOM_SAMPLES, "--json", "/proc/pneumoscan-test/r.json",
                        "--state", tmp_path / "state.sqlite")
    assert result.exit_code == api.EXIT_FATAL
    assert "cannot write the json /proc/pneumoscan-test/r.json" in result.output
    assert "model " not in result.output  # stopped before the model was even opened
    assert list(tmp_path.iterdir()) == []  # no state, no log
