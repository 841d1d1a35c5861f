"""The outputs of a scan: the JSON, the whole-run report, the per-study reports and the
DICOM outputs (written to a folder and/or sent to a PACS). With a state ledger, an output
is rendered again only when what it shows changed, and sent again only until the
destination took it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoscan.files import remove_leftover_temporaries, write_atomic
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.results.ledger import Ledger
from pneumoscan.results.summary import Study, group_studies
from pneumoscan.run.events import RunEvents
from pneumoscan.run.exits import EXIT_USAGE, RunError
from pneumoscan.run.options import RunOptions
from pneumoscan.run.scan import Scan
from pneumoscan.workers import available_cores, die_with_parent

if TYPE_CHECKING:
    from pneumoscan.dicomout.push import CStoreDestination, StowDestination

    Destination = StowDestination | CStoreDestination


def results_json(scanned: Scan) -> dict[str, Any]:
    return {"schema": "pneumoscan-results-2", "run": scanned.run.to_json(),
            "counts": asdict(scanned.counts()), "results": [r.to_json() for r in scanned.results]}


def write_json(path: Path, scanned: Scan) -> None:
    write_atomic(path, json.dumps(results_json(scanned), indent=1).encode())


def write_report(path: Path, scanned: Scan, ledger: Ledger | None = None, *,
                 events: RunEvents | None = None) -> list[Path]:
    """The report of the whole scan, as PDF or HTML by the suffix of `path`. With a ledger,
    not rendered again when the file is there showing the same results. Returns the files
    written."""
    from pneumoscan.report import html as report

    name = ("report", os.path.abspath(path))
    fingerprint = shown_fingerprint(scanned.run, scanned.results)
    due = _due(ledger, name, fingerprint)
    events = events or RunEvents()
    events.writing("report", path, int(due))
    if not due:
        return []
    written = report.write_report(path, scanned.run, scanned.results)
    events.wrote_part()
    return _written(ledger, name, fingerprint, [written])


# Fewer studies than this are rendered in this process: a worker process costs about a
# second to start (importing WeasyPrint), as much as rendering eight studies.
PARALLEL_STUDIES_FROM = 8


def write_per_study(directory: Path, scanned: Scan, ledger: Ledger | None = None, *,
                    processes: int | None = None,
                    events: RunEvents | None = None) -> list[Path]:
    """One HTML and one PDF report per study in `directory`. With a ledger, only the studies
    whose results changed since their reports were written are rendered again. Studies
    are independent documents, so they are rendered in `processes` worker processes
    (default: one per usable core) when there are enough of them. Returns the files
    written."""
    from pneumoscan.report import html as report

    due = []
    for study in group_studies(scanned.results):
        name = ("per-study", os.path.abspath(directory), study.key)
        fingerprint = shown_fingerprint(scanned.run, study.files)
        if _due(ledger, name, fingerprint):
            due.append((name, fingerprint, study.files))
    events = events or RunEvents()
    events.writing("per-study", directory, len(due))
    render = functools.partial(report.write_per_study, directory, scanned.run)
    processes = processes or available_cores()
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        rendered: Iterator[list[Path]]
        if processes > 1 and len(due) >= PARALLEL_STUDIES_FROM:
            # spawn, not fork: this process runs ONNX Runtime's and the decoders' threads.
            # Workers die with this process, even when it is killed with SIGKILL.
            pool = stack.enter_context(ProcessPoolExecutor(
                min(processes, len(due)), mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with_parent, initargs=(os.getpid(),)))
            rendered = pool.map(render, [results for _, _, results in due])
        else:
            rendered = map(render, [results for _, _, results in due])
        for (name, fingerprint, _), paths in zip(due, rendered):
            written += _written(ledger, name, fingerprint, paths)
            events.wrote_part()
    return written


def remove_stale_per_study(directory: Path, scan_: Scan, ledger: Ledger | None = None
                           ) -> list[Path]:
    """Remove the per-study reports in `directory` of studies that are not in the scan
    (their files were deleted or moved, or their label changed, as with --anonymize), so
    the folder matches the scanned one: the reports the ledger recorded for such studies,
    and any other file named as pneumoscan names per-study reports. Returns the files
    removed."""
    from pneumoscan.report import html as report

    directory = Path(directory)
    keys = {study.key for study in group_studies(scan_.results)}
    current = {directory / name for key in keys for name in report.per_study_names(key)}
    stale: set[Path] = set()
    if ledger is not None:
        for name, files in ledger.outputs(("per-study", os.path.abspath(directory))).items():
            if name[2] not in keys:
                stale.update(files)
                ledger.forget_output(name)
    if directory.is_dir():
        stale.update(p for p in directory.iterdir() if report.is_per_study_name(p.name))
    removed = []
    for path in sorted(stale - current):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


@dataclass
class DicomOutputs:
    written: list[Path] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)  # study keys
    failures: list[str] = field(default_factory=list)  # "study <key>: why"
    not_accepted: list[str] = field(default_factory=list)  # "study <key>: what"


StudyPdf = Callable[[RunInfo, Study], bytes]


def write_dicom_outputs(scanned: Scan, ledger: Ledger | None = None,
                        directory: Path | None = None, destination: Destination | None = None,
                        *, capture: bool = False,
                        on_study: Callable[[str], None] | None = None,
                        study_pdf: StudyPdf | None = None) -> DicomOutputs:
    """The DICOM outputs of each study with a classified DICOM image (dicomout.writer),
    written under `directory` and/or sent to `destination` (dicomout.push). With a ledger,
    a study's outputs are made again only when its results changed, and sent again only
    until the destination took them all; a study that could not be sent is a failure
    (its reason), and the next run sends it again; outputs of a SOP class the destination
    does not accept are listed in `not_accepted` and not sent again. `capture`: the CAM as
    a Secondary Capture too. `on_study(key)` is called before each study's outputs are made;
    `study_pdf` gives a study's PDF report (default: rendered)."""
    from pneumoscan.dicomout.push import PushError
    from pneumoscan.dicomout.writer import study_outputs, write_study_outputs

    done = DicomOutputs()
    for study in group_studies(scanned.results):
        fingerprint = shown_fingerprint(scanned.run, study.files) + ("+sc" if capture else "")
        to_folder = directory is not None and _due(
            ledger, ("dicom", os.path.abspath(directory), study.key), fingerprint)
        to_push = destination is not None and _due(
            ledger, ("push", destination.name, study.key), fingerprint)
        if not (to_folder or to_push):
            continue
        if on_study:
            on_study(study.key)
        outputs = study_outputs(scanned.run, study, capture, study_pdf)
        if directory is not None and to_folder:
            done.written += _written(ledger, ("dicom", os.path.abspath(directory), study.key),
                                     fingerprint, write_study_outputs(directory, study, outputs))
        if destination is not None and to_push:
            if outputs:
                try:
                    refused = destination.store(outputs)
                except PushError as exc:
                    done.failures.append(f"study {study.key}: {exc}")
                    continue
                done.not_accepted += [f"study {study.key}: {what}" for what in refused]
                if len(refused) < len({ds.SOPClassUID for ds in outputs}):
                    done.pushed.append(study.key)
            _written(ledger, ("push", destination.name, study.key), fingerprint, [])
    return done


