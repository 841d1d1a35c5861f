"""Batched classification + CAM over a stream of files (the middle stages of the pipeline).

The stages are plain functions, shared by both engines: `prepare` (load + preprocess one
file), `score` (one batch through the model: probability, decision, CAM and scope) and
`finish` (the file's result). `classify` is the local engine: worker threads prepare files
ahead of the model (a bounded window, so memory stays flat however many files there are)
while threads of their own run batches through the model (as many at once as the model
says it runs best: one a core on CPU), ahead of the caller.
`ray_engine` runs the same stages on a Ray cluster. Results come out in input order, one
per input file, whatever happened to it. Nothing here draws: when the outputs will show
pictures, they ask for each classified image's view (the X-ray reduced to the size they
show), from which with the result's CAM the output stage draws them (report.pictures); a
run that writes only JSON keeps none.

A watchdog bounds the time one file may take in the local engine: a file whose reading and
decoding has not ended FILE_TIMEOUT_S after it started is abandoned (an error, with the
reason) and the run goes on without waiting for it; `stuck()` then tells the caller that a
worker thread may never end, so that the process must not wait for it when it exits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from pneumoscan.inference.cam import CamModel, normalised_cams
from pneumoscan.inference.preprocess import (
    Preprocessing,
    normalise,
    prepare_pixels,
    reduced,
)
from pneumoscan.inference.scope import assess, scope_threshold
from pneumoscan.inputs.loading import load, load_path
from pneumoscan.records import FileResult, InputFile, LoadedImage
from pneumoscan.workers import available_cores

DEFAULT_BATCH_SIZE = 32
# The longest one file may take to be read, decoded and preprocessed: a 100-megapixel
# image takes seconds; anything far beyond is a decoder stuck on crafted data.
FILE_TIMEOUT_S = 120.0
# How often the watchdog looks whether a queued file has started.
_POLL_S = 1.0

# Work abandoned by the watchdog that had not ended when last looked at.
_abandoned: list[Future] = []


def stuck() -> bool:
    """Whether a file abandoned by the watchdog is still being worked on by a thread that
    may never end: the process should then exit without waiting for its threads."""
    _abandoned[:] = [future for future in _abandoned if not future.done()]
    return bool(_abandoned)


@dataclass
class Prepared:
    """One file after load + preprocess. `model_pixels` is the model's input before
    normalisation (uint8, the model's size: a fifth of the float tensor's bytes, which
    matters where it travels between processes); None when the file was not loaded, and
    `outcome` is then its result. A loaded image's decoded pixels are not kept (its
    `outcome.pixels` is None): `view_pixels` is the X-ray reduced for the outputs' pictures
    when they were asked for, else None."""
    item: InputFile
    outcome: LoadedImage | FileResult
    model_pixels: np.ndarray | None
    seconds: float
    view_pixels: np.ndarray | None = None


@dataclass
class Scored:
    """The model's verdict on one image; `seconds` is its share of the batch's time."""
    probability: float
    label: str
    cam: np.ndarray  # of the decided class, (h, w) in [0, 1]
    seconds: float
    in_scope: bool
    scope_reasons: list[str]


def read_model_pixels(path: Path, prep: Preprocessing) -> np.ndarray | FileResult:
    """The file at `path` as `run` feeds it to a model with `prep`, before normalising:
    uint8 (height, width); or the FileResult that says why it cannot be."""
    loaded = load_path(path, min_size=prep.decode_size)
    return loaded if isinstance(loaded, FileResult) else prepare_pixels(loaded.pixels, prep)


def read_model_input(path: Path, prep: Preprocessing) -> np.ndarray | FileResult:
    """The file at `path` as `run` feeds it to a model with `prep`: float32 (C, height,
    width); or the FileResult that says why it cannot be."""
    pixels = read_model_pixels(path, prep)
    return pixels if isinstance(pixels, FileResult) else normalise(pixels[None], prep)[0]


def preprocessed_batches(paths: list[Path], prep: Preprocessing, size: int = DEFAULT_BATCH_SIZE):
    """float32 model inputs, `size` at a time, of the images that load (others skipped);
    yields (batch, indices into paths)."""
    tensors, indices = [], []
    for i, path in enumerate(paths):
        tensor = read_model_input(path, prep)
        if isinstance(tensor, FileResult):
            continue
        tensors.append(tensor)
        indices.append(i)
        if len(tensors) == size:
            yield np.stack(tensors), indices
            tensors, indices = [], []
    if tensors:
        yield np.stack(tensors), indices


class Engine(Protocol):
    """What runs the stages: `classify` below (LocalEngine), or ray_engine.RayEngine."""

    def classify(self, items: Iterable[InputFile], model: CamModel, *, batch_size: int,
                 workers: int | None, threshold: float | None, view_size: int | None = None,
                 on_result: Callable[[FileResult], None] | None = None
                 ) -> Iterator[FileResult]:
        """One FileResult per item, in order; with `view_size`, each classified one with
        its view (the X-ray at most `view_size` px on its longest side)."""

    def provider(self, model: CamModel) -> str:
        """The execution provider that ran the model, for the run's record."""


