"""The library API behind the CLI: a whole run, or its parts (open a model, scan a folder,
write the outputs).

    from pneumoscan import api
    summary = api.run(api.RunOptions(Path("scans"), report=Path("report.pdf")))
    summary.exit_code, summary.written        # what `pneumoscan run scans --out report.pdf` does

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.files import remove_leftover_temporaries, write_atomic
from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.model import ModelError, available_cores, default_model_path
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, Engine, LocalEngine
from pneumoscan.inference.ray_engine import EngineError, RayEngine, RayOptions
from pneumoscan.inputs.discover import discover
from pneumoscan.records import FileResult, InputFile, RunInfo
from pneumoscan.results.anonymize import anonymized
from pneumoscan.results.ledger import Basis, Ledger, StateError, StateLocked
from pneumoscan.results.runlog import RunLog
from pneumoscan.results.summary import Counts, group_studies
from pneumoscan.text import one_line

EXIT_OK = 0  # every file classified, or skipped for a stated reason
EXIT_FATAL = 1  # the run could not be done (bad model, unwritable output, ...)
EXIT_USAGE = 2  # bad command line
EXIT_UNREADABLE = 3  # the run completed, but some files could not be read (status error)
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


@dataclass(frozen=True)
class RunOptions:
    """What `pneumoscan run` is asked to do; the defaults are the command line's."""
    scans: Path
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

    @property
    def state_path(self) -> Path:
        return self.state or default_state_path(self.json, self.report, self.per_study)

    @property
    def log_path(self) -> Path:
        return self.log or default_log_path(self.state_path)

    def check(self) -> None:
        """Raises RunError(EXIT_USAGE) for options that cannot make a run."""
        if self.report is None and self.json is None and self.per_study is None:
            raise RunError("give --out REPORT.pdf|.html, --json FILE or --per-study DIR",
                           EXIT_USAGE)
        if self.report is not None and self.report.suffix.lower() not in REPORT_SUFFIXES:
            raise RunError(f"--out must end in .pdf or .html, not {self.report.name!r}",
                           EXIT_USAGE)
        if self.engine not in ENGINES:
            raise RunError(f"unknown engine {self.engine!r}", EXIT_USAGE)
        if self.engine == "ray" and self.cam_backend != "onnx":
            raise RunError("--engine ray runs the ONNX model only (no --cam-backend torch)",
                           EXIT_USAGE)


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


@dataclass
class RunSummary:
    scan: Scan
    written: list[Path]  # the output files this run (re)wrote
    state: Path
    log: Path

    @property
    def exit_code(self) -> int:
        return self.scan.exit_code


def run(options: RunOptions, events: RunEvents | None = None) -> RunSummary:
    """What `pneumoscan run` does: lock the state, open the model, classify what is new or
    changed, write the outputs, and keep a JSON-lines run log of it all. Raises RunError
    (with its exit code) when the run cannot be done; file-level problems are results."""
    options.check()
    events = events or RunEvents()
    try:
        runlog = RunLog(options.log_path)
    except OSError as exc:
        raise RunError(f"cannot open the run log: {exc}") from None
    with runlog:
        try:
            with _lock_state(options.state_path, options.wait, events) as ledger:
                return _run_locked(options, ledger, runlog, events)
        except RunError as exc:
            runlog.write("locked" if exc.exit_code == EXIT_LOCKED else "failed",
                         message=str(exc), exit_code=exc.exit_code)
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


def _run_locked(options: RunOptions, ledger: Ledger, runlog: RunLog,
                events: RunEvents) -> RunSummary:
    try:
        engine_context = open_engine(options.engine, options.ray, options.device)
        # On Ray the actors open the model where they run; the driver reads its metadata.
        device = "cpu" if options.engine == "ray" else options.device
        model = open_model(options.model, device, options.cam_backend, options.checkpoint)
    except (EngineError, ModelError) as exc:
        raise RunError(str(exc)) from None
    events.model_opened(model)
    runlog.write("start", scans=str(options.scans), state=str(ledger.path), pid=os.getpid(),
                 pneumoscan=__version__, force=options.force, anonymize=options.anonymize,
                 model={"name": model.info.name, "version": model.info.version,
                        "sha256": model.info.sha256})

    def on_result(result: FileResult) -> None:
        events.result(result)
        if not result.from_ledger:
            runlog.file(result)

    try:
        with engine_context as engine:
            scanned = scan(options.scans, model, batch_size=options.batch_size,
                           workers=options.workers, threshold=options.threshold,
                           render=options.report is not None or options.per_study is not None,
                           on_result=on_result, on_discovered=events.discovered,
                           ledger=ledger, force=options.force, engine=engine)
    except EngineError as exc:
        raise RunError(str(exc)) from None
    events.classified()
    if options.anonymize:
        scanned = anonymize(scanned, ledger)
    written = _write_outputs(options, scanned, ledger)
    counts = scanned.counts()
    runlog.write("summary", counts=asdict(counts), from_ledger=scanned.from_ledger,
                 computed=counts.files - scanned.from_ledger, exit_code=scanned.exit_code,
                 started=scanned.run.started, finished=scanned.run.finished)
    return RunSummary(scanned, written, ledger.path, runlog.path)


