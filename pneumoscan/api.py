"""The library API behind the CLI: a whole run, or its parts (open a model, scan a folder,
write the outputs).

    from pneumoscan import api
    summary = api.run(api.RunOptions(Path("scans"), report=Path("report.pdf")))
    summary.exit_code, summary.written        # what `pneumoscan run scans --out report.pdf` does

A PACS instead of a folder (docs/PACS.md): the new CR/DX images of a DICOMweb server are
classified and their DICOM outputs sent back:

    api.run(api.RunOptions("https://pacs.example/dicom-web", push="source", json=Path("r.json")))

The parts, for callers that want the results in memory:

    model = api.open_model()                      # the model shipped in the package
    scan = api.scan(Path("scans"), model)
    api.write_json(Path("results.json"), scan)

Over a folder that keeps growing, keep a state ledger so that each run computes only what
is new or changed (the results still cover the whole folder):

    with Ledger.open(Path("state.sqlite")) as ledger:  # locked until closed
        scan = api.scan(Path("scans"), model, ledger=ledger)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.files import remove_leftover_temporaries, write_atomic
from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.model import ModelError, available_cores, default_model_path
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, Engine, LocalEngine
from pneumoscan.inference.ray_engine import EngineError, RayEngine, RayOptions
from pneumoscan.inputs import is_dicomweb_url
from pneumoscan.inputs.discover import discover
from pneumoscan.records import FileResult, InputFile, RunInfo
from pneumoscan.report.pictures import DISPLAY_SIZE, drawn
from pneumoscan.results.anonymize import anonymized, anonymized_result, pseudonym_path
from pneumoscan.results.ledger import Basis, Ledger, Planned, StateError, StateLocked
from pneumoscan.results.runlog import RunLog
from pneumoscan.results.summary import Counts, group_studies
from pneumoscan.text import one_line
from pneumoscan.tls import TlsOptions
from pneumoscan.workers import die_with_parent

EXIT_OK = 0  # every file classified, or skipped for a stated reason
EXIT_FATAL = 1  # the run could not be done (bad model, unwritable output, ...)
EXIT_USAGE = 2  # bad command line
EXIT_UNREADABLE = 3  # the run completed, but some files could not be read (status error)
# or some studies' DICOM outputs could not be sent (RunSummary.push_failures)
EXIT_LOCKED = 4  # another run holds the state file: this run did nothing


@dataclass
class Scan:
    run: RunInfo
    results: list[FileResult]

    @property
    def exit_code(self) -> int:
        return EXIT_UNREADABLE if any(r.status == "error" for r in self.results) else EXIT_OK

    @property
    def from_ledger(self) -> int:
        """How many results were taken from the state ledger rather than computed."""
        return sum(r.from_ledger for r in self.results)

    def counts(self) -> Counts:
        return Counts.of(self.results)


REPORT_SUFFIXES = (".pdf", ".html", ".htm")
ENGINES = ("local", "ray")  # this process's threads, or a Ray cluster (ray_engine)


class RunError(Exception):
    """A run that cannot be done or go on (the message says why); `exit_code` is what the
    command line exits with."""

    def __init__(self, message: str, exit_code: int = EXIT_FATAL):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(BaseException):
    """The run was stopped by a signal (the command line raises it on SIGINT and SIGTERM).
    A BaseException, like KeyboardInterrupt, so that no handler of errors takes it for
    one; what was computed is kept in the state. Exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        self.signal = signal.Signals(signum)
        super().__init__(f"interrupted by {self.signal.name}")
        self.exit_code = 128 + self.signal.value


