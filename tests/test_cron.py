"""`pneumoscan run` as cron runs it, in subprocesses: killed with SIGKILL part-way and run
again, and runs overlapping on one state file. Inputs: a few hundred real chest X-rays."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI_CWD, CLI_ENV, copies_of_kermany224, pneumoscan_command, run_pneumoscan

from pneumoscan.api import EXIT_LOCKED, EXIT_OK
from pneumoscan.results.ledger import Ledger

STUDIES, PER_STUDY = 6, 50


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """300 real images in 6 study folders, NORMAL and PNEUMONIA alike."""
    root = tmp_path_factory.mktemp("cron") / "scans"
    copies_of_kermany224(root, STUDIES * PER_STUDY, STUDIES)
    return root


def start_run(*args) -> subprocess.Popen:
    return subprocess.Popen(pneumoscan_command("run", *args), env=CLI_ENV, cwd=CLI_CWD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recorded_count(state: Path) -> int:
    """Rows in the ledger, read beside the run that writes it (0 until it exists)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(condition, *runs: subprocess.Popen) -> None:
    """Until `condition` holds, however long a loaded machine takes (the suite's timeout
    bounds it), as long as one of `runs` is still running."""
    while not condition():
        assert any(run.poll() is None for run in runs), \
            f"the runs ended first: {[run.communicate() for run in runs]}"
        time.sleep(0.02)


def started_pid(log: Path) -> int | None:
    """The process id in the run log's (whole) start record: the run that holds the state."""
    lines = log.read_text().splitlines(keepends=True) if log.exists() else []
    return next((json.loads(line)["pid"] for line in lines
                 if line.endswith("\n") and '"event": "start"' in line), None)


def wait_for_line(run: subprocess.Popen, text: str) -> None:
    """Read the run's stderr until a line containing `text`."""
    for line in run.stderr:
        if text in line:
            return
    pytest.fail(f"the run ended without saying {text!r}: {run.communicate()}")


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def results_by_path(json_path: Path) -> dict[str, dict]:
    results = json.loads(json_path.read_text())["results"]
    paths = [r["path"] for r in results]
    assert len(paths) == len(set(paths)), "a file appears twice"
    return {r["path"]: r for r in results}


def report_images(report: Path) -> list[str]:
    """The X-ray and CAM pictures of an HTML report, as data URIs, sorted."""
    html = report.read_text()
    assert html.rstrip().endswith("</html>")
    return sorted(re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)"', html))


@pytest.mark.slow
def test_killed_run_then_rerun_accounts_for_every_file_once(scans, shipped_model, tmp_path):
    total = STUDIES * PER_STUDY
    reference = tmp_path / "reference" / "results.json"
    done = run_pneumoscan("run", scans, "--json", reference, "--out",
                          reference.with_name("report.html"), "--model", shipped_model)
    assert done.returncode == EXIT_OK, done.stderr

    out = tmp_path / "out" / "results.json"
    report = out.with_name("report.html")
    state = out.with_name("results.pneumoscan.sqlite")  # the default places
    log = out.with_name("results.pneumoscan.log.jsonl")
    args = [scans, "--json", out, "--out", report, "--model", shipped_model]
    killed = start_run(*args)
    wait_for(lambda: recorded_count(state) >= total // 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    recorded_when_killed = recorded_count(state)
    assert killed.returncode == -signal.SIGKILL and recorded_when_killed < total
    assert not out.exists() and not report.exists()
    # What a run killed while writing its JSON leaves: the next run removes it.
    (out.parent / f".{out.name}.k1ll3d.tmp").write_text('{"results": [')

    again = run_pneumoscan("run", *args)
    assert again.returncode == EXIT_OK, again.stderr
    expected, got = results_by_path(reference), results_by_path(out)
    assert len(got) == total and got == expected
    # The report shows the same pictures, those of the killed run's files from the ledger.
    assert report_images(report) == report_images(reference.with_name("report.html"))
    assert len(report_images(report)) == total
    assert recorded_count(state) == total
    # No temporary file left over: only the outputs, the log and the state (with SQLite's
    # own companion files).
    assert {p.name for p in out.parent.iterdir()
            if not p.name.startswith(state.name)} == {out.name, report.name, log.name}
    # The re-run computed only what the killed run had not recorded.
    summary = log_events(log)[-1]
    assert summary["event"] == "summary"
    assert summary["from_ledger"] >= recorded_when_killed
    assert summary["computed"] == total - summary["from_ledger"]


def test_a_run_finds_the_state_locked_and_exits_or_waits(scans, shipped_model, tmp_path):
    few = tmp_path / "scans"
    shutil.copytree(scans / "study-0", few / "study-0")
    out, state = tmp_path / "results.json", tmp_path / "state.sqlite"
    log = tmp_path / "log.jsonl"
    args = [few, "--json", out, "--state", state, "--log", log, "--model", shipped_model]
    Ledger.open(state).close()
    with open(state, "a") as holder:  # stands for a run in progress
        fcntl.flock(holder, fcntl.LOCK_EX)
        locked = run_pneumoscan("run", *args)
        assert locked.returncode == EXIT_LOCKED
        assert "in use by another pneumoscan run" in locked.stderr
        # The model is opened before the state is locked (a run that cannot start creates
        # no state); the locked run then gives up having written nothing.
        assert not out.exists()
        assert [e["event"] for e in log_events(log)] == ["locked"]

        waiting = start_run(*args, "--wait")
        wait_for_line(waiting, "waiting for the run that holds")
        assert waiting.poll() is None and not out.exists()
    _, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == EXIT_OK, stderr
    assert len(results_by_path(out)) == PER_STUDY


def test_two_concurrent_runs_never_both_process(scans, shipped_model, tmp_path):
    log = tmp_path / "log.jsonl"
    args = [scans, "--json", tmp_path / "results.json", "--log", log, "--model", shipped_model]
    first, second = start_run(*args), start_run(*args)
    wait_for(lambda: started_pid(log) is not None, first, second)
    # The run that has the lock is held still until the others have met it (on a loaded
    # machine it could otherwise finish before the other one even starts).
    holder = started_pid(log)
    [other] = [run for run in (first, second) if run.pid != holder]
    os.kill(holder, signal.SIGSTOP)
    try:
        other.communicate(timeout=300)
        late = start_run(*args, "--wait")  # queues behind it
        wait_for_line(late, "waiting for the run that holds")
    finally:
        os.kill(holder, signal.SIGCONT)
    for run in (first, second, late):
        run.communicate(timeout=300)
    assert sorted([first.returncode, second.returncode]) == [EXIT_OK, EXIT_LOCKED]
    assert late.returncode == EXIT_OK

    events = log_events(log)
    computing = {e["run"] for e in events if e["event"] == "file"}
    assert len(computing) == 1  # one run computed; no other run computed anything
    assert sum(e["event"] == "file" for e in events) == STUDIES * PER_STUDY
    computed = sorted(e["computed"] for e in events if e["event"] == "summary")
    assert computed == [0, STUDIES * PER_STUDY]
    assert [e["event"] for e in events].count("locked") == 1