def _write_outputs(options: RunOptions, scanned: Scan, ledger: Ledger) -> list[Path]:
    try:
        written = []
        if options.json:
            write_json(options.json, scanned)
            written.append(options.json)
        if options.report:
            written += write_report(options.report, scanned, ledger)
        if options.per_study:
            written += write_per_study(options.per_study, scanned, ledger)
        for path in written:  # what killed runs left; no other run writes them: we hold the lock
            remove_leftover_temporaries(path)
    except OSError as exc:
        raise RunError(f"cannot write output: {exc}") from None
    return written


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
    classify = functools.partial(engine.classify, model=model, batch_size=batch_size,
                                 workers=workers, threshold=run.threshold, render=render)
    if ledger is None:
        results = list(classify(items, on_result=on_result))
    else:
        basis = Basis(run.model_sha256, run.threshold, render)
        results = _scan_incrementally(Path(root), items, classify, ledger, basis, force,
                                      on_result)
    run.provider = engine.provider(model)
    run.finished = now_iso()
    return Scan(run, results)


def _scan_incrementally(root: Path, items: list[InputFile],
                        classify: Callable[[Iterable[InputFile]], Iterator[FileResult]],
                        ledger: Ledger, basis: Basis, force: bool,
                        on_result: Callable[[FileResult], None] | None) -> list[FileResult]:
    plans = ledger.plan(items, basis, force=force)
    # The pipeline sees only the files to compute, before any is decoded; its results come
    # back in order, and are merged with the ledger's in discovery order.
    to_compute = (plan.item for plan in plans if plan.cached is None)
    results = []
    with contextlib.closing(classify(to_compute)) as computed:
        for plan in plans:
            result = plan.cached
            if result is None:
                result = next(computed)
                ledger.record(plan, result, basis)
            if on_result:
                on_result(result)
            results.append(result)
    ledger.forget_missing(root, plans)
    return results


def anonymize(scanned: Scan, ledger: Ledger) -> Scan:
    """The scan with stable pseudonyms (keyed by the ledger's secret) in place of patient
    name, ID and birth date."""
    return replace(scanned, results=anonymized(scanned.results, ledger.pseudonym_key))


def default_state_path(json_path: Path | None, report_path: Path | None,
                       per_study: Path | None) -> Path:
    """Next to the outputs: `results.json` -> `results.pneumoscan.sqlite` (the JSON file
    first, then the report), else inside the per-study folder."""
    beside = json_path or report_path
    if beside is not None:
        return beside.with_name(f"{beside.stem}.pneumoscan.sqlite")
    return per_study / "pneumoscan.sqlite"


def default_log_path(state_path: Path) -> Path:
    return state_path.with_suffix(".log.jsonl")


def results_json(scanned: Scan) -> dict:
    return {"schema": "pneumoscan-results-2", "run": scanned.run.to_json(),
            "counts": asdict(scanned.counts()), "results": [r.to_json() for r in scanned.results]}


def write_json(path: Path, scanned: Scan) -> None:
    write_atomic(path, json.dumps(results_json(scanned), indent=1).encode())


def write_report(path: Path, scanned: Scan, ledger: Ledger | None = None) -> list[Path]:
    """The report of the whole scan, as PDF or HTML by the suffix of `path`. With a ledger,
    not rendered again when the file is there showing the same results. Returns the files
    written."""
    from pneumoscan.report import html as report

    name = ("report", os.path.abspath(path))
    fingerprint = shown_fingerprint(scanned.run, scanned.results)
    if not _due(ledger, name, fingerprint):
        return []
    written = report.write_report(path, scanned.run, scanned.results)
    return _written(ledger, name, fingerprint, [written])


# Fewer studies than this are rendered in this process: a worker process costs about a
# second to start (importing WeasyPrint), as much as rendering eight studies.
PARALLEL_STUDIES_FROM = 8


def write_per_study(directory: Path, scanned: Scan, ledger: Ledger | None = None, *,
                    processes: int | None = None) -> list[Path]:
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
    render = functools.partial(report.write_per_study, directory, scanned.run)
    processes = processes or available_cores()
    written: list[Path] = []
    with contextlib.ExitStack() as stack:
        if processes > 1 and len(due) >= PARALLEL_STUDIES_FROM:
            # spawn, not fork: this process runs ONNX Runtime's and the decoders' threads.
            pool = stack.enter_context(ProcessPoolExecutor(
                min(processes, len(due)), mp_context=multiprocessing.get_context("spawn")))
            rendered = pool.map(render, [results for _, _, results in due])
        else:
            rendered = map(render, [results for _, _, results in due])
        for (name, fingerprint, _), paths in zip(due, rendered):
            written += _written(ledger, name, fingerprint, paths)
    return written


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