class LocalEngine:
    """This process: decoding threads and the model's session (`classify`)."""

    def classify(self, items, model, **options) -> Iterator[FileResult]:
        return classify(items, model, **options)

    def provider(self, model: CamModel) -> str:
        return model.provider


@dataclass
class Job:
    """A file handed to a worker; `started` (monotonic) is set when a worker takes it."""
    item: InputFile
    started: float | None = None
    future: Future = field(init=False)


def default_workers() -> int:
    return min(4, available_cores())


def prepare(item: InputFile, prep: Preprocessing, view_size: int | None = None) -> Prepared:
    """Load one file at the model's decode size and make the model's input of it; with
    `view_size`, also the X-ray reduced to at most that on its longest side, for the
    outputs' pictures (from the same decode: one decode per file)."""
    t0 = time.perf_counter()
    outcome = load(item, min_size=prep.decode_size)
    if not isinstance(outcome, LoadedImage):
        return Prepared(item, outcome, None, time.perf_counter() - t0)
    model_pixels = prepare_pixels(outcome.pixels, prep)
    view_pixels = None if view_size is None else reduced(outcome.pixels, view_size)
    # The decoded scan is not needed any more: don't hold (or ship) it.
    outcome = replace(outcome, pixels=None)
    return Prepared(item, outcome, model_pixels, time.perf_counter() - t0, view_pixels)


def score(chunk: list[Prepared], model: CamModel, threshold: float) -> list[Scored | None]:
    """The loaded files of `chunk` in one batch through the model: probability, decision
    and the CAM of the decided class of each; None for a file that was not loaded."""
    loaded = [p for p in chunk if p.model_pixels is not None]
    if not loaded:
        return [None] * len(chunk)
    info = model.info
    t0 = time.perf_counter()
    batch = normalise(np.stack([p.model_pixels for p in loaded]), info.preprocessing)
    predictions = model.predict(batch)
    share = (time.perf_counter() - t0) / len(loaded)
    probabilities = predictions.probabilities[:, info.positive_class]
    negative = 1 - info.positive_class  # binary models: the other class
    decided = np.where(probabilities >= threshold, info.positive_class, negative)
    cams = normalised_cams(predictions.cams, decided)
    scope_scores = predictions.scope_scores
    if scope_scores is None:  # a model without a scope guard: metadata rules only
        scope_scores = [None] * len(loaded)
    guard_threshold = scope_threshold(info)
    scored = []
    for p, prob, cls, cam, scope_score in zip(loaded, probabilities, decided, cams,
                                              scope_scores):
        in_scope, reasons = assess(p.outcome.metadata,
                                   None if scope_score is None else float(scope_score),
                                   guard_threshold)
        scored.append(Scored(float(prob), info.class_names[cls], cam, share, in_scope,
                             reasons))
    verdicts = iter(scored)
    return [next(verdicts) if p.model_pixels is not None else None for p in chunk]


CAM_DECIMALS = 4  # a colour map shows 256 levels at most


def cam_grid(cam: np.ndarray) -> list[list[float]]:
    """The CAM as plain data for the result (JSON, the state ledger)."""
    return np.round(np.nan_to_num(np.asarray(cam, dtype=np.float64)), CAM_DECIMALS).tolist()


