"""The library API behind the CLI: open a model, scan a folder, write the outputs.

    from pneumoscan import api
    model = api.open_model()                      # the model shipped in the package
    scan = api.scan(Path("scans"), model)
    api.write_json(Path("results.json"), scan)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .cam import CamModel
from .discover import discover
from .files import write_atomic
from .model import ModelError, default_model_path
from .pipeline import DEFAULT_BATCH_SIZE, classify
from .records import FileResult, RunInfo

EXIT_OK = 0  # every file classified, or skipped for a stated reason
EXIT_FATAL = 1  # the run could not be done (bad model, unwritable output, ...)
EXIT_USAGE = 2  # bad command line
EXIT_UNREADABLE = 3  # the run completed, but some files could not be read (status error)


@dataclass
class Scan:
    run: RunInfo
    results: list[FileResult]

    @property
    def exit_code(self) -> int:
        return EXIT_UNREADABLE if any(r.status == "error" for r in self.results) else EXIT_OK

    def counts(self) -> dict[str, int]:
        c = {"files": len(self.results), "ok": 0, "skipped": 0, "error": 0}
        for r in self.results:
            c[r.status] += 1
        c["pneumonia"] = sum(r.label == "PNEUMONIA" for r in self.results)
        c["normal"] = sum(r.label == "NORMAL" for r in self.results)
        return c


def open_model(model_path: Path | None = None, device: str = "auto", cam_backend: str = "onnx",
               checkpoint: Path | None = None, threads: int | None = None) -> CamModel:
    """The ONNX model (default: the one shipped in the package), or with
    cam_backend="torch" the PyTorch checkpoint with forward-hook CAMs."""
    if cam_backend == "torch":
        if checkpoint is None:
            raise ModelError("--cam-backend torch needs --checkpoint FILE")
        from .cam.torch_hooks import TorchHookCamModel

        return TorchHookCamModel(checkpoint, device="cpu" if device == "cpu" else "auto")
    if cam_backend != "onnx":
        raise ModelError(f"unknown CAM backend {cam_backend!r}")
    from .cam.onnx_cam import OnnxCamModel

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


def scan(root: Path, model: CamModel, *, batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
         threshold: float | None = None, render: bool = True,
         on_result: Callable[[FileResult], None] | None = None,
         on_discovered: Callable[[int], None] | None = None) -> Scan:
    """Classify every file under `root`; one result per file found."""
    if not Path(root).exists():
        raise FileNotFoundError(f"no such file or folder: {root}")
    run = run_info(model, threshold)
    items = list(discover(Path(root)))
    if on_discovered:
        on_discovered(len(items))
    results = list(classify(items, model, batch_size=batch_size, workers=workers,
                            threshold=threshold, render=render, on_result=on_result))
    run.finished = now_iso()
    return Scan(run, results)


def results_json(scan_: Scan) -> dict:
    return {"schema": "pneumoscan-results-1", "run": scan_.run.to_json(),
            "counts": scan_.counts(), "results": [r.to_json() for r in scan_.results]}


def write_json(path: Path, scan_: Scan) -> None:
    write_atomic(path, json.dumps(results_json(scan_), indent=1).encode())
