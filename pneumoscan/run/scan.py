"""A folder scanned: its files discovered, planned against the state ledger (what is new or
changed is computed, the rest comes from the ledger), classified by an engine. `dicomweb.py`
scans a DICOMweb server through the same path (`classify_items`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from pneumoscan import __version__
from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.model import ModelError, default_model_path
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, Engine, LocalEngine
from pneumoscan.inference.ray_engine import RayEngine, RayOptions
from pneumoscan.inputs.discover import discover
from pneumoscan.records import FileResult, InputFile, RunInfo
from pneumoscan.report.pictures import DISPLAY_SIZE, drawn
from pneumoscan.results.anonymize import anonymized
from pneumoscan.results.ledger import Basis, Ledger, Planned
from pneumoscan.results.summary import Counts
from pneumoscan.run.exits import exit_code
from pneumoscan.workers import available_cores

OnResult = Callable[[FileResult], None]


@dataclass
class Scan:
    run: RunInfo
    results: list[FileResult]

    @property
    def exit_code(self) -> int:
        return exit_code(self.results)

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

        return TorchHookCamModel(checkpoint, device=device)
    if cam_backend != "onnx":
        raise ModelError(f"unknown CAM backend {cam_backend!r}")
    from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

    path = model_path or default_model_path()
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    return OnnxCamModel(Path(path), device=device, threads=threads)


def open_engine(name: str, ray: RayOptions = RayOptions(), device: str = "auto"
                ) -> AbstractContextManager[Engine]:
    """The engine `name` (options.ENGINES), as a context manager that holds what it runs
    on. Raises EngineError when it cannot run here (Ray not installed)."""
    if name == "ray":
        return RayEngine(ray, device)
    return contextlib.nullcontext(LocalEngine())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_info(model: CamModel, threshold: float | None) -> RunInfo:
    info = model.info
    return RunInfo(model_name=info.name, model_version=info.version, model_sha256=info.sha256,
                   provider=model.provider, pneumoscan_version=__version__, started=now_iso(),
                   threshold=info.threshold if threshold is None else threshold,
                   cam_method=info.cam_method)


def scan(root: Path, model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE,
         workers: int | None = None, threshold: float | None = None, render: bool = True,
         on_result: OnResult | None = None,
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
    plans, results = classify_items(
        items, model, run, lambda known, basis: known.plan(items, basis, force=force),
        ledger=ledger, engine=engine, batch_size=batch_size, workers=workers, render=render,
        on_result=on_result)
    if ledger is not None:
        ledger.forget_missing(Path(root), plans)
    run.finished = now_iso()
    return Scan(run, results)


def classify_items(items: list[InputFile], model: CamModel, run: RunInfo,
                   plan: Callable[[Ledger, Basis], list[Planned]], *, ledger: Ledger | None,
                   engine: Engine | None, batch_size: int, workers: int | None, render: bool,
                   on_result: OnResult | None,
                   fetch: Callable[[Planned], InputFile] | None = None
                   ) -> tuple[list[Planned], list[FileResult]]:
    """The path every scan takes, a folder's or a PACS's: the items planned against the
    ledger (`plan(ledger, basis)`; without a ledger, all are computed), those to compute
    classified by `engine` (default: LocalEngine), and the plans and results in the items'
    order. The engine that ran is recorded in `run`."""
    threshold = model.info.threshold if run.threshold is None else run.threshold
    basis = Basis(run.model_sha256, threshold, render)
    plans = plan(ledger, basis) if ledger is not None else [Planned(item) for item in items]
    engine = engine or LocalEngine()
    classify = classifier(engine, model, batch_size=batch_size, workers=workers,
                          threshold=threshold, render=render)
    results = _merge_with_ledger(plans, classify, ledger, basis, on_result, fetch)
    run.provider = engine.provider(model)
    return plans, results


def classifier(engine: Engine, model: CamModel, *, render: bool, workers: int | None,
               **options: Any) -> Callable[[Iterable[InputFile]], Iterator[FileResult]]:
    """classify(items): one result per item, in order, from `engine`; with `render`, each
    classified one with its report picture, drawn in this process as the results come
    (report.pictures.drawn: the engines draw nothing, and a run whose outputs show no
    picture keeps no view of the X-rays)."""

    def classify(items: Iterable[InputFile]) -> Iterator[FileResult]:
        results = engine.classify(items, model, workers=workers,
                                  view_size=DISPLAY_SIZE if render else None, **options)
        if not render:
            return results
        # The engines' `classify` are generators (closing one stops its workers).
        return drawn(cast("Generator[FileResult, None, None]", results),
                     workers or available_cores())

    return classify


def _merge_with_ledger(plans: list[Planned],
                       classify: Callable[[Iterable[InputFile]], Iterator[FileResult]],
                       ledger: Ledger | None, basis: Basis, on_result: OnResult | None,
                       fetch: Callable[[Planned], InputFile] | None) -> list[FileResult]:
    """The results of `plans` in order: the ledger's, or computed (and then recorded). The
    pipeline sees only the files to compute, before any is decoded; `fetch` makes a
    planned item readable (a PACS instance: retrieves it) just before the pipeline reads
    it, a few batches ahead of the model."""
    to_compute = (fetch(plan) if fetch else plan.item for plan in plans if plan.cached is None)
    results = []
    # The engines' `classify` are generators: closed early, they stop their workers.
    computing = cast("Generator[FileResult, None, None]", classify(to_compute))
    with contextlib.closing(computing) as computed:
        for plan in plans:
            result = plan.cached
            if result is None:
                result = next(computed)
                result.path = plan.item.path  # a PACS instance's, not its cached copy's
                if (ledger is not None and plan.key is not None
                        and ledger.record(plan, result, basis) and result.picture):
                    # Read back when a report shows it: memory stays flat however many.
                    result.picture = ledger.stored_picture(plan.key)
            if on_result:
                on_result(result)
            results.append(result)
    return results


def anonymize(scanned: Scan, ledger: Ledger) -> Scan:
    """The scan with stable pseudonyms (keyed by the ledger's secret) in place of patient
    identity, paths and study labels (`results.anonymize` says what is kept)."""
    return replace(scanned, results=anonymized(scanned.results, ledger.pseudonym_key))
