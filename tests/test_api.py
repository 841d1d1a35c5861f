"""The library API of a whole run (`api.run`), as a program that embeds pneumoscan calls it:
the same outputs, state and run log as the command line, errors as RunError."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
from conftest import SAMPLES

from pneumoscan import api


def log_events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


class Recorded(api.RunEvents):
    def __init__(self):
        self.told = []

    def discovered(self, total):
        self.told.append(("discovered", total))

    def result(self, result):
        self.told.append(("result", result.path))

    def classified(self):
        self.told.append(("classified",))


def test_run_writes_outputs_state_and_log_and_tells_its_progress(small_onnx, tmp_path):
    options = api.RunOptions(SAMPLES / "study-normal-1", json=tmp_path / "r.json",
                             model=small_onnx)
    events = Recorded()
    summary = api.run(options, events)
    assert summary.exit_code == api.EXIT_OK
    assert summary.written == [tmp_path / "r.json"]
    assert summary.state == tmp_path / "r.pneumoscan.sqlite" and summary.state.is_file()
    assert summary.log == tmp_path / "r.pneumoscan.log.jsonl"
    assert log_events(summary.log) == ["start"] + ["file"] * 4 + ["summary"]
    files = sorted((SAMPLES / "study-normal-1").iterdir())
    assert events.told == ([("discovered", 4)] + [("result", f) for f in files]
                           + [("classified",)])
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in written["results"]] == [str(f) for f in files]

    again = api.run(options)  # nothing changed: every result from the state, JSON kept
    assert again.scan.from_ledger == 4 and again.written == [tmp_path / "r.json"]
    assert log_events(summary.log)[-1] == "summary"


def test_run_errors_carry_their_exit_code_and_are_logged(small_onnx, tmp_path):
    with pytest.raises(api.RunError) as usage:
        api.run(api.RunOptions(SAMPLES))
    assert usage.value.exit_code == api.EXIT_USAGE

    options = api.RunOptions(SAMPLES / "study-normal-1", json=tmp_path / "r.json",
                             model=tmp_path / "missing.onnx")
    with pytest.raises(api.RunError, match="model file not found") as missing:
        api.run(options)
    assert missing.value.exit_code == api.EXIT_FATAL
    assert log_events(options.log_path) == ["failed"]

    with open(options.state_path, "a") as holder:  # another run holds the state
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(api.RunError) as locked:
            api.run(options)
    assert locked.value.exit_code == api.EXIT_LOCKED
    assert log_events(options.log_path) == ["failed", "locked"]
