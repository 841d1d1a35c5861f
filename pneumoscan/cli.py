"""Command line: a thin layer over `pneumoscan.api`.

Exit codes of `pneumoscan run` (docs/CRON.md):
  0  every file classified, or skipped for a stated reason
  1  fatal error: the run could not be done (bad model, unusable state file, unwritable output)
  2  usage error (bad command line)
  3  the run completed, but some files could not be read (listed with reasons)
  4  another run holds the state file: this run did nothing (see --wait)
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click

from pneumoscan import __version__, api
from pneumoscan.inference.model import DEVICES, ModelError
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE
from pneumoscan.inference.ray_engine import RayOptions
from pneumoscan.modelling.quantize import CALIBRATION_IMAGES

log = logging.getLogger("pneumoscan")

def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # WeasyPrint warns about its own optional font libraries (HarfBuzz-Subset) on every
    # render; that is not the user's business unless they ask for logs.
    logging.getLogger("weasyprint").setLevel(level if verbose else logging.ERROR)
    # pydicom logs every decoder that fails on a file, traceback and all, and warns about
    # attribute values that break the standard; the file's result already says what
    # matters. Filtered at our handlers: importing pydicom resets its loggers' level.
    for handler in logging.getLogger().handlers:
        if verbose:
            handler.removeFilter(_not_pydicom)
        else:
            handler.addFilter(_not_pydicom)
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def _not_pydicom(record: logging.LogRecord) -> bool:
    return not record.name.startswith("pydicom")


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


class Progress(api.RunEvents):
    """What a run tells on stderr: a progress bar on a terminal, nothing otherwise; -v logs
    each file instead."""

    def __init__(self, enabled: bool, engine: str = "local"):
        self.enabled = enabled
        self.engine = engine
        self.bar = None

    def waiting(self, state_path: Path) -> None:
        click.echo(f"waiting for the run that holds {state_path}", err=True)

    def model_opened(self, model) -> None:
        where = "Ray actors" if self.engine == "ray" else model.provider
        click.echo(f"model {model.info.name} {model.info.version} on {where}", err=True)

    def discovered(self, total: int) -> None:
        log.info("found %d files", total)
        if self.enabled and total:
            self.bar = click.progressbar(length=total, label="classifying", file=sys.stderr)
            self.bar.__enter__()

    def result(self, result) -> None:
        log.info("%s: %s %s", result.path, result.status,
                 result.label if result.status == "ok" else result.reason)
        if self.bar:
            self.bar.update(1)

    def classified(self) -> None:
        if self.bar:
            self.bar.__exit__(None, None, None)
            self.bar = None


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
@click.option("--state", "state_path", type=click.Path(path_type=Path, dir_okay=False),
              help="state ledger (SQLite) of earlier runs: only new or changed files are "
                   "computed (default: beside the JSON or report, NAME.pneumoscan.sqlite)")
@click.option("--force", is_flag=True, help="compute every file again, ignoring the state")
@click.option("--wait", is_flag=True,
              help="when another run holds the state file, wait for it (default: exit 4)")
@click.option("--log", "log_path", type=click.Path(path_type=Path, dir_okay=False),
              help="append this run's JSON-lines log here (default: beside the state file, "
                   "NAME.log.jsonl)")
@click.option("--anonymize", is_flag=True,
              help="a stable pseudonym instead of patient name, ID and birth date in the "
                   "reports and JSON")
@click.option("--engine", type=click.Choice(api.ENGINES), default="local", show_default=True,
              help="ray: decode and classify on a Ray cluster (pip install "
                   "\"pneumoscan[ray]\"; docs/CLUSTER.md)")
@click.option("--ray-address", help="--engine ray: the cluster (auto, HOST:6379, "
                                    "ray://HOST:10001; default: a Ray started for this run)")
@click.option("--ray-actors", type=click.IntRange(1),
              help="--engine ray: inference actors (default: as many as keep up, from 1)")
@click.option("--ray-actor-cpus", type=click.FloatRange(0.01), default=1.0, show_default=True,
              help="--engine ray: CPUs per inference actor (its ONNX Runtime threads)")
@click.option("--ray-actor-gpus", type=click.FloatRange(0),
              help="--engine ray: GPUs per inference actor (default: 1 on a cluster with "
                   "GPUs, unless --device cpu)")
@click.option("--ray-decode-cpus", type=click.FloatRange(0.01), default=1.0,
              show_default=True, help="--engine ray: CPUs per decoding task")
@click.option("-v", "--verbose", count=True, help="log each file (-vv: debug and Ray's logs)")
def run(scans, out, json_path, per_study, model_path, device, batch_size, workers, threshold,
        cam_backend, checkpoint, state_path, force, wait, log_path, anonymize, engine,
        ray_address, ray_actors, ray_actor_cpus, ray_actor_gpus, ray_decode_cpus, verbose):
    """Classify every image under SCANS and write a report and/or JSON.

    Safe to run from cron: each run computes only the files that are new or changed since
    the last one (recorded in the state file), and the outputs still cover all of SCANS."""
    _setup_logging(verbose)
    options = api.RunOptions(scans, report=out, json=json_path, per_study=per_study,
                             model=model_path, device=device, batch_size=batch_size,
                             workers=workers, threshold=threshold, cam_backend=cam_backend,
                             checkpoint=checkpoint, state=state_path, log=log_path,
                             force=force, wait=wait, anonymize=anonymize, engine=engine,
                             ray=RayOptions(ray_address, ray_actors, ray_actor_cpus,
                                            ray_actor_gpus, ray_decode_cpus, logs=verbose > 1))
    try:
        options.check()
    except api.RunError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        summary = api.run(options, Progress(sys.stderr.isatty() and verbose == 0, engine))
    except api.RunError as exc:
        fail(str(exc), exc.exit_code)
    scan = summary.scan
    c = scan.counts()
    click.echo(f"{c.files} files ({scan.from_ledger} unchanged since the last run): "
               f"{c.classified} classified ({c.pneumonia} PNEUMONIA, {c.normal} NORMAL), "
               f"{c.skipped} skipped, {c.errors} unreadable", err=True)
    for r in scan.results:
        if r.status != "ok":
            click.echo(f"  {r.status}: {r.path}: {r.reason}", err=True)
    sys.exit(summary.exit_code)


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
    from pneumoscan.modelling.export import ExportError, export_checkpoint
    from pneumoscan.modelling.quantize import QuantizeError, export_reduced

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
    from pneumoscan.evaluation.evaluate import evaluate_dataset, format_report

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
        from pneumoscan.evaluation.evaluate import write_roc

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