def finish(prepared: Prepared, scored: Scored | None, threshold: float) -> FileResult:
    """The file's result: classified when it was scored (with its view when the file was
    prepared with one), else what loading it gave."""
    if scored is None:
        result = prepared.outcome
        if result.seconds is None:
            result.seconds = prepared.seconds
        return result
    img: LoadedImage = prepared.outcome
    return FileResult(path=img.path, study=img.study, status="ok",
                      probability=scored.probability, label=scored.label,
                      threshold=float(threshold), metadata=img.metadata,
                      in_scope=scored.in_scope, scope_reasons=scored.scope_reasons,
                      cam=cam_grid(scored.cam), view=prepared.view_pixels,
                      seconds=prepared.seconds + scored.seconds)


def _prepare_job(job: Job, prep: Preprocessing, view_size: int | None) -> Prepared:
    job.started = time.monotonic()
    return prepare(job.item, prep, view_size)


def await_job(job: Job, timeout: float) -> Prepared:
    """The job's outcome, or an error result when it ran over `timeout` seconds (counted
    from when a worker took it, not from when it was queued)."""
    while True:
        started = job.started
        wait = _POLL_S if started is None else started + timeout - time.monotonic()
        try:
            return job.future.result(timeout=max(wait, 0.0))
        except TimeoutError:
            if started is None:
                continue
        _abandoned.append(job.future)
        item = job.item
        reason = (f"abandoned: reading and decoding took longer than {timeout:g} s "
                  "(a stuck decoder, or a file that never ends)")
        return Prepared(item, FileResult(item.path, str(item.path.parent), "error", reason),
                        None, timeout)


def classify(items: Iterable[InputFile], model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE,
             workers: int | None = None, threshold: float | None = None,
             view_size: int | None = None, file_timeout: float = FILE_TIMEOUT_S,
             on_result: Callable[[FileResult], None] | None = None) -> Iterator[FileResult]:
    """One FileResult per item, in order. `view_size` keeps each classified image's view
    (the X-ray at most that on its longest side) for the outputs that draw pictures;
    without it the run is classification only. A file that takes more than
    `file_timeout` seconds is abandoned (an error result)."""
    threshold = model.info.threshold if threshold is None else threshold
    prep = model.info.preprocessing
    pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="pneumoscan")
    # The model runs in threads of its own (one a batch it may run at once), ahead of the
    # caller: what the caller does with a batch's results (the state, the log, the outputs)
    # overlaps the next batches' inference instead of leaving the cores to the decoders.
    lanes = model.concurrent_batches
    model_threads = ThreadPoolExecutor(lanes, thread_name_prefix="pneumoscan-model")
    try:
        scoring: deque[tuple[list[Prepared], Future]] = deque()
        for chunk in _read_ahead(pool, iter(items), prep, view_size, batch_size, file_timeout):
            scoring.append((chunk, model_threads.submit(score, chunk, model, threshold)))
            if len(scoring) > lanes:
                yield from _finished(*scoring.popleft(), threshold, on_result)
        while scoring:
            yield from _finished(*scoring.popleft(), threshold, on_result)
    finally:
        model_threads.shutdown(cancel_futures=True)
        # Never wait for an abandoned file's thread: it may never end.
        pool.shutdown(wait=not stuck(), cancel_futures=True)


def _finished(chunk: list[Prepared], scoring: Future, threshold: float,
              on_result: Callable[[FileResult], None] | None) -> Iterator[FileResult]:
    for p, s in zip(chunk, scoring.result()):
        result = finish(p, s, threshold)
        if on_result:
            on_result(result)
        yield result


def _read_ahead(pool: ThreadPoolExecutor, iterator: Iterator[InputFile], prep: Preprocessing,
                view_size: int | None, batch_size: int, file_timeout: float
                ) -> Iterator[list[Prepared]]:
    """Chunks of prepared files in input order, each with up to `batch_size` loaded ones,
    while up to three batches more are prepared in the pool."""
    window: deque[Job] = deque()
    exhausted = False

    def refill() -> None:
        nonlocal exhausted
        while not exhausted and len(window) < batch_size * 3:
            try:
                job = Job(next(iterator))
            except StopIteration:
                exhausted = True
                break
            job.future = pool.submit(_prepare_job, job, prep, view_size)
            window.append(job)

    refill()
    while window:
        chunk: list[Prepared] = []
        ready = 0
        while window and ready < batch_size:
            prepared = await_job(window.popleft(), file_timeout)
            chunk.append(prepared)
            ready += prepared.model_pixels is not None
            refill()
        yield chunk
