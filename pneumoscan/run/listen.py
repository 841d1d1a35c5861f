"""`pneumoscan listen`: receive what a PACS routes (inputs.receiver), and classify each study
once it has settled, by the same run as `pneumoscan run SPOOL` (run.runner: pipeline, state
ledger, outputs, --push), so that cron over the spool gives the same results.

    from pneumoscan import api
    from pneumoscan.run.listen import ListenOptions, listen
    listen(ListenOptions(Path("spool")),
                     api.RunOptions(Path("spool"), json=Path("r.json"),
                                    push="dicom://PACS@pacs.example:104"))

A run at start finishes what a crash left: studies received but not yet published are
published when they settle again, and the studies already in the spool get the run's usual
treatment (only what the state has not classified or sent is done again).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pneumoscan.inputs.receiver import Receiver, ReceiverOptions, Spool, SpoolError
from pneumoscan.run.events import RunEvents
from pneumoscan.run.exits import RunError
from pneumoscan.run.options import RunOptions
from pneumoscan.run.runner import RunSummary
from pneumoscan.run.runner import run as run_once

log = logging.getLogger("pneumoscan.listen")

DEFAULT_SETTLE = 5.0  # seconds without a new instance before a study is classified
# After a run whose outputs could not all be sent, the next one tries again this much later
# (or sooner, when a study settles).
RETRY_PUSH_AFTER = 60.0
IDLE_POLL = 1.0


@dataclass(frozen=True)
class ListenOptions:
    spool: Path
    receiver: ReceiverOptions = field(default_factory=ReceiverOptions)
    settle: float = DEFAULT_SETTLE
    retry_push_after: float = RETRY_PUSH_AFTER


class ListenEvents(RunEvents):
    """What listening tells beyond a run's events; the command line shows it."""

    def listening(self, port: int) -> None:
        pass

    def published(self, study_uid: str, instances: int) -> None:
        """A settled study's instances moved where runs read them; a run follows."""

    def ran(self, summary: RunSummary) -> None:
        pass

    def run_failed(self, error: RunError) -> None:
        """A run could not be done; the received instances stay, the next run retries."""


def listen(options: ListenOptions, run: RunOptions, events: ListenEvents | None = None,
           stop: threading.Event | None = None) -> None:
    """Receive and classify until `stop` is set (or the process is interrupted: the
    command line raises Interrupted on SIGTERM). Raises RunError when it cannot start
    (options, model, port); a run that fails later is told to `events` and retried."""
    try:
        import pynetdicom  # noqa: F401  (the pacs extra is there)
    except ImportError:
        raise RunError("listen needs the pacs extra: pip install 'pneumoscan[pacs]'"
                           ) from None
    events = events or ListenEvents()
    stop = stop or threading.Event()
    # The state is locked per run, not for the life of the listener: cron or a person may
    # run over the same spool meanwhile; a run waits for the other.
    run = replace(run, scans=Path(options.spool), wait=True)
    run.check()
    run.check_outputs()
    spool = Spool(options.spool)
    receiver = Receiver(spool, options.receiver)
    try:
        spool.recover()
        receiver.start()
    except SpoolError as exc:
        raise RunError(str(exc)) from None
    try:
        events.listening(receiver.port)
        retry_at = _classify(run, events, options)  # what a crash left published, not done
        while True:
            waits = [IDLE_POLL]
            settling = spool.next_settling(options.settle)
            if settling is not None:
                waits.append(settling)
            if retry_at is not None:
                waits.append(max(0.0, retry_at - time.monotonic()))
            if stop.wait(min(waits)):
                break
            published = _publish_settled(spool, options.settle, events)
            if published or (retry_at is not None and time.monotonic() >= retry_at):
                retry_at = _classify(run, events, options)
    finally:
        receiver.stop()


def _publish_settled(spool: Spool, settle: float, events: ListenEvents) -> int:
    published = 0
    for study_uid in spool.settled(settle):
        try:
            moved = spool.publish(study_uid, settle)
        except OSError as exc:  # left in .incoming: published again after a restart
            log.error("cannot publish study %s in the spool: %s", study_uid,
                      exc.strerror or exc)
            continue
        if moved:
            events.published(study_uid, moved)
            published += 1
    return published


def _classify(run: RunOptions, events: ListenEvents, options: ListenOptions
              ) -> float | None:
    """One run over the spool; when to try again (time.monotonic) if outputs were not
    sent or the run failed, else None."""
    try:
        summary = run_once(run, events)
    except RunError as exc:
        events.run_failed(exc)
        return time.monotonic() + options.retry_push_after
    events.ran(summary)
    return time.monotonic() + options.retry_push_after if summary.push_failures else None