@dataclass(frozen=True)
class RunOptions:
    """What `pneumoscan run` is asked to do; the defaults are the command line's."""
    scans: Path | str  # a folder, or a DICOMweb base URL (http:// or https://)
    report: Path | None = None  # .pdf or .html: one report of the whole run
    json: Path | None = None
    per_study: Path | None = None  # one HTML + one PDF per study in this folder
    model: Path | None = None  # default: the model shipped in the package
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    threshold: float | None = None  # default: the model's own
    cam_backend: str = "onnx"
    checkpoint: Path | None = None  # for cam_backend "torch"
    state: Path | None = None  # default: beside the outputs (default_state_path)
    log: Path | None = None  # default: beside the state (default_log_path)
    force: bool = False  # compute every file again
    wait: bool = False  # wait for another run that holds the state, instead of EXIT_LOCKED
    anonymize: bool = False
    engine: str = "local"
    ray: RayOptions = RayOptions()  # for engine "ray"
    # DICOM outputs (pip install .[pacs]): SR, CAM Segmentation and Encapsulated PDF
    # report per study, into this folder, and/or sent to a PACS: "source" (the DICOMweb
    # server `scans` names), a DICOMweb URL, or dicom://AET@host:port (C-STORE).
    dicom_out: Path | None = None
    push: str | None = None
    # The CAM goes as a Segmentation a viewer overlays; also as a Secondary Capture
    # picture (the X-ray beside its overlay) for PACS that cannot show segmentations.
    dicom_sc: bool = False
    tls: TlsOptions | None = None  # DICOM TLS of --push dicom+tls://
    since: date | None = None  # a DICOMweb source: studies from this study date on

    @property
    def state_path(self) -> Path:
        return self.state or default_state_path(self.json, self.report, self.per_study,
                                                self.dicom_out)

    @property
    def from_pacs(self) -> bool:
        return is_dicomweb_url(self.scans)

    @property
    def dicom_outputs(self) -> bool:
        return self.dicom_out is not None or self.push is not None

    @property
    def log_path(self) -> Path:
        return self.log or default_log_path(self.state_path)

    def check(self) -> None:
        """Raises RunError(EXIT_USAGE) for options that cannot make a run."""
        if (self.report is None and self.json is None and self.per_study is None
                and not self.dicom_outputs):
            raise RunError("give --out REPORT.pdf|.html, --json FILE, --per-study DIR, "
                           "--dicom-out DIR or --push", EXIT_USAGE)
        if self.state is None and not (self.report or self.json or self.per_study
                                       or self.dicom_out):
            raise RunError("with --push alone, give --state FILE: where this run records "
                           "what it classified and sent", EXIT_USAGE)
        if self.since is not None and not self.from_pacs:
            raise RunError("--since applies to a DICOMweb source (an http(s):// URL)",
                           EXIT_USAGE)
        if self.report is not None and self.report.suffix.lower() not in REPORT_SUFFIXES:
            raise RunError(f"--out must end in .pdf or .html, not {self.report.name!r}",
                           EXIT_USAGE)
        if self.engine not in ENGINES:
            raise RunError(f"unknown engine {self.engine!r}", EXIT_USAGE)
        if self.engine == "ray" and self.cam_backend != "onnx":
            raise RunError("--engine ray runs the ONNX model only (no --cam-backend torch)",
                           EXIT_USAGE)
        if self.engine == "ray" and self.from_pacs:
            raise RunError("--engine ray reads folders that every node sees; a DICOMweb "
                           "source runs on the local engine", EXIT_USAGE)
        if self.cam_backend == "torch" and self.checkpoint is None:
            raise RunError("--cam-backend torch needs --checkpoint FILE", EXIT_USAGE)

    def outputs(self) -> list[tuple[str, Path]]:
        """(what, path) of every output the run writes, as given (or defaulted)."""
        given = [("report", self.report), ("json", self.json), ("per-study", self.per_study),
                 ("dicom-out", self.dicom_out)]
        return [(what, path) for what, path in given if path is not None] + [
            ("state", self.state_path), ("log", self.log_path)]

    def check_outputs(self) -> None:
        """Raises RunError naming the path as given when an output cannot be written
        there; creates nothing."""
        for what, path in self.outputs():
            check_writable(path, what, folder=what in ("per-study", "dicom-out"))


