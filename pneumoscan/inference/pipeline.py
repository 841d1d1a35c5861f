"""Batched classification + CAM over a stream of files (the middle stages of the pipeline).

Worker threads load and preprocess files ahead of the model (a bounded window, so memory
stays flat however many files there are) while the calling thread runs batches through the
model; the report's pictures are rendered back in the workers. Results come out in input
order, one per input file, whatever happened to it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.inference.cam import CamModel, normalised_cams
from pneumoscan.inference.preprocess import Preprocessing, model_input, normalise, prepare_pixels
from pneumoscan.inference.scope import assess, scope_threshold
from pneumoscan.inputs.loading import load, load_path
from pneumoscan.records import FileResult, InputFile, LoadedImage
from pneumoscan.report.pictures import render_picture

DEFAULT_BATCH_SIZE = 32


@dataclass
class Prepared:
    item: InputFile
    outcome: LoadedImage | FileResult
    tensor: np.ndarray | None
    seconds: float


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


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _prepare(item: InputFile, model: CamModel, min_size: tuple[int, int]) -> Prepared:
    t0 = time.perf_counter()
    outcome = load(item, min_size=min_size)
    tensor = None
    if isinstance(outcome, LoadedImage):
        tensor = model_input(outcome.pixels, model.info.preprocessing)
    return Prepared(item, outcome, tensor, time.perf_counter() - t0)


def classify(items: Iterable[InputFile], model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE,
             workers: int | None = None, threshold: float | None = None,
             render: bool = True,
             on_result: Callable[[FileResult], None] | None = None) -> Iterator[FileResult]:
    """One FileResult per item, in order. `render` adds the report's pictures (the X-ray
    beside its CAM overlay); without it the run is classification only."""
    info = model.info
    threshold = info.threshold if threshold is None else threshold
    # The report's pictures come from the same decode as the model's input (at least the
    # model's size; large scans are shown at up to DISPLAY_SIZE): one decode per file.
    min_size = info.preprocessing.decode_size
    negative = 1 - info.positive_class  # binary models: the other class
    with ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="pneumoscan") as pool:
        window: deque[Future[Prepared]] = deque()
        iterator = iter(items)
        exhausted = False

        def refill() -> None:
            nonlocal exhausted
            while not exhausted and len(window) < batch_size * 3:
                try:
                    window.append(pool.submit(_prepare, next(iterator), model, min_size))
                except StopIteration:
                    exhausted = True

        refill()
        while window:
            chunk: list[Prepared] = []
            ready = 0
            while window and ready < batch_size:
                prepared = window.popleft().result()
                chunk.append(prepared)
                ready += prepared.tensor is not None
                refill()
            yield from _finish_chunk(chunk, model, threshold, info, negative,
                                     pool if render else None, on_result)


def _finish_chunk(chunk, model, threshold, info, negative, render_pool,
                  on_result) -> Iterator[FileResult]:
    loaded = [p for p in chunk if p.tensor is not None]
    by_id: dict[int, FileResult] = {}
    if loaded:
        t0 = time.perf_counter()
        predictions = model.predict(np.stack([p.tensor for p in loaded]))
        share = (time.perf_counter() - t0) / len(loaded)
        probabilities = predictions.probabilities[:, info.positive_class]
        positive = probabilities >= threshold
        decided = np.where(positive, info.positive_class, negative)
        cams = normalised_cams(predictions.cams, decided)
        pictures = [render_pool.submit(render_picture, p.outcome.pixels, cam)
                    if render_pool else None for p, cam in zip(loaded, cams)]
        scores = predictions.scope_scores
        if scores is None:
            scores = [None] * len(loaded)
        guard_threshold = scope_threshold(info)
        for p, prob, cls, picture, score in zip(loaded, probabilities, decided, pictures, scores):
            img: LoadedImage = p.outcome
            in_scope, reasons = assess(img.metadata, None if score is None else float(score),
                                       guard_threshold)
            by_id[id(p)] = FileResult(
                path=img.path, study=img.study, status="ok", probability=float(prob),
                label=info.class_names[cls], threshold=float(threshold),
                metadata=img.metadata, in_scope=in_scope, scope_reasons=reasons,
                picture=picture.result() if picture else None, seconds=p.seconds + share)
    for p in chunk:
        result = by_id.get(id(p)) or p.outcome
        if result.seconds is None:
            result.seconds = p.seconds
        if on_result:
            on_result(result)
        yield result
