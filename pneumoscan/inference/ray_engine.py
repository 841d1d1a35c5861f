"""The ray engine: the pipeline's own stages on a Ray cluster (`pneumoscan run --engine ray`).

Ray Data streams the files through the stage functions of the local engine
(`pipeline.prepare`, `score`, `finish`), nothing reimplemented:

    file list -> prepare: load + preprocess
              -> score + finish: an actor pool, one ONNX Runtime session per actor (CUDA
                 when the actor holds a GPU); the result (with its view, when asked)
              -> the driver, in input order

Where `prepare` runs depends on the actors. Actors with a GPU (or any, when
`RayOptions.decode_cpus` asks for it) get their files prepared by CPU tasks spread over
the nodes: a file's pixels cross Ray's object store once, as the model's uint8 input (and
the X-ray reduced for the outputs' pictures, when asked for). Actors on CPUs only
prepare their own files: the prepare stage asks for the actors' resources, so Ray Data
fuses it into them; no pixels cross the object store, and every CPU decodes and
classifies whole files, as the local engine's threads share a machine's cores.

The driver (the process that runs `pneumoscan run`) keeps the ledger, the run log, the JSON
and the reports (and draws their pictures) exactly as with the local engine: it gets the
results one by one, in order, and never holds more of them than the local engine does. Ray
retries the work of a worker or an actor that dies (actors are restarted), and every row is
checked to come back exactly once. Every node reads the input files and the model by the
paths the driver gives (a filesystem they all see; docs/CLUSTER.md).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.model import ModelError, default_model_path
from pneumoscan.inference.pipeline import (
    DEFAULT_BATCH_SIZE,
    Prepared,
    finish,
    prepare,
    score,
)
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.records import FileResult, InputFile
from pneumoscan.text import one_line

INSTALL_HINT = 'the ray engine needs Ray: pip install "pneumoscan[ray]"'
# Files per block (a decoding task's, or a share of an actor's call): enough work (about
# 0.1 s of originals) to amortise a task's scheduling, few enough to spread a small folder
# over the cluster's cores.
FILES_PER_BLOCK = 16
# A decoding task's CPUs, where actors with a GPU are fed by tasks and none were asked for.
DECODE_TASK_CPUS = 1.0
# What a decoding worker holds: its process with the decoders imported (about 200 MB) and
# a block of scans. Reserving it keeps Ray from crowding a node's memory with decoders.
DECODE_TASK_MEMORY = 256 << 20


class EngineError(RuntimeError):
    """The engine cannot run, or the cluster failed the run (run-level error)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how the run uses Ray. `address`: an existing cluster (`auto`, `HOST:6379`,
    `ray://HOST:10001`); None follows `ray.init`: RAY_ADDRESS, else the latest `ray start`
    cluster of this machine, else a Ray instance started on this machine for the run.
    `actors`: inference actors (default: as many as the cluster holds when the run
    starts, then as many as keep up). `actor_gpus`: GPUs per actor (default: one when the
    cluster has GPUs and the device is not `cpu`). `decode_cpus`: files are prepared by
    tasks of their own, of that many CPUs each (default: CPU-only actors prepare their
    own files, actors with a GPU get them from tasks of DECODE_TASK_CPUS). `logs`: Ray's
    own logs and progress bars on stderr."""
    address: str | None = None
    actors: int | None = None
    actor_cpus: float = 1.0
    actor_gpus: float | None = None
    decode_cpus: float | None = None
    logs: bool = False


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the "data" extra of ray)
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """The model as an actor on any node finds it: the package's own when the driver runs
    the default one (installed on every node), else the driver's path (a shared
    filesystem); either way it must hash to the driver's `sha256`."""
    path: Path | None  # None: the node's default model
    sha256: str
    device: str

    @classmethod
    def of(cls, model: CamModel, device: str) -> ModelSpec:
        path = model.info.path
        is_default = Path(path).resolve() == default_model_path().resolve()
        return cls(None if is_default else Path(path).resolve(), model.info.sha256, device)

    def open(self, threads: int) -> CamModel:
        from pneumoscan.inference.cam.onnx_cam import OnnxCamModel

        model = OnnxCamModel(self.path or default_model_path(), device=self.device,
                             threads=threads)
        if model.info.sha256 != self.sha256:
            raise ModelError(f"on node {socket.gethostname()}, model {model.info.path} is not "
                             "the driver's (sha256 differs): install the same pneumoscan on "
                             "every node, and give --model on a filesystem they all see")
        return model


def _prepare_block(batch: dict, prep: Preprocessing, view_size: int | None) -> dict:
    prepared = [prepare(item, prep, view_size) for item in batch["item"]]
    return {"index": batch["index"], "prepared": _objects(prepared)}


class _Classifier:
    """An inference actor: one ONNX Runtime session for its life. It scores batches of
    prepared files and finishes them, so that only results (with their views, when asked)
    go back to the driver."""

    def __init__(self, spec: ModelSpec, threads: int, threshold: float):
        self.model = spec.open(threads)
        self.threshold = threshold

    def __call__(self, batch: dict) -> dict:
        prepared: list[Prepared] = list(batch["prepared"])
        results = [finish(p, s, self.threshold)
                   for p, s in zip(prepared, score(prepared, self.model, self.threshold))]
        return {"index": batch["index"], "result": _objects(results),
                "provider": np.array([self.model.provider] * len(prepared))}


