"""Command line: a thin layer over `pneumoscan.api`. The exit codes of `pneumoscan run` are
those of `pneumoscan.run.exits` (its --help lists them; docs/CRON.md says what to do about
each)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import click

from pneumoscan import __version__, api
from pneumoscan.files import write_atomic
from pneumoscan.inference.model import DEVICES, ModelError
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, stuck
from pneumoscan.inference.ray_engine import RayOptions
from pneumoscan.inputs import MAX_INSTANCE_BYTES, is_dicomweb_url
from pneumoscan.run.exits import exit_codes_help
from pneumoscan.run.listen import DEFAULT_SETTLE, ListenEvents
from pneumoscan.text import format_duration, printable

log = logging.getLogger("pneumoscan")


def _setup_logging(verbose: int) -> None:
    """-v: pneumoscan's own log (each file, each output); -vv: its debug log and the
    libraries' (WeasyPrint's layout steps and font warnings, pydicom's decoder reports)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    log.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1
                 else logging.DEBUG)
    # WeasyPrint warns about its own optional font libraries (HarfBuzz-Subset) on every
    # render; that is not the user's business unless they ask for libraries' logs.
    logging.getLogger("weasyprint").setLevel(logging.INFO if verbose >= 2 else logging.ERROR)
    # pydicom logs every decoder that fails on a file, traceback and all, and warns about
    # attribute values that break the standard; the file's result already says what
    # matters. Filtered at our handlers: importing pydicom resets its loggers' level.
    libraries = verbose >= 2
    for handler in logging.getLogger().handlers:
        if libraries:
            handler.removeFilter(_not_pydicom)
        else:
            handler.addFilter(_not_pydicom)
    if not libraries:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
        # highdicom warns when a copied source attribute is unusual (a one-word name).
        warnings.filterwarnings("ignore", category=UserWarning, module=r"highdicom\.")


def _not_pydicom(record: logging.LogRecord) -> bool:
    return not record.name.startswith("pydicom")


def fail(message: str, code: int = api.EXIT_FATAL) -> None:
    click.echo(f"pneumoscan: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pneumoscan")
def main() -> None:
    """Classify chest X-rays (PNG, JPEG, TIFF, DICOM) as NORMAL or PNEUMONIA, show the
    regions behind each decision as class activation maps, and write reports.

    Research use only; not a medical diagnosis."""


