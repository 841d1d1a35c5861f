"""The library API behind the CLI: open a model, scan a folder, write the outputs.

    from pneumoscan import api
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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pneumoscan import __version__
from pneumoscan.results.anonymize import anonymized
from pneumoscan.inference.cam import CamModel
from pneumoscan.inputs.discover import discover
from pneumoscan.files import write_atomic
from pneumoscan.results.ledger import Basis, Ledger
from pneumoscan.inference.model import ModelError, available_cores, default_model_path
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, classify
from pneumoscan.records import FileResult, InputFile, RunInfo
from pneumoscan.results.summary import Counts, group_studies

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


def open_model(model_path: Path | None = None, device: str = "auto", cam_backend: str = "onnx",
               checkpoint: Path | None = None, threads: int | None = None) -> CamModel:
    """The ONNX model (default: the one shipped in the package), or with
    cam_backend="torch" the PyTorch checkpoint with forward-hook CAMs."""
    if cam_backend == "torch":
        if checkpoint is None:
            raise ModelError("--cam-backend torch needs --checkpoint FILE")
        from pneumoscan.modelling.torch_cam import TorchHookCamModel

        return TorchHookCamModel(checkpoint, device="cpu" if device == "cpu" else "auto")
    if cam_backend != "onnx":
        raise ModelError(f"unknown CAM backend {cam_backend!r}")
    from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

    path = model_path or default_model_path()
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    return OnnxCamModel(Path(path), device=device, threads=threads)


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
         ledger: Ledger | None = None, force: bool = False) -> Scan:
    """Classify every file under `root`; one result per file found. With a `ledger`, only
    files that are new or changed (or all, with `force`) are decoded and classified; the
    others' results come from the ledger, and the ledger learns the new ones."""
    if not Path(root).exists():
        raise FileNotFoundError(f"no such file or folder: {root}")
    run = run_info(model, threshold)
    items = list(discover(Path(root)))
    if on_discovered:
        on_discovered(len(items))
    options = dict(batch_size=batch_size, workers=workers, threshold=run.threshold,
                   render=render)
    if ledger is None:
        results = list(classify(items, model, on_result=on_result, **options))
    else:
        basis = Basis(run.model_sha256, run.threshold, render)
        results = _scan_incrementally(Path(root), items, model, ledger, basis, force,
                                      on_result, options)
    run.finished = now_iso()
    return Scan(run, results)


def _scan_incrementally(root: Path, items: list[InputFile], model: CamModel, ledger: Ledger,
                        basis: Basis, force: bool,
                        on_result: Callable[[FileResult], None] | None,
                        options: dict) -> list[FileResult]:
    plans = ledger.plan(items, basis, force=force)
    # The pipeline sees only the files to compute, before any is decoded; its results come
    # back in order, and are merged with the ledger's in discovery order.
    to_compute = (plan.item for plan in plans if plan.cached is None)
    results = []
    with contextlib.closing(classify(to_compute, model, **options)) as computed:
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


def anonymize(scan_: Scan, ledger: Ledger) -> Scan:
    """The scan with stable pseudonyms (keyed by the ledger's secret) in place of patient
    name, ID and birth date."""
    return replace(scan_, results=anonymized(scan_.results, ledger.pseudonym_key))


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


def results_json(scan_: Scan) -> dict:
    return {"schema": "pneumoscan-results-1", "run": scan_.run.to_json(),
            "counts": asdict(scan_.counts()), "results": [r.to_json() for r in scan_.results]}


def write_json(path: Path, scan_: Scan) -> None:
    write_atomic(path, json.dumps(results_json(scan_), indent=1).encode())


def write_report(path: Path, scan_: Scan, ledger: Ledger | None = None) -> list[Path]:
    """The report of the whole scan, as PDF or HTML by the suffix of `path`. With a ledger,
    not rendered again when the file is there showing the same results. Returns the files
    written."""
    from pneumoscan.report import html as report

    name = ("report", os.path.abspath(path))
    fingerprint = shown_fingerprint(scan_.run, scan_.results)
    if not _due(ledger, name, fingerprint):
        return []
    written = report.write_report(path, scan_.run, scan_.results)
    return _written(ledger, name, fingerprint, [written])


# Fewer studies than this are rendered in this process: a worker process costs about a
# second to start (importing WeasyPrint), as much as rendering eight studies.
PARALLEL_STUDIES_FROM = 8


def write_per_study(directory: Path, scan_: Scan, ledger: Ledger | None = None, *,
                    processes: int | None = None) -> list[Path]:
    """One HTML and one PDF report per study in `directory`. With a ledger, only the studies
    whose results changed since their reports were written are rendered again. Studies
    are independent documents, so they are rendered in `processes` worker processes
    (default: one per core) when there are enough of them. Returns the files written."""
    from pneumoscan.report import html as report

    due = []
    for study in group_studies(scan_.results):
        name = ("per-study", os.path.abspath(directory), study.key)
        fingerprint = shown_fingerprint(scan_.run, study.files)
        if _due(ledger, name, fingerprint):
            due.append((name, fingerprint, study.files))
    render = functools.partial(report.write_per_study, directory, scan_.run)
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