def _objects(values: list) -> np.ndarray:
    """A column of Python objects (Ray Data pickles them between processes)."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class RayEngine:
    """A pipeline.Engine on Ray, connected to (or started) while open."""

    def __init__(self, options: RayOptions = RayOptions(), device: str = "auto"):
        self.options = options
        self.device = device  # the actors': CUDA only where they hold a GPU
        self.providers: set[str] = set()
        self._ray = import_ray()
        self._started = False

    def __enter__(self) -> RayEngine:
        ray = self._ray
        if not self.options.logs:
            # Ray's notices (its token, progress bars off) are not the user's business;
            # failures still come back as exceptions.
            for name in ("ray", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
        if not ray.is_initialized():
            try:
                ray.init(address=self.options.address, include_dashboard=False,
                         log_to_driver=self.options.logs, configure_logging=self.options.logs,
                         logging_level=logging.INFO if self.options.logs else logging.WARNING)
            # ConnectionError, RuntimeError, ValueError, and a bare Exception when its
            # processes do not start in time: all say the cluster is not there.
            except Exception as exc:  # noqa: BLE001 (only ray.init is inside)
                where = self.options.address or ("Ray's default: RAY_ADDRESS, a `ray "
                                                 "start` cluster here, or a new instance")
                raise EngineError(f"cannot start or reach Ray ({where}): {one_line(exc)}"
                                  ) from None
            self._started = True
        context = ray.data.DataContext.get_current()  # the datasets made from now on
        context.enable_progress_bars = self.options.logs
        # Rows hold our records (files, pixels, results): pickled, as Ray Data does after
        # trying Arrow first (and saying so, once per process).
        context.enable_fallback_to_arrow_object_ext_type = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()

    def provider(self, model: CamModel) -> str:
        """The execution provider(s) the actors ran; the driver's when none ran (every
        result from the state)."""
        return "+".join(sorted(self.providers)) or model.provider

    def classify(self, items: Iterable[InputFile], model: CamModel, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                 threshold: float | None = None, view_size: int | None = None,
                 on_result: Callable[[FileResult], None] | None = None
                 ) -> Iterator[FileResult]:
        """One FileResult per item, in order, as `pipeline.classify` gives them. `model` is
        the driver's copy (its metadata); the actors open the same file themselves.
        `workers` (the local engine's decoding threads) has no meaning here: decoding runs
        on every core Ray gives it."""
        ray = self._ray
        items = list(items)
        if not items:
            return
        threshold = model.info.threshold if threshold is None else threshold
        dataset = self._dataset(items, model, batch_size, threshold, view_size)
        returned = 0
        try:
            for row in dataset.iter_rows():
                if row["index"] != returned:  # Ray lost or repeated a row: never hide it
                    raise EngineError(f"the Ray pipeline returned file {row['index']} where "
                                      f"file {returned} was due")
                returned += 1
                self.providers.add(str(row["provider"]))
                result = row["result"]
                if on_result:
                    on_result(result)
                yield result
        except ray.exceptions.RayError as exc:
            raise EngineError(f"the Ray run failed: {one_line(exc)}") from None
        if returned != len(items):
            raise EngineError(f"the Ray pipeline returned {returned} of {len(items)} files")

    def _dataset(self, items: list[InputFile], model: CamModel, batch_size: int,
                 threshold: float, view_size: int | None):
        ray = self._ray
        gpus = self._actor_gpus()
        spec = ModelSpec.of(model, self.device if gpus else "cpu")
        rows = [{"index": i, "item": item} for i, item in enumerate(items)]
        dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // FILES_PER_BLOCK))
        context = dataset.context
        context.execution_options.preserve_order = True  # results reach the ledger in order
        actors = (ray.data.ActorPoolStrategy(size=self.options.actors) if self.options.actors
                  else ray.data.ActorPoolStrategy(min_size=1, max_size=None,
                                                  initial_size=self._actors_that_fit(gpus)))
        actor_resources = {"num_cpus": self.options.actor_cpus, "num_gpus": gpus}
        decode_cpus = self.options.decode_cpus or (DECODE_TASK_CPUS if gpus else None)
        # Without tasks of its own, the actors' resources make Ray Data fuse preparing
        # into the actors.
        prepare_resources = ({"num_cpus": decode_cpus, "memory": DECODE_TASK_MEMORY}
                             if decode_cpus else actor_resources)
        return (dataset
                .map_batches(_prepare_block, fn_kwargs={"prep": model.info.preprocessing,
                                                        "view_size": view_size},
                             batch_size=None, **prepare_resources)
                .map_batches(_Classifier, fn_constructor_kwargs={
                                 "spec": spec, "threads": max(1, round(self.options.actor_cpus)),
                                 "threshold": threshold},
                             batch_size=batch_size, compute=actors, **actor_resources))

    def _actors_that_fit(self, gpus: float) -> int:
        """The actors the cluster holds now: a pool that starts at full size does not
        wait for Ray Data to grow it while its first files are done one actor at a time."""
        resources = self._ray.cluster_resources()
        fit = resources.get("CPU", 0) // self.options.actor_cpus
        if gpus:
            fit = min(fit, resources.get("GPU", 0) // gpus)
        return max(1, int(fit))

    def _actor_gpus(self) -> float:
        gpus = self.options.actor_gpus
        if gpus is None:
            has_gpus = self._ray.cluster_resources().get("GPU", 0) > 0
            gpus = 1.0 if has_gpus and self.device != "cpu" else 0.0
        if self.device == "cuda" and not gpus:
            raise EngineError("--device cuda: the Ray cluster has no GPU for the actors")
        return gpus
