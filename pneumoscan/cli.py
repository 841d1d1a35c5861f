"""Command line: a thin layer over `pneumoscan.api`.

Exit codes: 0 every file classified or skipped for a stated reason; 3 the run completed
but some files could not be read (listed with reasons); 2 usage error; 1 fatal error.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__, api
from .model import DEVICES, ModelError
from .pipeline import DEFAULT_BATCH_SIZE
from .quantize import CALIBRATION_IMAGES

log = logging.getLogger("pneumoscan")

REPORT_SUFFIXES = (".pdf", ".html", ".htm")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)


def fail(message: str, code: int = api.EXIT_FATAL) -> None:
    click.echo(f"pneumoscan: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pneumoscan")
def main() -> None:
    """Classify chest X-rays (PNG, JPEG, DICOM) as NORMAL or PNEUMONIA, show the regions
    behind each decision as class activation maps, and write reports.

    Research use only; not a medical diagnosis."""


model_option = click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False),
                            help="ONNX model from `pneumoscan export-onnx` (default: the "
                                 "model shipped with pneumoscan).")
device_option = click.option("--device", type=click.Choice(DEVICES), default="auto",
                             show_default=True,
                             help="auto: CUDA when its provider really loads, else CPU.")
batch_option = click.option("--batch-size", type=click.IntRange(1, 4096),
                            default=DEFAULT_BATCH_SIZE,
                            show_default=True)
workers_option = click.option("--workers", type=click.IntRange(1, 64),
                              help="decoding threads (default: up to 4, one per core)")


class Progress:
    """A progress bar on a terminal, nothing otherwise; -v logs each file instead."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def start(self, total: int) -> None:
        log.info("found %d files", total)
        if self.enabled and total:
            self.bar = click.progressbar(length=total, label="classifying", file=sys.stderr)
            self.bar.__enter__()

    def update(self, result) -> None:
        log.info("%s: %s %s", result.path, result.status,
                 result.label if result.status == "ok" else result.reason)
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)


@main.command()
@click.argument("scans", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="report file: .pdf or .html (one file for the whole run)")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="machine-readable results (schema in docs/RESULTS_JSON.md)")
@click.option("--per-study", type=click.Path(path_type=Path, file_okay=False),
              help="also write one HTML and one PDF per study into this folder")
@model_option
@device_option
@batch_option
@workers_option
@click.option("--threshold", type=click.FloatRange(0, 1),
              help="decision threshold (default: the model's own, chosen on validation)")
@click.option("--cam-backend", type=click.Choice(["onnx", "torch"]), default="onnx",
              show_default=True, help="torch: CAMs via forward hooks from --checkpoint")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path, dir_okay=False),
              help="training checkpoint for --cam-backend torch")
@click.option("-v", "--verbose", count=True, help="log each file (-vv: debug)")
def run(scans, out, json_path, per_study, model_path, device, batch_size, workers, threshold,
        cam_backend, checkpoint, verbose):
    """Classify every image under SCANS and write a report and/or JSON."""
    _setup_logging(verbose)
    if out is None and json_path is None and per_study is None:
        raise click.UsageError("give --out REPORT.pdf|.html, --json FILE or --per-study DIR")
    if out is not None and out.suffix.lower() not in REPORT_SUFFIXES:
        raise click.UsageError(f"--out must end in .pdf or .html, not {out.name!r}")
    try:
        model = api.open_model(model_path, device, cam_backend, checkpoint)
    except ModelError as exc:
        fail(str(exc))
    click.echo(f"model {model.info.name} {model.info.version} on {model.provider}", err=True)
    progress = Progress(enabled=sys.stderr.isatty() and verbose == 0)
    try:
        result = api.scan(scans, model, batch_size=batch_size, workers=workers,
                          threshold=threshold, render=out is not None or per_study is not None,
                          on_result=progress.update, on_discovered=progress.start)
    finally:
        progress.close()
    try:
        if json_path:
            api.write_json(json_path, result)
        if out or per_study:
            from . import report

            if out:
                report.write_report(out, result.run, result.results)
            if per_study:
                report.write_per_study(per_study, result.run, result.results)
    except OSError as exc:
        fail(f"cannot write output: {exc}")
    c = result.counts()
    click.echo(f"{c['files']} files: {c['ok']} classified ({c['pneumonia']} PNEUMONIA, "
               f"{c['normal']} NORMAL), {c['skipped']} skipped, {c['error']} unreadable",
               err=True)
    for r in result.results:
        if r.status != "ok":
            click.echo(f"  {r.status}: {r.path}: {r.reason}", err=True)
    sys.exit(result.exit_code)


