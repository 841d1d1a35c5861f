"""A whole run, as `pneumoscan run` does it: lock the state, open the model, scan, write the
outputs, and keep a JSON-lines run log of it all."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pneumoscan import __version__
from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.model import ModelError
from pneumoscan.inference.pipeline import Engine
from pneumoscan.inference.ray_engine import EngineError
from pneumoscan.records import FileResult
from pneumoscan.results.anonymize import anonymized_result, pseudonym_path
from pneumoscan.results.ledger import Ledger, StateError, StateLocked
from pneumoscan.results.runlog import RunLog
from pneumoscan.run.dicomweb import scan_dicomweb
from pneumoscan.run.events import RunEvents
from pneumoscan.run.exits import EXIT_FATAL, EXIT_LOCKED, Interrupted, RunError, exit_code
from pneumoscan.run.options import RunOptions
from pneumoscan.run.outputs import push_destination, write_outputs
from pneumoscan.run.scan import Scan, anonymize, open_engine, open_model, scan
from pneumoscan.text import one_line


@dataclass
class RunSummary:
    scan: Scan
    written: list[Path]  # the output files this run (re)wrote
    state: Path
    log: Path
    outputs: list[tuple[str, Path]]  # (what, path) of every output, written or still current
    pushed: list[str] = field(default_factory=list)  # studies whose outputs were sent
    push_failures: list[str] = field(default_factory=list)  # "study: why", one a study
    removed: list[Path] = field(default_factory=list)  # per-study reports of vanished studies
    # "study: what": outputs of SOP classes the destination does not accept (never resent)
    not_accepted: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(self.scan.results, self.push_failures + self.not_accepted)


def run(options: RunOptions, events: RunEvents | None = None) -> RunSummary:
    """What `pneumoscan run` does: lock the state, open the model, classify what is new or
    changed, write the outputs, and keep a JSON-lines run log of it all. Raises RunError
    (with its exit code) when the run cannot be done; file-level problems are results."""
    options.check()
    events = events or RunEvents()
    # A run that cannot start creates nothing: outputs are checked and the model opened
    # before the state and the log are. An existing log is told why.
    try:
        options.check_outputs()
        try:
            # On Ray the actors open the model where they run; the driver reads its metadata.
            device = "cpu" if options.engine == "ray" else options.device
            model = open_model(options.model, device, options.cam_backend, options.checkpoint)
            engine_context = open_engine(options.engine, options.ray, options.device)
        except (EngineError, ModelError) as exc:
            raise RunError(str(exc)) from None
    except RunError as exc:
        RunLog.append_if_present(options.log_path, "failed", message=str(exc),
                                 exit_code=exc.exit_code)
        raise
    events.model_opened(model)
    try:
        runlog = RunLog(options.log_path)
    except OSError as exc:
        raise RunError(f"cannot write the log {options.log_path}: "
                       f"{exc.strerror or exc}") from None
    with runlog:
        try:
            with _lock_state(options.state_path, options.wait, events) as ledger:
                try:
                    return _run_locked(options, model, engine_context, ledger, runlog, events)
                except StateError as exc:  # full disk, damaged pages: what is recorded stays
                    raise RunError(str(exc)) from None
        except RunError as exc:
            runlog.write("locked" if exc.exit_code == EXIT_LOCKED else "failed",
                         message=str(exc), exit_code=exc.exit_code)
            raise
        except (Interrupted, KeyboardInterrupt) as exc:
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            runlog.write("interrupted", signal=stopped.signal.name,
                         exit_code=stopped.exit_code)
            raise
        except Exception as exc:  # a bug: leave a trace in the log, then the traceback
            runlog.write("failed", message=one_line(exc), exit_code=EXIT_FATAL)
            raise


def _lock_state(state_path: Path, wait: bool, events: RunEvents) -> Ledger:
    try:
        try:
            return Ledger.open(state_path)
        except StateLocked as exc:
            if not wait:
                raise RunError(str(exc), EXIT_LOCKED) from None
        events.waiting(state_path)
        return Ledger.open(state_path, wait=True)
    except StateError as exc:
        raise RunError(str(exc)) from None


def _run_locked(options: RunOptions, model: CamModel,
                engine_context: AbstractContextManager[Engine], ledger: Ledger,
                runlog: RunLog, events: RunEvents) -> RunSummary:
    destination = push_destination(options)
    # With --anonymize, nothing told or logged names a patient, a path included.
    key = ledger.pseudonym_key if options.anonymize else None
    scans = str(options.scans)
    if key and not options.from_pacs:
        scans = str(pseudonym_path(key, Path(options.scans).absolute()).parent)
    runlog.write("start", scans=scans, state=str(ledger.path), pid=os.getpid(),
                 pneumoscan=__version__, force=options.force, anonymize=options.anonymize,
                 model={"name": model.info.name, "version": model.info.version,
                        "sha256": model.info.sha256})

    def on_result(result: FileResult) -> None:
        if key:
            result = anonymized_result(result, key)
        if not result.from_ledger:
            runlog.file(result)
        events.result(result)

    scanned = _scan(options, model, engine_context, ledger, on_result, events)
    events.classified()
    if options.anonymize:
        scanned = anonymize(scanned, ledger)
    done = write_outputs(options, scanned, ledger, destination, events)
    summary = RunSummary(scanned, done.written, ledger.path, runlog.path, options.outputs(),
                         done.dicom.pushed, done.dicom.failures, done.removed,
                         done.dicom.not_accepted)
    counts = scanned.counts()
    runlog.write("summary", counts=asdict(counts), from_ledger=scanned.from_ledger,
                 computed=counts.files - scanned.from_ledger, pushed=summary.pushed,
                 push_failures=summary.push_failures, not_accepted=summary.not_accepted,
                 exit_code=summary.exit_code,
                 removed_reports=len(summary.removed),
                 started=scanned.run.started, finished=scanned.run.finished)
    return summary


def _scan(options: RunOptions, model: CamModel, engine_context: AbstractContextManager[Engine],
          ledger: Ledger, on_result: Callable[[FileResult], None], events: RunEvents) -> Scan:
    """The folder or the DICOMweb server `options.scans` names, scanned."""
    common: dict[str, Any] = dict(
        batch_size=options.batch_size, workers=options.workers, threshold=options.threshold,
        render=options.renders, on_result=on_result, on_discovered=events.discovered,
        ledger=ledger, force=options.force)
    if options.from_pacs:  # on this process's engine (RunOptions.check)
        from pneumoscan.inputs.dicomweb import PacsError  # the pacs extra

        try:
            return scan_dicomweb(str(options.scans), model, since=options.since,
                                 on_listing=events.listing,
                                 max_instance_bytes=options.max_instance_bytes,
                                 max_runtime=options.max_runtime, **common)
        except PacsError as exc:
            raise RunError(str(exc)) from None
    try:
        with engine_context as engine:
            return scan(Path(options.scans), model, engine=engine, **common)
    except EngineError as exc:
        raise RunError(str(exc)) from None