def push_destination(options: RunOptions) -> Destination | None:
    """Where `--push` sends (None without it); RunError when it cannot be done."""
    if options.dicom_outputs:
        try:
            import highdicom  # noqa: F401  (the pacs extra is there)
        except ImportError:
            raise RunError("DICOM outputs need the pacs extra: pip install 'pneumoscan[pacs]'"
                           ) from None
    if options.push is None:
        return None
    from pneumoscan.dicomout.push import PushError, destination

    try:
        return destination(options.push, options.scans, options.tls)
    except PushError as exc:
        raise RunError(str(exc), EXIT_USAGE) from None


@dataclass
class WrittenOutputs:
    written: list[Path]  # the files (re)written
    dicom: DicomOutputs  # the DICOM outputs made, sent, and not sent
    removed: list[Path]  # the per-study reports of studies now gone


def write_outputs(options: RunOptions, scanned: Scan, ledger: Ledger,
                  destination: Destination | None, events: RunEvents) -> WrittenOutputs:
    """Every output `options` asks for, the JSON first. With --per-study and DICOM outputs
    together, a study's PDF rendered for its per-study report is the one its Encapsulated
    PDF carries: rendered once."""
    done = WrittenOutputs([], DicomOutputs(), [])
    if options.json:
        with _naming_errors("json", options.json):
            write_json(options.json, scanned)
            done.written.append(options.json)
    if options.report:
        with _naming_errors("report", options.report):
            done.written += write_report(options.report, scanned, ledger, events=events)
    per_study: list[Path] = []
    if options.per_study:
        with _naming_errors("per-study", options.per_study):
            per_study = write_per_study(options.per_study, scanned, ledger, events=events)
            done.removed = remove_stale_per_study(options.per_study, scanned, ledger)
        done.written += per_study
    if options.dicom_outputs:
        with _naming_errors("dicom-out", options.dicom_out):
            done.dicom = write_dicom_outputs(scanned, ledger, options.dicom_out, destination,
                                             capture=options.dicom_sc,
                                             on_study=events.dicom_outputs,
                                             study_pdf=_rendered_pdfs(options, per_study))
        done.written += done.dicom.written
    for path in done.written:  # what killed runs left; no other run writes them: we hold the lock
        remove_leftover_temporaries(path)
    return done


def _rendered_pdfs(options: RunOptions, written: Sequence[Path]) -> StudyPdf:
    """A study's PDF: the per-study report this run wrote of it, read back, else rendered."""
    from pneumoscan.report.html import per_study_names, study_pdf

    written_now = set(written)

    def pdf(run: RunInfo, study: Study) -> bytes:
        if options.per_study is not None:
            path = options.per_study / per_study_names(study.key)[1]
            if path in written_now:
                return path.read_bytes()
        return study_pdf(run, study)

    return pdf


@contextlib.contextmanager
def _naming_errors(what: str, path: Path | None) -> Iterator[None]:
    """Errors writing output `path` as RunError naming it as given (not a temporary name)."""
    try:
        yield
    except OSError as exc:
        raise RunError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None


def _due(ledger: Ledger | None, name: tuple[str, ...], fingerprint: str) -> bool:
    """Whether output `name` must be rendered: its files do not show `fingerprint` yet.
    A due output is forgotten by the ledger until all its files are written, so a run
    killed in between renders it again."""
    if ledger is None:
        return True
    if ledger.output_is_current(name, fingerprint):
        return False
    ledger.forget_output(name)
    return True


def _written(ledger: Ledger | None, name: tuple[str, ...], fingerprint: str,
             paths: list[Path]) -> list[Path]:
    if ledger is not None:
        ledger.output_written(name, fingerprint, paths)
    return paths


def shown_fingerprint(run: RunInfo, results: Sequence[FileResult]) -> str:
    """Changes when anything a report shows of these results changes (timestamps aside)."""
    shown = {"model": run.model_sha256, "pneumoscan": run.pneumoscan_version,
             "results": [r.to_json() for r in results]}
    return hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()
