"""The library API of a whole run (`api.run`), as a program that embeds pneumoscan calls it:
the same outputs, state and run log as the command line, errors as RunError."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import signal
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


def test_run_writes_outputs_state_and_log_and_tells_its_progress(shipped_model, tmp_path):
    options = api.RunOptions(SAMPLES / "study-normal-1", json=tmp_path / "r.json",
                             model=shipped_model)
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


def test_run_errors_carry_their_exit_code_and_are_logged(shipped_model, tmp_path):
    with pytest.raises(api.RunError) as usage:
        api.run(api.RunOptions(SAMPLES))
    assert usage.value.exit_code == api.EXIT_USAGE

    missing_model = api.RunOptions(SAMPLES / "study-normal-1", json=tmp_path / "r.json",
                                   model=tmp_path / "missing.onnx")
    with pytest.raises(api.RunError, match="model file not found") as missing:
        api.run(missing_model)
    assert missing.value.exit_code == api.EXIT_FATAL
    assert not list(tmp_path.iterdir())  # a run that cannot start creates nothing

    options = dataclasses.replace(missing_model, model=shipped_model)
    with open(options.state_path, "a") as holder:  # another run holds the state
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(api.RunError) as locked:
            api.run(options)
    assert locked.value.exit_code == api.EXIT_LOCKED
    assert log_events(options.log_path) == ["locked"]

    with pytest.raises(api.RunError):  # a log that is there is told why a run failed
        api.run(missing_model)
    assert log_events(options.log_path) == ["locked", "failed"]


def test_every_output_location_is_checked_before_any_work(shipped_model, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for where, options in (
            ("report", {"report": tmp_path / "file" / "r.pdf"}),
            ("json", {"json": tmp_path / "file" / "deeper" / "r.json"}),
            ("per-study", {"json": tmp_path / "r.json", "per_study": tmp_path / "file"}),
            ("state", {"json": tmp_path / "r.json", "state": tmp_path / "file" / "s.sqlite"}),
            ("log", {"json": tmp_path / "r.json", "log": tmp_path})):
        events = Recorded()
        with pytest.raises(api.RunError, match=f"cannot write the {where} ") as failed:
            api.run(api.RunOptions(SAMPLES, model=shipped_model, **options), events)
        given = options.get(where.replace("-", "_")) or options["report"]
        assert str(given) in str(failed.value)  # the path as the user gave it
        assert events.told == [] and sorted(tmp_path.iterdir()) == [tmp_path / "file"]


def test_an_interrupted_run_is_logged_and_keeps_what_it_computed(shipped_model, tmp_path):
    class StopAfterTwo(Recorded):
        def result(self, result):
            super().result(result)
            if len(self.told) == 3:
                raise api.Interrupted(signal.SIGTERM)

    options = api.RunOptions(SAMPLES / "study-normal-1", json=tmp_path / "r.json",
                             model=shipped_model)
    with pytest.raises(api.Interrupted) as stopped:
        api.run(options, StopAfterTwo())
    assert stopped.value.exit_code == 143
    lines = [json.loads(line) for line in options.log_path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["start", "file", "file", "interrupted"]
    assert lines[-1]["signal"] == "SIGTERM" and lines[-1]["exit_code"] == 143
    assert not (tmp_path / "r.json").exists()
    assert api.run(options).scan.from_ledger == 2  # the next run goes on from there


def test_a_run_never_imports_torch_or_the_modelling_package(tmp_path):
    """`pneumoscan run` is the torch-free path (issue 9): a whole run, report included,
    in a fresh interpreter, leaves torch and pneumoscan.modelling unimported."""
    import subprocess
    import sys

    from conftest import CLI_CWD, CLI_ENV

    code = ("import sys; from pathlib import Path; from pneumoscan import api; "
            f"api.run(api.RunOptions(Path({str(SAMPLES / 'study-normal-1')!r}), "
            f"report=Path({str(tmp_path / 'r.html')!r}))); "
            "print(sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith('pneumoscan.modelling')))")
    done = subprocess.run([sys.executable, "-c", code], env=CLI_ENV, cwd=CLI_CWD,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "r.html").is_file()


def test_the_command_line_loads_no_modelling_training_or_torch_module():
    """Every `pneumoscan run` imports the CLI: its module level needs neither the modelling
    package (quantize was one), nor the training recipe, nor torch. import-linter checks
    the arrows; this checks what importing really loads."""
    import subprocess
    import sys

    from conftest import CLI_CWD, CLI_ENV

    code = ("import sys, pneumoscan.cli; print(sorted(m for m in sys.modules if m == 'torch' "
            "or m.startswith(('pneumoscan.modelling', 'training'))))")
    done = subprocess.run([sys.executable, "-c", code], env=CLI_ENV, cwd=CLI_CWD,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
