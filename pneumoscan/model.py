"""The model file: its metadata, and an ONNX Runtime session on the right device.

Everything the run path needs to know about a model (input size, normalisation, class
names, threshold, name, version) is read from the ONNX file's metadata_props, written by
`pneumoscan export-onnx`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .preprocess import Preprocessing

META_PREFIX = "pneumoscan."
DEFAULT_MODEL_NAME = "default.onnx"


class ModelError(RuntimeError):
    """The model cannot be used (run-level error)."""


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


def default_model_path() -> Path:
    return Path(str(resources.files("pneumoscan.models").joinpath(DEFAULT_MODEL_NAME)))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_props(meta: dict) -> dict[str, str]:
    """Model metadata as ONNX metadata_props (string values, namespaced keys)."""
    return {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_model_info(path: Path, custom: dict[str, str]) -> ModelInfo:
    """ModelInfo from an ONNX session's custom metadata map."""
    meta = {k[len(META_PREFIX):]: v for k, v in custom.items() if k.startswith(META_PREFIX)}
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


def open_session(path: Path, device: str = "auto", threads: int | None = None):
    """An ONNX Runtime session and the provider that really runs it.

    ORT silently falls back to CPU when CUDA cannot load; we check what it did: `cuda` then
    fails loudly, `auto` takes CPU quietly (ORT's own error log is muted)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}")
    if not Path(path).is_file():
        raise ModelError(f"model file not found: {path}")
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    wants_cuda = device in ("auto", "cuda") and \
        "CUDAExecutionProvider" in ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if wants_cuda else []) + ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise ModelError(f"cannot load model {path}: {exc}") from exc
    provider = session.get_providers()[0]
    if device == "cuda" and provider != "CUDAExecutionProvider":
        raise ModelError("--device cuda: the CUDA execution provider could not be loaded "
                         "(no GPU, or CUDA/cuDNN libraries missing); use --device cpu or auto")
    return session, provider