def check_writable(path: Path, what: str, *, folder: bool = False) -> None:
    """Raises RunError unless `path` (a file, or with `folder` a folder) can be written:
    it is of that kind if it exists, and the nearest folder that exists on its way can be
    written into."""
    if path.exists() and path.is_dir() != folder:
        raise RunError(f"cannot write the {what} {path}: it is "
                       f"{'a file, not a folder' if folder else 'a folder'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise RunError(f"cannot write the {what} {path}: permission denied")
    nearest = path if folder and path.exists() else path.parent
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise RunError(f"cannot write the {what} {path}: {nearest} is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise RunError(f"cannot write the {what} {path}: folder {nearest} is not writable")


class RunEvents:
    """What a run tells as it goes; the command line shows it, a library caller may
    override any of these."""

    def waiting(self, state_path: Path) -> None:
        """Another run holds the state file and `wait` was asked for."""

    def model_opened(self, model: CamModel) -> None:
        pass

    def discovered(self, total: int) -> None:
        pass

    def result(self, result: FileResult) -> None:
        """Each file's result, in discovery order, as soon as it is known."""

    def classified(self) -> None:
        """Every file has its result; the outputs are written next."""

    def writing(self, what: str, path: Path, parts: int) -> None:
        """Output `path` ("report" or "per-study") is being rendered, in `parts` pieces:
        the studies whose reports are due, for per-study; 1 for the report, 0 when it is
        current already."""

    def wrote_part(self) -> None:
        """One more piece of the output being written is done."""

    def dicom_outputs(self, study: str) -> None:
        """The DICOM outputs of `study` are made, to be written and/or sent, next."""


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

    @property
    def exit_code(self) -> int:
        return EXIT_UNREADABLE if self.push_failures else self.scan.exit_code


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


def _run_locked(options: RunOptions, model: CamModel, engine_context, ledger: Ledger,
                runlog: RunLog, events: RunEvents) -> RunSummary:
    destination = _push_destination(options)
    # With --anonymize, nothing told or logged names a patient, a path included.
    key = ledger.pseudonym_key if options.anonymize else None
    scans = str(options.scans)
    if key and not options.from_pacs:
        scans = str(pseudonym_path(key, options.scans.absolute()).parent)
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

    render = options.report is not None or options.per_study is not None or options.dicom_outputs
    common = dict(batch_size=options.batch_size, workers=options.workers,
                  threshold=options.threshold, render=render, on_result=on_result,
                  on_discovered=events.discovered, ledger=ledger, force=options.force)
    if options.from_pacs:
        from pneumoscan.inputs.dicomweb import PacsError

        try:
            scanned = scan_dicomweb(options.scans, model, since=options.since, **common)
        except PacsError as exc:
            raise RunError(str(exc)) from None
    else:
        try:
            with engine_context as engine:
                scanned = scan(options.scans, model, engine=engine, **common)
        except EngineError as exc:
            raise RunError(str(exc)) from None
    events.classified()
    if options.anonymize:
        scanned = anonymize(scanned, ledger)
    written, sent, removed = _write_outputs(options, scanned, ledger, destination, events)
    counts = scanned.counts()
    summary = RunSummary(scanned, written, ledger.path, runlog.path, options.outputs(),
                         sent.pushed, sent.failures, removed)
    runlog.write("summary", counts=asdict(counts), from_ledger=scanned.from_ledger,
                 computed=counts.files - scanned.from_ledger, pushed=sent.pushed,
                 push_failures=sent.failures, exit_code=summary.exit_code,
                 removed_reports=len(removed),
                 started=scanned.run.started, finished=scanned.run.finished)
    return summary


def _push_destination(options: RunOptions):
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
class DicomOutputs:
    written: list[Path] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)  # study keys
    failures: list[str] = field(default_factory=list)  # "study <key>: why"


def write_dicom_outputs(scanned: Scan, ledger: Ledger | None = None,
                        directory: Path | None = None, destination=None, *,
                        capture: bool = False,
                        on_study: Callable[[str], None] | None = None) -> DicomOutputs:
    """The DICOM outputs of each study with a classified DICOM image (dicomout.writer),
    written under `directory` and/or sent to `destination` (dicomout.push). With a ledger,
    a study's outputs are made again only when its results changed, and sent again only
    until the destination took them all; a study that could not be sent is a failure
    (its reason), and the next run sends it again. `capture`: the CAM as a Secondary
    Capture too. `on_study(key)` is called before each study's outputs are made."""
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
        outputs = study_outputs(scanned.run, study, capture)
        if to_folder:
            done.written += _written(ledger, ("dicom", os.path.abspath(directory), study.key),
                                     fingerprint, write_study_outputs(directory, study, outputs))
        if to_push and outputs:
            try:
                destination.store(outputs)
            except PushError as exc:
                done.failures.append(f"study {study.key}: {exc}")
                continue
            done.pushed.append(study.key)
        if to_push:
            _written(ledger, ("push", destination.name, study.key), fingerprint, [])
    return done


def _write_outputs(options: RunOptions, scanned: Scan, ledger: Ledger, destination,
                   events: RunEvents) -> tuple[list[Path], DicomOutputs, list[Path]]:
    """The files written, the DICOM outputs made and sent, and the per-study reports
    removed (of studies now gone)."""
    sent = DicomOutputs()
    written, removed = [], []
    if options.json:
        with _naming_errors("json", options.json):
            write_json(options.json, scanned)
            written.append(options.json)
    if options.report:
        with _naming_errors("report", options.report):
            written += write_report(options.report, scanned, ledger, events=events)
    if options.per_study:
        with _naming_errors("per-study", options.per_study):
            written += write_per_study(options.per_study, scanned, ledger, events=events)
            removed = remove_stale_per_study(options.per_study, scanned, ledger)
    if options.dicom_outputs:
        with _naming_errors("dicom-out", options.dicom_out):
            sent = write_dicom_outputs(scanned, ledger, options.dicom_out, destination,
                                       capture=options.dicom_sc,
                                       on_study=events.dicom_outputs)
        written += sent.written
    for path in written:  # what killed runs left; no other run writes them: we hold the lock
        remove_leftover_temporaries(path)
    return written, sent, removed


@contextlib.contextmanager
def _naming_errors(what: str, path: Path):
    """Errors writing output `path` as RunError naming it as given (not a temporary name)."""
    try:
        yield
    except OSError as exc:
        raise RunError(f"cannot write the {what} {path}: {exc.strerror or exc}") from None


def open_model(model_path: Path | None = None, device: str = "auto", cam_backend: str = "onnx",
               checkpoint: Path | None = None, threads: int | None = None) -> CamModel:
    """The ONNX model (default: the one shipped in the package), or with
    cam_backend="torch" the PyTorch checkpoint with forward-hook CAMs."""
    if cam_backend == "torch":
        if checkpoint is None:
            raise ModelError("--cam-backend torch needs --checkpoint FILE")
        from pneumoscan.modelling.torch_cam import TorchHookCamModel

        return TorchHookCamModel(checkpoint, device=device)
    if cam_backend != "onnx":
        raise ModelError(f"unknown CAM backend {cam_backend!r}")
    from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

    path = model_path or default_model_path()
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    return OnnxCamModel(Path(path), device=device, threads=threads)


def open_engine(name: str, ray: RayOptions = RayOptions(), device: str = "auto"):
    """The engine `name` (ENGINES), as a context manager that holds what it runs on. Raises
    EngineError when it cannot run here (Ray not installed)."""
    if name == "ray":
        return RayEngine(ray, device)
    return contextlib.nullcontext(LocalEngine())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_info(model: CamModel, threshold: float | None) -> RunInfo:
    info = model.info
    return RunInfo(model_name=info.name, model_version=info.version, model_sha256=info.sha256,
                   provider=model.provider, pneumoscan_version=__version__, started=now_iso(),
                   threshold=info.threshold if threshold is None else threshold)


def scan(root: Path, model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE,
         workers: int | None = None, threshold: float | None = None, render: bool = True,
         on_result: Callable[[FileResult], None] | None = None,
         on_discovered: Callable[[int], None] | None = None,
         ledger: Ledger | None = None, force: bool = False,
         engine: Engine | None = None) -> Scan:
    """Classify every file under `root`; one result per file found. With a `ledger`, only
    files that are new or changed (or all, with `force`) are decoded and classified; the
    others' results come from the ledger, and the ledger learns the new ones. `engine`
    runs the stages (default: this process, LocalEngine; a RayEngine must be open)."""
    if not Path(root).exists():
        raise FileNotFoundError(f"no such file or folder: {root}")
    run = run_info(model, threshold)
    items = list(discover(Path(root)))
    if on_discovered:
        on_discovered(len(items))
    engine = engine or LocalEngine()
    classify = classifier(engine, model, batch_size=batch_size, workers=workers,
                          threshold=run.threshold, render=render)
    if ledger is None:
        results = list(classify(items, on_result=on_result))
    else:
        basis = Basis(run.model_sha256, run.threshold, render)
        results = _scan_incrementally(Path(root), items, classify, ledger, basis, force,
                                      on_result)
    run.provider = engine.provider(model)
    run.finished = now_iso()
    return Scan(run, results)


def classifier(engine: Engine, model: CamModel, *, render: bool, workers: int | None,
               **options) -> Callable[..., Iterator[FileResult]]:
    """classify(items, on_result=None): one result per item, in order, from `engine`;
    with `render`, each classified one with its report picture, drawn in this process as
    the results come (report.pictures.drawn: the engines draw nothing)."""

    def classify(items: Iterable[InputFile], on_result: Callable[[FileResult], None] | None
                 = None) -> Iterator[FileResult]:
        results = engine.classify(items, model, workers=workers, on_result=on_result,
                                  view_size=DISPLAY_SIZE if render else None, **options)
        return drawn(results, workers or available_cores()) if render else results

    return classify


def _scan_incrementally(root: Path, items: list[InputFile],
                        classify: Callable[[Iterable[InputFile]], Iterator[FileResult]],
                        ledger: Ledger, basis: Basis, force: bool,
                        on_result: Callable[[FileResult], None] | None) -> list[FileResult]:
    plans = ledger.plan(items, basis, force=force)
    results = _merge_with_ledger(plans, classify, ledger, basis, on_result)
    ledger.forget_missing(root, plans)
    return results


def _merge_with_ledger(plans: list[Planned],
                       classify: Callable[[Iterable[InputFile]], Iterator[FileResult]],
                       ledger: Ledger | None, basis: Basis,
                       on_result: Callable[[FileResult], None] | None,
                       fetch: Callable[[Planned], InputFile] | None = None) -> list[FileResult]:
    """The results of `plans` in order: the ledger's, or computed (and then recorded). The
    pipeline sees only the files to compute, before any is decoded; `fetch` makes a
    planned item readable (a PACS instance: retrieves it) just before the pipeline reads
    it, a few batches ahead of the model."""
    to_compute = (fetch(plan) if fetch else plan.item for plan in plans if plan.cached is None)
    results = []
    with contextlib.closing(classify(to_compute)) as computed:
        for plan in plans:
            result = plan.cached
            if result is None:
                result = next(computed)
                result.path = plan.item.path  # a PACS instance's, not its cached copy's
                if ledger is not None and ledger.record(plan, result, basis) and result.picture:
                    # Read back when a report shows it: memory stays flat however many.
                    result.picture = ledger.stored_picture(plan.key)
            if on_result:
                on_result(result)
            results.append(result)
    return results


def scan_dicomweb(url: str, model: CamModel, *, since: date | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                  threshold: float | None = None, render: bool = True,
                  on_result: Callable[[FileResult], None] | None = None,
                  on_discovered: Callable[[int], None] | None = None,
                  ledger: Ledger | None = None, force: bool = False) -> Scan:
    """`scan` of the CR and DX studies on a DICOMweb server (from study date `since` on):
    one result per instance, each result's path <Study UID>/<SOP Instance UID>. With a
    `ledger`, only instances it has not seen (by SOP Instance UID) are retrieved, into a
    temporary cache, each deleted once classified. A study that cannot be listed, or an
    instance that cannot be retrieved, is an error result that the ledger does not keep:
    the next run tries it again. Raises PacsError when the server cannot be queried."""
    from pneumoscan.inputs.dicomweb import DicomWebSource, PacsError

    run = run_info(model, threshold)
    source = DicomWebSource(url)
    instances, results_by_study = [], {}
    for study_uid in source.studies(since):
        try:
            instances += source.instances(study_uid)
        except PacsError as exc:
            results_by_study[study_uid] = FileResult(Path(study_uid), study_uid, "error",
                                                     str(exc))
    if on_discovered:
        on_discovered(len(instances) + len(results_by_study))
    basis = Basis(run.model_sha256, run.threshold, render)
    items = [InputFile(instance.display_path, "dicom") for instance in instances]
    if ledger is None:
        plans = [Planned(item) for item in items]
    else:
        plans = ledger.plan_remote(items, [i.sop_uid for i in instances], basis, force=force)
    by_path = {item.path: instance for item, instance in zip(items, instances)}
    classify = classifier(LocalEngine(), model, batch_size=batch_size, workers=workers,
                          threshold=run.threshold, render=render)
    with tempfile.TemporaryDirectory(prefix="pneumoscan-dicomweb-") as cache:

        def fetch(plan: Planned) -> InputFile:
            try:
                return InputFile(source.retrieve(by_path[plan.item.path], Path(cache)), "dicom")
            except PacsError as exc:
                plan.key = None  # not kept: retrieved again next run
                return InputFile(plan.item.path, None, str(exc), unreadable=True)

        def on_instance(result: FileResult) -> None:
            (Path(cache) / f"{result.path.name}.dcm").unlink(missing_ok=True)
            if on_result:
                on_result(result)

        results = _merge_with_ledger(plans, classify, ledger, basis, on_instance, fetch)
    for failure in results_by_study.values():
        if on_result:
            on_result(failure)
        results.append(failure)
    run.finished = now_iso()
    return Scan(run, results)


def anonymize(scanned: Scan, ledger: Ledger) -> Scan:
    """The scan with stable pseudonyms (keyed by the ledger's secret) in place of patient
    identity, paths and study labels (`results.anonymize` says what is kept)."""
    return replace(scanned, results=anonymized(scanned.results, ledger.pseudonym_key))


def default_state_path(json_path: Path | None, report_path: Path | None,
                       per_study: Path | None, dicom_out: Path | None = None) -> Path:
    """Next to the outputs: `results.json` -> `results.pneumoscan.sqlite` (the JSON file
    first, then the report), else inside the per-study or DICOM output folder."""
    beside = json_path or report_path
    if beside is not None:
        return beside.with_name(f"{beside.stem}.pneumoscan.sqlite")
    return (per_study or dicom_out) / "pneumoscan.sqlite"


def default_log_path(state_path: Path) -> Path:
    return state_path.with_suffix(".log.jsonl")


def results_json(scanned: Scan) -> dict:
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
    (default: one per core) when there are enough of them. Returns the files written."""
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