model_option = click.option("--model", "model_path",
                            type=click.Path(path_type=Path, dir_okay=False),
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

threshold_option = click.option("--threshold", type=click.FloatRange(0, 1),
                                help="decision threshold (default: the model's own, chosen "
                                     "on validation)")


def _options(*decorators):
    """Several click options as one decorator, in the order given."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


# How `run` and `listen` classify.
classify_options = _options(model_option, device_option, batch_option, workers_option,
                            threshold_option)

# DICOM TLS: listen's server, and the client of --push dicom+tls://.
tls_options = _options(
    click.option("--tls-cert", type=click.Path(exists=True, path_type=Path, dir_okay=False),
                 help="DICOM TLS: this node's certificate (PEM), with --tls-key: listen "
                      "serves with it, --push dicom+tls:// presents it"),
    click.option("--tls-key", type=click.Path(exists=True, path_type=Path, dir_okay=False)),
    click.option("--tls-ca", type=click.Path(exists=True, path_type=Path, dir_okay=False),
                 help="DICOM TLS: the CA that signs the peers' certificates (listen: callers "
                      "must present one; --push dicom+tls://: the server's is checked "
                      "against it, else against the system's CAs)"))


def _tls(certificate: Path | None, key: Path | None, ca: Path | None):
    """TlsOptions from the --tls-* options, or None when none is given."""
    from pneumoscan.tls import TlsOptions

    if (certificate is None) != (key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    return TlsOptions(certificate, key, ca) if certificate or ca else None


# The outputs of `run` and of `listen` (whose runs are `run`s of its spool).
outputs_options = _options(
    click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
                 help="report file: .pdf (PDF/A) or .html (one file for the whole run)"),
    click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
                 help="machine-readable results (schema in docs/RESULTS_JSON.md)"),
    click.option("--per-study", type=click.Path(path_type=Path, file_okay=False),
                 help="also write one HTML and one PDF per study into this folder"))
state_options = _options(
    click.option("--state", "state_path", type=click.Path(path_type=Path, dir_okay=False),
                 help="state ledger (SQLite) of earlier runs: only new or changed files are "
                      "computed (default: beside the JSON or report, NAME.pneumoscan.sqlite)"),
    click.option("--log", "log_path", type=click.Path(path_type=Path, dir_okay=False),
                 help="append this run's JSON-lines log here (default: beside the state "
                      "file, NAME.log.jsonl)"),
    click.option("--anonymize", is_flag=True,
                 help="a stable pseudonym instead of patient name, ID and birth date in the "
                      "reports and JSON"),
    click.option("--dicom-out", type=click.Path(path_type=Path, file_okay=False),
                 help="write DICOM outputs into this folder: per study an Encapsulated PDF "
                      "report, per classified DICOM image an SR and its CAM as a "
                      "Segmentation"),
    click.option("--dicom-sc", is_flag=True,
                 help="DICOM outputs: the CAM also as a Secondary Capture picture, for PACS "
                      "that cannot show segmentations"))


class Progress(api.RunEvents):
    """What a run tells on stderr: on a terminal, a bar for classifying and one for the
    per-study reports, each with the time left, and a line for the report; -v logs each
    file and output instead."""

    def __init__(self, enabled: bool, engine: str = "local"):
        self.enabled = enabled
        self.engine = engine
        self.bar: ProgressBar | None = None
        self.started = 0.0

    def waiting(self, state_path: Path) -> None:
        click.echo(f"waiting for the run that holds {state_path}", err=True)

    def model_opened(self, model) -> None:
        where = "Ray actors" if self.engine == "ray" else model.provider
        click.echo(f"model {model.info.name} {model.info.version} on {where}", err=True)

    def listing(self, done: int, total: int) -> None:
        if done == 0:
            log.info("listing the instances of %d studies", total)
            self._open_bar("listing studies", total)
        elif self.bar:
            self.bar.step()
        if done == total:
            self.close()

    def discovered(self, total: int) -> None:
        log.info("found %d files", total)
        self._open_bar("classifying", total)

    def result(self, result) -> None:
        log.info("%s: %s %s", printable(str(result.path)), result.status,
                 result.label if result.status == "ok" else result.reason)
        if self.bar:
            self.bar.step()

    def classified(self) -> None:
        self.close()

    def writing(self, what: str, path: Path, parts: int) -> None:
        if not parts:
            log.info("the %s %s is current", what, path)
            return
        log.info("writing the %s %s", what, path)
        self.started = time.monotonic()
        if what == "per-study":
            self._open_bar(f"per-study reports ({parts} due)", parts)
        elif self.enabled:
            click.echo(f"rendering the report {path} ...", err=True, nl=False)

    def wrote_part(self) -> None:
        if self.bar:
            self.bar.step()
            if self.bar.done:
                self.close()
        elif self.enabled and self.started:
            click.echo(f" {time.monotonic() - self.started:.1f} s", err=True)
        self.started = 0.0

    def _open_bar(self, label: str, total: int) -> None:
        if self.enabled and total:
            self.bar = ProgressBar(label, total)

    def close(self) -> None:
        """Ends the line of a bar or phase left open (also when the run is interrupted)."""
        if self.bar:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.started:
            click.echo("", err=True)
            self.started = 0.0


class ProgressBar:
    """click's bar on stderr with a truthful time left: from the rate observed since the
    first step (which pays for warm-up: the first batch, pipeline filling), never from a
    guess before it; none until a second has passed."""

    def __init__(self, label: str, total: int):
        self.total, self.count = total, 0
        self.warm: tuple[float, int] | None = None  # (time, count) at the first step
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                     show_eta=False, item_show_func=lambda text: text)
        self.bar.__enter__()

    @property
    def done(self) -> bool:
        return self.count >= self.total

    def step(self) -> None:
        self.count += 1
        self.bar.update(1, self.time_left(time.monotonic()))

    def time_left(self, now: float) -> str:
        if self.warm is None:
            self.warm = (now, self.count)
        since, counted = self.warm
        if now - since < 1.0 or self.count == counted:
            return "time left: measuring"
        seconds = (self.total - self.count) * (now - since) / (self.count - counted)
        return f"time left: {format_duration(seconds)}"

    def close(self) -> None:
        self.bar.__exit__(None, None, None)


class Duration(click.ParamType):
    """Seconds, given as 90, 90s, 30m or 2h."""
    name = "DURATION"
    UNITS = {"s": 1, "m": 60, "h": 3600}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:], None)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            seconds = -1
        if not seconds > 0 or seconds == float("inf"):
            self.fail(f"{value!r} is not a duration (90s, 30m, 2h)", param, ctx)
        return seconds


class Source(click.ParamType):
    """A folder or file that exists, or a DICOMweb base URL (kept as text)."""
    name = "FOLDER|URL"

    def convert(self, value, param, ctx):
        if is_dicomweb_url(value):
            return value
        return click.Path(exists=True, path_type=Path).convert(value, param, ctx)


@main.command(epilog=f"\b\nExit codes:\n{exit_codes_help()}")
@click.argument("scans", type=Source())
@outputs_options
@classify_options
@click.option("--cam-backend", type=click.Choice(["onnx", "torch"]), default="onnx",
              show_default=True, help="torch: CAMs via forward hooks from --checkpoint")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path, dir_okay=False),
              help="training checkpoint for --cam-backend torch")
@state_options
@click.option("--force", is_flag=True, help="compute every file again, ignoring the state")
@click.option("--wait", is_flag=True,
              help="when another run holds the state file, wait for it (default: exit 4)")
@click.option("--push", is_flag=False, flag_value="source", metavar="[URL]",
              help="send the DICOM outputs to a PACS: alone, the DICOMweb server SCANS "
                   "names (STOW-RS); or a DICOMweb URL; or dicom://AET@host:port (C-STORE)")
@tls_options
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]),
              help="a DICOMweb SCANS: only studies from this study date on")
@click.option("--max-instance-size", type=click.IntRange(1), metavar="MIB",
              default=MAX_INSTANCE_BYTES // 2**20, show_default=True,
              help="a DICOMweb SCANS: refuse an instance larger than this (decompressed)")
@click.option("--max-runtime", type=Duration(), metavar="DURATION",
              help="a DICOMweb SCANS: stop listing and retrieving after this long (90s, "
                   "30m, 2h); what is left is an error, done by the next run")
@click.option("--engine", type=click.Choice(api.ENGINES), default="local", show_default=True,
              help="ray: decode and classify on a Ray cluster (pip install "
                   "\"pneumoscan[ray]\"; docs/CLUSTER.md)")
@click.option("--ray-address", help="--engine ray: the cluster (auto, HOST:6379, "
                                    "ray://HOST:10001; default: RAY_ADDRESS, or a `ray start` "
                                    "cluster of this machine, else a Ray started for this "
                                    "run)")
@click.option("--ray-actors", type=click.IntRange(1),
              help="--engine ray: inference actors (default: as many as the cluster "
                   "holds, then as many as keep up)")
@click.option("--ray-actor-cpus", type=click.FloatRange(0.01), default=1.0, show_default=True,
              help="--engine ray: CPUs per inference actor (its ONNX Runtime threads)")
@click.option("--ray-actor-gpus", type=click.FloatRange(0),
              help="--engine ray: GPUs per inference actor (default: 1 on a cluster with "
                   "GPUs, unless --device cpu)")
@click.option("--ray-decode-cpus", type=click.FloatRange(0.01),
              help="--engine ray: decode in tasks of their own, of this many CPUs each "
                   "(default: CPU-only actors decode their own files; actors with a GPU "
                   "get them from tasks of 1 CPU)")
@click.option("-v", "--verbose", count=True,
              help="log each file and output (-vv: debug, and the libraries' and Ray's logs)")
def run(scans, out, json_path, per_study, model_path, device, batch_size, workers, threshold,
        cam_backend, checkpoint, state_path, force, wait, log_path, anonymize, dicom_out,
        dicom_sc, push, tls_cert, tls_key, tls_ca,
        since, max_instance_size, max_runtime, engine, ray_address, ray_actors,
        ray_actor_cpus, ray_actor_gpus,
        ray_decode_cpus, verbose):
    """Classify every image (PNG, JPEG, TIFF, DICOM) under SCANS and write a report and/or
    JSON.

    SCANS is a folder, or the base URL of a DICOMweb server (http:// or https://): its CR
    and DX studies are queried, the instances not seen before are retrieved and classified,
    and --push sends the DICOM outputs back (docs/PACS.md). Credentials come from
    PNEUMOSCAN_DICOMWEB_USER and PNEUMOSCAN_DICOMWEB_PASSWORD, or a netrc file.

    Safe to run from cron: each run computes only the files that are new or changed since
    the last one (recorded in the state file), and the outputs still cover all of SCANS.
    Progress and diagnostics go to stderr; the last lines on stdout name every output
    ("report: PATH", "json: PATH", "per-study: DIR", "state: PATH", "log: PATH")."""
    _setup_logging(verbose)
    options = api.RunOptions(scans, report=out, json=json_path, per_study=per_study,
                             model=model_path, device=device, batch_size=batch_size,
                             workers=workers, threshold=threshold, cam_backend=cam_backend,
                             checkpoint=checkpoint, state=state_path, log=log_path,
                             force=force, wait=wait, anonymize=anonymize,
                             dicom_out=dicom_out, dicom_sc=dicom_sc, push=push,
                             tls=_tls(tls_cert, tls_key, tls_ca),
                             since=since.date() if since else None,
                             max_instance_bytes=max_instance_size * 2**20,
                             max_runtime=max_runtime, engine=engine,
                             ray=RayOptions(ray_address, ray_actors, ray_actor_cpus,
                                            ray_actor_gpus, ray_decode_cpus, logs=verbose > 1))
    try:
        options.check()
    except api.RunError as exc:
        raise click.UsageError(str(exc)) from None
    progress = Progress(sys.stderr.isatty() and verbose == 0, engine)
    try:
        with _signals_interrupt():
            summary = api.run(options, progress)
    except api.RunError as exc:
        progress.close()
        fail(str(exc), exc.exit_code)
    except api.Interrupted as exc:
        progress.close()
        click.echo(f"pneumoscan: {exc}; what was computed is kept in {options.state_path} "
                   "for the next run", err=True)
        sys.exit(exc.exit_code)
    _tell_summary(summary, push is not None)
    for what, path in summary.outputs:
        click.echo(f"{what}: {path}")
    if stuck():
        # A file abandoned by the watchdog still holds a thread that may never end: the
        # outputs are written and the state closed, so exit without waiting for it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(summary.exit_code)
    sys.exit(summary.exit_code)


def _tell_summary(summary: api.RunSummary, pushed: bool) -> None:
    """The counts, each file not classified or out of scope, and what was sent, on stderr."""
    scan = summary.scan
    c = scan.counts()
    click.echo(f"{c.files} files ({scan.from_ledger} unchanged since the last run): "
               f"{c.classified} classified ({c.out_of_scope} outside the model's intended "
               f"use, {c.pneumonia} PNEUMONIA, {c.normal} NORMAL), "
               f"{c.skipped} skipped, {c.errors} unreadable", err=True)
    for r in scan.results:
        if r.status != "ok":
            click.echo(f"  {r.status}: {printable(str(r.path))}: {r.reason}", err=True)
        elif r.in_scope is False:
            click.echo(f"  out of scope: {printable(str(r.path))}: "
                       f"{'; '.join(r.scope_reasons)}", err=True)
    if pushed:
        click.echo(f"DICOM outputs sent for {len(summary.pushed)} studies; not sent for "
                   f"{len(summary.push_failures)} (the next run tries again)", err=True)
        for failure in summary.push_failures:
            click.echo(f"  not sent: {failure}", err=True)
        for refused in summary.not_accepted:
            click.echo(f"  not accepted (not sent again): {refused}", err=True)
    if summary.removed:
        click.echo(f"removed {len(summary.removed)} per-study report files of studies no "
                   "longer found", err=True)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGINT and SIGTERM raise api.Interrupted while the run goes on (the run log records
    it, the state is closed cleanly); the previous handlers are back afterwards."""
    def interrupt(signum, frame):
        raise api.Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class ListenProgress(ListenEvents):
    """What `listen` tells on stderr: each association, instance and refusal (the
    pneumoscan.listen log), each study published and each run's summary."""

    def listening(self, port: int) -> None:
        click.echo(f"listening on port {port}", err=True)

    def published(self, study_uid: str, instances: int) -> None:
        click.echo(f"study {study_uid}: {instances} new instances settled; classifying",
                   err=True)

    def ran(self, summary: api.RunSummary) -> None:
        _tell_summary(summary, bool(summary.pushed or summary.push_failures))

    def run_failed(self, error: api.RunError) -> None:
        click.echo(f"pneumoscan: error: {error} (kept; tried again later)", err=True)


@main.command()
@click.argument("spool", type=click.Path(path_type=Path, file_okay=False))
@click.option("--port", type=click.IntRange(0, 65535), default=11112, show_default=True,
              help="TCP port of the C-STORE SCP (0: any free port, told on stderr)")
@click.option("--host", default="", help="address to listen on (default: every interface)")
@click.option("--ae-title", default="PNEUMOSCAN", show_default=True,
              help="this node's AE title: callers must call it")
@click.option("--allow", "allowed", multiple=True, metavar="AET",
              help="calling AE title allowed to associate (repeat; default: any)")
@click.option("--settle", type=click.FloatRange(0.1), default=DEFAULT_SETTLE,
              show_default=True,
              help="seconds without a new instance of a study before it is classified")
@click.option("--max-associations", type=click.IntRange(1), default=4, show_default=True)
@click.option("--max-instance-mb", type=click.IntRange(1), default=256, show_default=True,
              help="instances larger than this are refused (0xA700)")
@tls_options
@outputs_options
@classify_options
@state_options
@click.option("--push", metavar="URL",
              help="send the DICOM outputs of each study to a PACS: a DICOMweb URL "
                   "(STOW-RS) or dicom://AET@host:port (C-STORE; dicom+tls:// over DICOM TLS)")
@click.option("-v", "--verbose", count=True,
              help="log each file and output (-vv: debug, and the libraries' logs)")
def listen(spool, port, host, ae_title, allowed, settle, max_associations, max_instance_mb,
           tls_cert, tls_key, tls_ca, out, json_path, per_study, model_path, device,
           batch_size, workers, threshold, state_path, log_path, anonymize, dicom_out, dicom_sc,
           push,
           verbose):
    """Receive images by DICOM C-STORE into SPOOL and classify each study once it has
    settled, as `pneumoscan run SPOOL` would (the same outputs, state and --push).

    Each instance is on disk (fsync) before its C-STORE is answered with success; a full
    disk answers 0xA700. Only CR and DX images are accepted (other SOP classes: 0x0122).
    Every association, instance and refusal is logged on stderr. Runs in the foreground
    until SIGTERM or Ctrl-C (a systemd unit is in docs/PACS.md); started again after a
    crash, it finishes what was received but not classified or sent."""
    from pneumoscan.inputs.receiver import ReceiverOptions
    from pneumoscan.run.listen import ListenOptions
    from pneumoscan.run.listen import listen as listen_until_stopped

    _setup_logging(verbose)
    logging.getLogger("pneumoscan.listen").setLevel(logging.INFO)
    tls = _tls(tls_cert, tls_key, tls_ca)
    if tls and not tls.certificate:
        raise click.UsageError("listen serves DICOM TLS with --tls-cert and --tls-key")
    receiver = ReceiverOptions(port=port, ae_title=ae_title, host=host, allow=tuple(allowed),
                               max_associations=max_associations,
                               max_instance_bytes=max_instance_mb * 1024 * 1024, tls=tls)
    run_options = api.RunOptions(spool, report=out, json=json_path, per_study=per_study,
                                 model=model_path, device=device, batch_size=batch_size,
                                 workers=workers, threshold=threshold, state=state_path,
                                 log=log_path, anonymize=anonymize, dicom_out=dicom_out,
                                 dicom_sc=dicom_sc, push=push, tls=tls)
    try:
        run_options.check()
    except api.RunError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        with _signals_interrupt():
            listen_until_stopped(ListenOptions(spool, receiver, settle), run_options,
                                 ListenProgress())
    except api.RunError as exc:
        fail(str(exc), exc.exit_code)
    except api.Interrupted as exc:
        click.echo(f"pneumoscan: {exc}; what was received is kept in {spool}", err=True)
        sys.exit(exc.exit_code)


scope_train_images_option = click.option(
    "--scope-train-images", type=click.IntRange(100), metavar="N",
    help="fit the scope guard on N training images at most, evenly spread (default: all; "
         "the network's pass over them is most of the time the fit takes)")
scope_view_option = click.option(
    "--scope-view", type=click.Choice(["stored", "direct"]), default="stored",
    show_default=True,
    help="what the scope guard reads: 'stored', the input as the training copies were "
         "stored (JPEG q75, averaged over 4x4 pixels) through a copy of the trunk at that "
         "quarter size; 'direct', the network's own activations at its three coarsest "
         "resolutions (no copy: for networks with an input low-pass; docs/MODEL_CARD.md "
         "compares the two)")


@main.command("export-onnx")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--check-images", type=click.Path(exists=True, path_type=Path),
              help="real images for the PyTorch/ONNX parity check (default: the "
                   "checkpoint's validation images, when present)")
@click.option("--model-version", help="version string stored in the model (default: today)")
@click.option("--name", help="model name stored in the model (default: pneumoscan-ARCH-RUN, "
                             "RUN being the checkpoint's folder)")
@click.option("--force", is_flag=True,
              help="export even when the checkpoint's validation AUC is far below the default "
                   "model's, or not recorded")
@click.option("--int8", is_flag=True,
              help="also write OUT.int8.onnx: static int8 quantisation (QDQ, per-channel), "
                   "for CPUs")
@click.option("--fp16", is_flag=True, help="also write OUT.fp16.onnx: half precision, for GPUs")
@click.option("--calibration-images", type=click.Path(exists=True, path_type=Path),
              help="--int8 calibration images (default: the checkpoint's training split)")
@click.option("--calibration-count", type=click.IntRange(1),
              help="how many calibration images, evenly spread (default: 200)")
@click.option("--eval-images", type=click.Path(exists=True, path_type=Path),
              help="labelled folder ({NORMAL,PNEUMONIA}/...) or CSV on which --int8/--fp16 "
                   "models are compared with float32 (default: the checkpoint's validation "
                   "split)")
@click.option("--scope-split", type=click.Path(exists=True, path_type=Path, dir_okay=False),
              help="split.json ({\"train\": [...], \"val\": [...]}) whose images fit the "
                   "scope guard (default: the one training wrote beside the checkpoint)")
@scope_train_images_option
@scope_view_option
@click.option("--no-scope-guard", is_flag=True,
              help="write the model without a scope guard (no out-of-distribution score)")
def export_onnx(checkpoint, out, check_images, model_version, name, force, int8, fp16,
                calibration_images, calibration_count, eval_images, scope_split,
                scope_train_images, scope_view, no_scope_guard):
    """Export a training CHECKPOINT to the ONNX model that `run` uses, and check that ONNX
    Runtime matches PyTorch on real images (class scores to < 1e-4, normalised CAMs to
    < 1e-3).

    Prints the checkpoint's validation metrics, and refuses (exit 1, nothing written; --force
    exports anyway) a checkpoint whose validation AUC is more than 0.05 below the default
    model's. --int8 and --fp16 copies are written only if their validation AUC is at most
    0.005 below the float32 model's and their scope guard flags a share of the validation
    images within 2 points of float32's; otherwise the command says by how much they missed,
    writes no copy and exits with status 1 (the float32 model is written either way)."""
    from pneumoscan.evaluation.metrics import format_validation
    from pneumoscan.modelling.checkpoint import read_checkpoint
    from pneumoscan.modelling.export import (
        ExportError,
        export_checkpoint,
        export_name,
        shortfall,
    )
    from pneumoscan.modelling.quantize import QuantizeError, export_reduced

    try:
        payload = read_checkpoint(checkpoint)
        default = api.open_model(device="cpu").info
    except ModelError as exc:
        fail(str(exc))
    metrics = payload.get("metrics") or {}
    name = name or export_name(checkpoint, payload)
    click.echo(f"validation: {format_validation(metrics)}")
    click.echo(f"default model {default.name} {default.version}: "
               f"{format_validation(default.validation_metrics)}")
    problem = shortfall(metrics, default.validation_metrics)
    if problem and not force:
        fail(f"{problem}: not exported (--force exports it anyway)")
    if problem:
        click.echo(f"pneumoscan: warning: {problem}; exported because of --force", err=True)
    try:
        export_checkpoint(checkpoint, out, check_images, model_version, name,
                          log=lambda m: click.echo(m), scope_split=scope_split,
                          scope_guard=not no_scope_guard, scope_train_images=scope_train_images,
                          scope_view=scope_view)
    except (ExportError, ModelError) as exc:
        fail(str(exc))
    click.echo(f"wrote {out}: model {name}")
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


@main.command("scope-guard")
@click.argument("model_path", type=click.Path(exists=True, path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="where to write the guarded model (default: MODEL_PATH, in place)")
@click.option("--split", "split_path", type=click.Path(exists=True, path_type=Path,
                                                        dir_okay=False),
              help="split.json of the model's training run")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="without --split: the training data, split by patient as training does")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.15, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@scope_train_images_option
@scope_view_option
@click.option("--view-reduction", type=click.Choice(["1", "2", "4"]),
              help="the stored view averaged over N x N pixels before the trunk's copy reads "
                   "it (default 4: a sixteenth of the trunk's cost; more leaves the trunk too "
                   "little)")
@click.option("--replace", is_flag=True,
              help="replace the guard the model has (default: refuse a guarded model)")
def scope_guard(model_path, out, split_path, data, val_fraction, seed, scope_train_images,
                scope_view, view_reduction, replace):
    """Fit the scope guard of an exported ONNX model (one exported without it, or before
    it existed, or with --replace one whose guard is to be fitted anew) on its training
    images; its threshold flags at most 5% of the validation images. `export-onnx` does
    this itself."""
    from pneumoscan.modelling.scope_guard import (
        VIEW_REDUCTION,
        ScopeFitError,
        fit_scope_guard,
        read_split,
    )

    try:
        if split_path is not None:
            train, val = read_split(split_path)
        elif data is not None:
            from pneumoscan.evaluation.datasets import list_samples, split_by_patient

            parts = split_by_patient(list_samples(data), val_fraction, seed)
            train, val = ([s.path for s in part] for part in parts)
        else:
            fail("give --split FILE or --data FOLDER", api.EXIT_USAGE)
        fit_scope_guard(model_path, train, val, out=out, log=lambda m: click.echo(m),
                        max_train=scope_train_images, view=scope_view,
                        view_reduction=int(view_reduction or VIEW_REDUCTION),
                        replace=replace)
    except (ScopeFitError, ModelError, FileNotFoundError) as exc:
        fail(str(exc))
    click.echo(f"wrote {out or model_path}")


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
@click.option("--reliability", "reliability_path",
              type=click.Path(path_type=Path, dir_okay=False),
              help="reliability diagram PNG (calibration curve)")
@click.option("--bootstrap", type=click.IntRange(100, 100000), default=1000, show_default=True)
def evaluate(data, model_path, device, batch_size, workers, threshold, json_path, roc_path,
             reliability_path, bootstrap):
    """Metrics of the model on a labelled DATA folder ({NORMAL,PNEUMONIA}/...) or CSV:
    accuracy, sensitivity, specificity, AUC, F1 with bootstrap 95% CIs, confusion matrix;
    calibration slope and intercept, Brier score and ECE with bootstrap 95% CIs."""
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

        write_atomic(json_path, json.dumps(report, indent=1).encode(), mode=0o644)
    if roc_path:
        from pneumoscan.evaluation.evaluate import write_roc

        write_roc(report, roc_path)
    if reliability_path:
        from pneumoscan.evaluation.evaluate import write_reliability

        write_reliability(report, reliability_path)


@main.command("info")
@model_option
@click.option("--json", "as_json", is_flag=True, help="everything the model says, as JSON")
def info(model_path, as_json):
    """Show the model in use: name, version, input, threshold, validation metrics."""
    from pneumoscan.evaluation.metrics import format_validation

    try:
        model = api.open_model(model_path, "cpu")
    except ModelError as exc:
        fail(str(exc))
    i = model.info
    if as_json:
        click.echo(json.dumps(i.to_json(), indent=1))
        return
    p = i.preprocessing
    extra = i.to_json()
    rule = f" ({extra['threshold_rule']})" if "threshold_rule" in extra else ""
    jpeg = f", JPEG quality {p.jpeg_quality} round trip" if p.jpeg_quality else ""
    rows = [("model", f"{i.name} {i.version} ({i.arch})"), ("file", str(i.path)),
            ("sha256", i.sha256),
            ("classes", (f"{', '.join(i.class_names)} (positive: "
                         f"{i.class_names[i.positive_class]})")),
            ("threshold", f"{i.threshold:.3f}{rule}"),
            ("input", (f"{p.width} x {p.height}, {p.channels} channels, {p.resize} resize"
                       f"{jpeg}, mean {_numbers(p.mean)}, std {_numbers(p.std)}")),
            ("trained on", f"{extra.get('training_data') or 'not recorded'}"
                           + (f", {extra['trained_epochs']} epochs"
                              if "trained_epochs" in extra else "")),
            ("exported", str(extra.get("exported", "not recorded"))),
            ("validation", format_validation(i.validation_metrics)),
            ("calibration", _calibration_text(extra.get("calibration"))),
            ("scope guard", _scope_guard_text(extra.get("scope_guard")))]
    for label, value in rows:
        click.echo(f"{label + ':':<12} {value}")


def _calibration_text(calibration: dict | None) -> str:
    """Platt scaling (temperature and bias) since 2026-12-01; temperature alone before;
    {"method": "none", ...} for checkpoints trained without."""
    if not calibration or calibration.get("method") == "none":
        return "none (the network's own probabilities)"
    bias = calibration.get("bias")
    text = (f"Platt scaling, T {calibration['temperature']:.3f}, b {bias:+.3f}" if bias is not None
            else f"temperature scaling, T {calibration['temperature']:.3f}")
    if "ece_before" in calibration and "ece_after" in calibration:
        text += (f": ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.4f} "
                 "on validation")
    return text


def _scope_guard_text(guard: dict | None) -> str:
    if not guard:
        return "none (DICOM age and view rules only)"
    quality = guard.get("view_jpeg_quality")
    view = ("on the network's own activations" if guard.get("view") == "direct"
            else f"through a JPEG quality {quality} round trip" if quality
            else "through the model's own input")
    reduction = guard.get("view_reduction", 1)
    size = f" at 1/{reduction} size" if reduction > 1 else ""
    return (f"{len(guard['layers'])} layers {view}{size}, threshold {guard['threshold']:.3f} "
            f"({guard['val_flagged']:.1%} of {guard['val_images']} validation images flagged)")


def _numbers(values: tuple[float, ...]) -> str:
    """(0.498, 0.498, 0.498) -> "0.498"; different values -> "0.485/0.456/0.406"."""
    return "/".join(dict.fromkeys(f"{v:.3f}" for v in values))