@main.command("export-onnx")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--check-images", type=click.Path(exists=True, path_type=Path),
              help="real images for the PyTorch/ONNX parity check (default: the "
                   "checkpoint's validation images, when present)")
@click.option("--model-version", help="version string stored in the model (default: today)")
@click.option("--name", help="model name stored in the model")
@click.option("--int8", is_flag=True,
              help="also write OUT.int8.onnx: static int8 quantisation (QDQ, per-channel), "
                   "for CPUs")
@click.option("--fp16", is_flag=True, help="also write OUT.fp16.onnx: half precision, for GPUs")
@click.option("--calibration-images", type=click.Path(exists=True, path_type=Path),
              help="--int8 calibration images (default: the checkpoint's training split)")
@click.option("--calibration-count", type=click.IntRange(1), default=CALIBRATION_IMAGES,
              show_default=True, help="how many calibration images, evenly spread")
@click.option("--eval-images", type=click.Path(exists=True, path_type=Path),
              help="labelled folder ({NORMAL,PNEUMONIA}/...) or CSV on which --int8/--fp16 "
                   "models are compared with float32 (default: the checkpoint's validation "
                   "split)")
def export_onnx(checkpoint, out, check_images, model_version, name, int8, fp16,
                calibration_images, calibration_count, eval_images):
    """Export a training CHECKPOINT to the ONNX model that `run` uses, and check that ONNX
    Runtime matches PyTorch on real images (class scores to < 1e-4, normalised CAMs to
    < 1e-3).

    --int8 and --fp16 copies are written only if their validation AUC is at most
    0.005 below the float32 model's; otherwise the command says by how much they missed,
    writes no copy and exits with status 1 (the float32 model is written either way)."""
    from .export import ExportError, export_checkpoint
    from .quantize import QuantizeError, export_reduced

    try:
        export_checkpoint(checkpoint, out, check_images, model_version, name,
                          log=lambda m: click.echo(m))
    except (ExportError, ModelError) as exc:
        fail(str(exc))
    click.echo(f"wrote {out}")
    refused = []
    for kind in [kind for kind, wanted in (("int8", int8), ("fp16", fp16)) if wanted]:
        try:
            export_reduced(checkpoint, out, [kind], calibration_images, calibration_count,
                           eval_images, log=lambda m: click.echo(m))
        except (QuantizeError, ModelError) as exc:
            click.echo(f"pneumoscan: error: {exc}", err=True)
            refused.append(kind)
    if refused:
        sys.exit(api.EXIT_FATAL)


@main.command("eval")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@model_option
@device_option
@batch_option
@workers_option
@click.option("--threshold", type=click.FloatRange(0, 1))
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--roc", "roc_path", type=click.Path(path_type=Path, dir_okay=False),
              help="ROC curve PNG")
@click.option("--bootstrap", type=click.IntRange(100, 100000), default=1000, show_default=True)
def evaluate(data, model_path, device, batch_size, workers, threshold, json_path, roc_path,
             bootstrap):
    """Metrics of the model on a labelled DATA folder ({NORMAL,PNEUMONIA}/...) or CSV:
    accuracy, sensitivity, specificity, AUC, F1 with bootstrap 95% CIs, confusion matrix."""
    from .evaluate import evaluate_dataset, format_report

    try:
        model = api.open_model(model_path, device)
        report = evaluate_dataset(data, model, batch_size=batch_size, workers=workers,
                                  threshold=threshold, n_boot=bootstrap)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    click.echo(format_report(report))
    if json_path:
        import json

        api.write_atomic(json_path, json.dumps(report, indent=1).encode(), mode=0o644)
    if roc_path:
        from .evaluate import write_roc

        write_roc(report, roc_path)


@main.command("info")
@model_option
def info(model_path):
    """Show the model's metadata."""
    try:
        model = api.open_model(model_path, "cpu")
    except ModelError as exc:
        fail(str(exc))
    i = model.info
    click.echo(f"name: {i.name}\nversion: {i.version}\narch: {i.arch}\nsha256: {i.sha256}\n"
               f"classes: {', '.join(i.class_names)}\nthreshold: {i.threshold}\n"
               f"preprocessing: {i.preprocessing}")
    for key, value in sorted(i.extra.items()):
        click.echo(f"{key}: {value}")
