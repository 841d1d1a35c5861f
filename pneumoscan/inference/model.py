"""The model file: its metadata, and an ONNX Runtime session on the right device.

Everything the run path needs to know about a model (input size, normalisation, class
names, threshold, name, version) is read from the ONNX file's metadata_props, written by
`pneumoscan export-onnx`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pneumoscan.files import atomic_path, sha256_of_file
from pneumoscan.inference.preprocess import Preprocessing
from pneumoscan.workers import available_cores

log = logging.getLogger(__name__)

META_PREFIX = "pneumoscan."
DEFAULT_MODEL_NAME = "default.onnx"


class ModelError(RuntimeError):
    """The model cannot be used (run-level error)."""


PLAIN_CAM = "CAM"  # Zhou et al. 2016: the classifier's weights over the last conv maps


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    name: str
    version: str
    arch: str
    class_names: tuple[str, ...]
    positive_class: int
    threshold: float
    preprocessing: Preprocessing
    extra: dict = field(default_factory=dict)


    @property
    def cam_method(self) -> str:
        """How the model's `cams` output is computed (metadata `cam_method`, written by
        export-onnx); models exported before it was recorded carry the plain CAM."""
        return str(self.extra.get("cam_method", PLAIN_CAM))

    @property
    def validation_metrics(self) -> dict:
        """What export-onnx recorded of the validation split: `at_threshold` and `at_0.5`
        (accuracy, sensitivity, specificity, precision, f1, auc), `ci95`, `n_val`; empty
        when the model carries none."""
        return _parsed(self.extra.get("validation_metrics", "{}")) or {}

    def to_json(self) -> dict:
        """Everything the model file says of itself, as plain JSON values."""
        return {"name": self.name, "version": self.version, "arch": self.arch,
                "path": str(self.path), "sha256": self.sha256,
                "class_names": list(self.class_names),
                "positive_class": self.class_names[self.positive_class],
                "threshold": self.threshold, "preprocessing": asdict(self.preprocessing),
                **{key: _parsed(value) for key, value in sorted(self.extra.items())}}


def _parsed(text: str):
    """A metadata value: JSON when it is (metrics, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def default_model_path() -> Path:
    return Path(str(resources.files("pneumoscan.models").joinpath(DEFAULT_MODEL_NAME)))


def file_sha256(path: Path) -> str:
    stat = os.stat(path)
    return _sha256(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """Hashed once per version of a file (opening a model needs its hash twice)."""
    return sha256_of_file(Path(path))


def metadata_strings(meta: dict) -> dict[str, str]:
    """Model metadata as the strings an ONNX file holds (JSON for other values)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def metadata_props(meta: dict) -> dict[str, str]:
    """Model metadata as ONNX metadata_props (string values, namespaced keys)."""
    return {META_PREFIX + k: v for k, v in metadata_strings(meta).items()}


def read_model_info(path: Path, custom: dict[str, str]) -> ModelInfo:
    """ModelInfo from an ONNX session's custom metadata map."""
    return model_info(path, {k[len(META_PREFIX):]: v for k, v in custom.items()
                             if k.startswith(META_PREFIX)})


def model_info(path: Path, meta: dict[str, str]) -> ModelInfo:
    """ModelInfo of the model file at `path` from its metadata strings (`metadata_strings`):
    those an exported model holds, or those its checkpoint would be exported with."""
    required = ("class_names", "preprocessing", "threshold", "name", "version", "arch")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelError(f"{path} lacks pneumoscan metadata ({', '.join(missing)}); "
                         "export it with `pneumoscan export-onnx`")
    class_names = tuple(json.loads(meta["class_names"]))
    return ModelInfo(
        path=path, sha256=file_sha256(path), name=meta["name"], version=meta["version"],
        arch=meta["arch"], class_names=class_names,
        positive_class=class_names.index(meta.get("positive_class", "PNEUMONIA")),
        threshold=float(meta["threshold"]),
        preprocessing=Preprocessing.from_json(meta["preprocessing"]),
        extra={k: v for k, v in meta.items() if k not in required},
    )


DEVICES = ("auto", "cpu", "cuda")


def open_session(path: Path, device: str = "auto", threads: int | None = None,
                 cache: bool = True):
    """An ONNX Runtime session and the provider that really runs it.

    ORT silently falls back to CPU when CUDA cannot load, so we find out first with a tiny
    probe session: `cuda` then fails loudly, `auto` takes CPU quietly (what ORT logged while
    failing is shown with -v). CPU sessions reuse the graph ORT optimised for this machine
    the first time, kept in the user's cache folder (`cache=False`: neither read nor
    written)."""

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}")
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    on_cuda = device in ("auto", "cuda") and cuda_loads()
    if device == "cuda" and not on_cuda:
        raise ModelError("--device cuda: the CUDA execution provider could not be loaded "
                         "(no GPU, or CUDA/cuDNN libraries missing); use --device cpu or auto")
    if on_cuda:
        preload_cuda_libraries()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        session = _create_session(path, session_options(threads), providers)
    else:
        session = _cpu_session(Path(path), threads, cache)
    return session, session.get_providers()[0]


def session_options(threads: int | None):
    """Tuned for a pipeline in which decoding threads share the cores with inference:
    `threads` intra-op threads for a run (default: every core), and no spinning, so that ORT
    threads waiting for work yield their core to the decoders instead of burning it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def session_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises when a session cannot be made: the status exceptions of its
    C++ core (plain Exception subclasses: a missing or corrupt file, an invalid graph, an
    unsupported operator), and its Python layer's RuntimeError and ValueError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as status

    return (status.Fail, status.InvalidArgument, status.NoSuchFile, status.NoModel,
            status.EngineError, status.RuntimeException, status.InvalidProtobuf,
            status.ModelLoaded, status.NotImplemented, status.InvalidGraph, status.EPFail,
            status.NotFound, RuntimeError, ValueError, OSError)


def _create_session(source: Path, options, providers: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(source), options, providers=providers)
    except session_errors() as exc:
        raise ModelError(f"cannot load model {source}: {exc}") from exc


def _cpu_session(path: Path, threads: int | None, cache: bool):
    """A CPU session, from the cached optimised graph when there is one; otherwise the
    graph ORT optimises now is written to the cache for next time. The cache is only a
    speed-up: any problem with it falls back to the model file itself."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    cached = optimized_model_path(path) if cache else None
    if cached is not None and cached.is_file():
        options = session_options(threads)
        # Already optimised (for this CPU and ORT version: both are in the file name).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), options, providers=providers)
        except session_errors():
            cached.unlink(missing_ok=True)  # damaged or foreign: rebuilt below
    options = session_options(threads)
    if cached is None:
        return _create_session(path, options, providers)
    try:
        # Renamed into place when written: concurrent runs never read a partial file.
        with atomic_path(cached, mode=0o644) as partial:
            options.optimized_model_filepath = str(partial)
            return ort.InferenceSession(str(path), options, providers=providers)
    except session_errors():  # also OSError: the cache could not be written
        return _create_session(path, session_options(threads), providers)


def cache_dir() -> Path:
    if os.environ.get("PNEUMOSCAN_CACHE_DIR"):
        return Path(os.environ["PNEUMOSCAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pneumoscan"


def optimized_model_path(path: Path) -> Path | None:
    """Where ORT's optimised graph of `path` is cached, or None when the cache folder cannot
    be written. ORT's fully optimised graph is specific to the CPU (NCHWc layouts, ISA)
    and ORT version, so both are part of the key with the model's own hash."""
    import onnxruntime as ort

    folder = cache_dir() / "ort-optimized"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            return None
    except OSError:
        return None
    key = f"{file_sha256(path)[:32]}-ort{ort.__version__}-{cpu_fingerprint()}.onnx"
    return folder / key


def cpu_fingerprint() -> str:
    """A short hash of the CPU's identity and instruction set extensions."""
    import platform

    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    text += line
                if line.startswith("flags"):
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Run in a process of its own: loading ORT's CUDA provider is what fails on a machine
# without a usable GPU, and ORT then writes its errors to stderr through a process-wide
# logger; a child keeps them out of this process's output without changing that logger
# (and a broken driver cannot take the run down with it).
CUDA_PROBE = """
import contextlib, sys
import onnxruntime as ort
from onnx import TensorProto, helper

if hasattr(ort, "preload_dlls"):  # as open_session does (preload_cuda_libraries)
    with contextlib.redirect_stdout(sys.stderr):
        ort.preload_dlls()

value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
session = ort.InferenceSession(probe.SerializeToString(),
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(session.get_providers()[0])
"""
CUDA_PROBE_SECONDS = 300  # a first CUDA start may compile kernels for a new GPU


def preload_cuda_libraries() -> None:
    """Loads the CUDA and cuDNN libraries that NVIDIA's pip packages install (PyTorch's, or
    onnxruntime-gpu's `cuda` and `cudnn` extras) where the system's loader would not find
    them: ORT's CUDA provider otherwise fails to load unless `import torch` came first.
    `onnxruntime.preload_dlls` (ORT 1.21 on) prints what it cannot load: that goes to the
    log (-v), never to stdout, which holds the run's output lines."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        return
    told = io.StringIO()
    with contextlib.redirect_stdout(told):
        ort.preload_dlls()
    if told.getvalue().strip():
        log.info("ONNX Runtime, loading CUDA libraries:\n%s", told.getvalue().strip())


@lru_cache(maxsize=1)
def cuda_loads() -> bool:
    """Whether ORT's CUDA provider really loads here (a one-node session finds out)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True,
                               text=True, timeout=CUDA_PROBE_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("CUDA probe failed: %s", exc)
        return False
    if probe.stderr.strip():
        log.info("ONNX Runtime, trying its CUDA provider:\n%s", probe.stderr.strip())
    return probe.returncode == 0 and probe.stdout.strip() == "CUDAExecutionProvider"
