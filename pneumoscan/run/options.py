"""What a run is asked to do (RunOptions, the command line's options as data), where its
state and log go by default, and the checks that refuse a run before it starts."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE
from pneumoscan.inference.ray_engine import RayOptions
from pneumoscan.inputs import MAX_INSTANCE_BYTES, is_dicomweb_url
from pneumoscan.report import report_format
from pneumoscan.run.exits import EXIT_USAGE, RunError
from pneumoscan.tls import TlsOptions

ENGINES = ("local", "ray")  # this process's threads, or a Ray cluster (ray_engine)


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
    # A DICOMweb source: the largest instance retrieved (bytes, once decompressed), and
    # the most seconds the run spends listing and retrieving (what is left is done by the
    # next run).
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    max_runtime: float | None = None

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
    def renders(self) -> bool:
        """Whether an output shows the report pictures (reports, DICOM outputs)."""
        return self.report is not None or self.per_study is not None or self.dicom_outputs

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
        if self.max_runtime is not None and not self.from_pacs:
            raise RunError("--max-runtime applies to a DICOMweb source (an http(s):// URL)",
                           EXIT_USAGE)
        self._check_servers()
        if self.report is not None:
            try:
                report_format(self.report)
            except ValueError:
                raise RunError(f"--out must end in .pdf or .html, not {self.report.name!r}",
                               EXIT_USAGE) from None
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

    def _check_servers(self) -> None:
        """The source URL and --push value, checked before anything is created: no
        credentials in a URL (a log would record them) or going unencrypted to another
        machine, a destination that parses. Nothing is connected to."""
        if not (self.from_pacs or self.push is not None):
            return
        from pneumoscan.dicomout.push import destination
        from pneumoscan.inputs.dicomweb import PacsError, session_for

        try:
            if self.from_pacs:
                session_for(str(self.scans), environment_credentials=True).close()
            if self.push is not None:
                destination(self.push, self.scans, self.tls)
        except PacsError as exc:
            raise RunError(str(exc), EXIT_USAGE) from None

    def outputs(self) -> list[tuple[str, Path]]:
        """(what, path) of every output the run writes, as given (or defaulted)."""
        given = [("report", self.report), ("json", self.json), ("per-study", self.per_study),
                 ("dicom-out", self.dicom_out)]
        return [(what, path) for what, path in given if path is not None] + [
            ("state", self.state_path), ("log", self.log_path)]

    def check_outputs(self) -> None:
        """Raises RunError naming the path as given when an output cannot be written
        there; leaves nothing (a probe file is created and removed in each folder)."""
        for what, path in self.outputs():
            check_writable(path, what, folder=what in ("per-study", "dicom-out"))


def check_writable(path: Path, what: str, *, folder: bool = False) -> None:
    """Raises RunError unless `path` (a file, or with `folder` a folder) can be written:
    it is of that kind if it exists, and a file can be created in the nearest folder that
    exists on its way (and is removed at once)."""
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
    # os.access trusts permission bits, which say yes to root everywhere (/proc, a
    # read-only mount): a file created and removed there is the only sure answer.
    try:
        with tempfile.NamedTemporaryFile(dir=nearest, prefix=".pneumoscan-probe-"):
            pass
    except OSError as exc:
        raise RunError(f"cannot write the {what} {path}: {exc.strerror or exc} "
                       f"(in {nearest})") from None


def default_state_path(json_path: Path | None, report_path: Path | None,
                       per_study: Path | None, dicom_out: Path | None = None) -> Path:
    """Next to the outputs: `results.json` -> `results.pneumoscan.sqlite` (the JSON file
    first, then the report), else inside the per-study or DICOM output folder."""
    beside = json_path or report_path
    if beside is not None:
        return beside.with_name(f"{beside.stem}.pneumoscan.sqlite")
    folder = per_study or dicom_out
    if folder is None:
        raise ValueError("a run with no file output needs its state path given")
    return folder / "pneumoscan.sqlite"


def default_log_path(state_path: Path) -> Path:
    return state_path.with_suffix(".log.jsonl")
