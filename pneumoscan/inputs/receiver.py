"""Images a PACS or modality sends: a DICOM C-STORE SCP (pynetdicom) that writes each
instance durably into a spool folder before it answers success, and tells which studies
have settled (no instance for a while), ready to be classified as a folder is.

The spool: `SPOOL/.incoming/<Study UID>/<SOP UID>.dcm` while a study is arriving (a hidden
folder: a run over SPOOL does not enter it), then `SPOOL/<Study UID>/<SOP UID>.dcm` once it
settled (`Spool.publish`). An instance is acknowledged only once its file and folder entry
are on disk (written to a temporary file, fsync, rename, fsync of the folder), as MONAI
Deploy's Informatics Gateway does: receive, store durably, then acknowledge. Whatever stops
the process afterwards, the instance is in the spool; whatever stops it before, the sender
was not told success and sends it again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from pneumoscan.inputs.problems import DECODER_ERRORS
from pneumoscan.tls import TlsOptions

if TYPE_CHECKING:  # pynetdicom (the pacs extra) is imported when listening starts
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("pneumoscan.listen")

INCOMING = ".incoming"
# The image storage SOP classes whose instances pneumoscan classifies (CR and DX); any other
# storage SOP class is accepted at association time and refused instance by instance with
# REFUSED_SOP_CLASS, so the sender's log names each one.
IMAGE_SOP_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                     DigitalXRayImageStorageForProcessing)
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4.2.1.4).
SUCCESS = 0x0000
REFUSED_SOP_CLASS = 0x0122  # Refused: SOP Class not supported
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (full disk, instance too large)
NOT_UNDERSTOOD = 0xC000  # Error: Cannot understand (no usable Study / SOP Instance UID)
PROCESSING_FAILURE = 0x0110  # any other write error (a permission changed under us)
UID = re.compile(r"(?=.{1,64}$)[0-9]+(\.[0-9]+)*")  # also what names the spool's files
TEMPORARY_SUFFIX = ".part"


class SpoolError(Exception):
    pass


class Spool:
    """The spool folder, and when each study still arriving last received an instance.
    Thread-safe: the SCP's association threads store, the classifying thread publishes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / INCOMING
        self._lock = threading.Lock()
        self._last_arrival: dict[str, float] = {}

    def recover(self) -> list[str]:
        """At start: remove what a killed writer left half written (never acknowledged),
        and take every study still in `.incoming` (received before a crash, not yet
        published) as just arrived. Returns those studies."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            studies = (sorted(p for p in self.incoming.iterdir() if p.is_dir())
                       if self.incoming.is_dir() else [])
            for study in studies:
                for leftover in study.glob(f".*{TEMPORARY_SUFFIX}"):
                    leftover.unlink()
        except OSError as exc:
            raise SpoolError(f"cannot use the spool {self.root}: {exc.strerror or exc}") from None
        now = time.monotonic()
        with self._lock:
            for study in studies:
                self._last_arrival[study.name] = now
        return [study.name for study in studies]

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance (a DICOM Part 10 file) durably; raises OSError."""
        folder = self.incoming / study_uid
        path = folder / f"{sop_uid}.dcm"
        temporary = folder / f".{sop_uid}.{threading.get_ident()}{TEMPORARY_SUFFIX}"
        with self._lock:  # publish removes empty folders, under this lock
            _make_folders(folder, self.root)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._last_arrival[study_uid] = time.monotonic()
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._lock:
                os.replace(temporary, path)
                _fsync_folder(folder)
                self._last_arrival[study_uid] = time.monotonic()
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path

    def settled(self, settle: float) -> list[str]:
        """The studies that received nothing for `settle` seconds."""
        now = time.monotonic()
        with self._lock:
            return sorted(s for s, last in self._last_arrival.items() if now - last >= settle)

    def next_settling(self, settle: float) -> float | None:
        """Seconds until the next study settles (0 if one has), None when none is arriving."""
        with self._lock:
            if not self._last_arrival:
                return None
            return max(0.0, min(self._last_arrival.values()) + settle - time.monotonic())

    def publish(self, study_uid: str, settle: float) -> int:
        """Move a settled study's instances into SPOOL/<Study UID>/, where runs read them,
        and remove the folders left empty (`.incoming` too: a run over SPOOL then finds
        nothing else). Returns how many moved (0 when an instance arrived meanwhile)."""
        with self._lock:
            last = self._last_arrival.get(study_uid)
            if last is None or time.monotonic() - last < settle:
                return 0
            del self._last_arrival[study_uid]
            source, target = self.incoming / study_uid, self.root / study_uid
            arrived = sorted(source.glob("*.dcm"))
            if arrived:
                _make_folders(target, self.root)
            for path in arrived:
                os.replace(path, target / path.name)
            if arrived:
                _fsync_folder(target)
                _fsync_folder(source)
            for folder in (source, self.incoming):
                try:
                    folder.rmdir()
                except OSError as exc:
                    # An instance this slow is still arriving: it will settle anew.
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
            return len(arrived)


def _make_folders(folder: Path, root: Path) -> None:
    """`folder` and those above it up to `root`, each new entry synced to disk."""
    missing = []
    while not folder.is_dir() and folder != root:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        _fsync_folder(new.parent)


def _fsync_folder(folder: Path) -> None:
    """A rename or new entry in `folder` is on disk only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ReceiverOptions:
    port: int = 11112
    ae_title: str = "PNEUMOSCAN"
    host: str = ""  # every interface
    allow: tuple[str, ...] = ()  # calling AE titles that may associate; empty: any
    max_associations: int = 4
    max_instance_bytes: int = 256 * 1024 * 1024
    tls: TlsOptions | None = None


class Receiver:
    """The C-STORE and C-ECHO SCP, in threads of its own (`start`, `stop`)."""

    def __init__(self, spool: Spool, options: ReceiverOptions):
        self.spool = spool
        self.options = options
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Listen; raises SpoolError when the port cannot be bound or TLS not set up."""
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            AllStoragePresentationContexts,
            evt,
        )
        from pynetdicom.sop_class import Verification

        options = self.options
        ae = AE(ae_title=options.ae_title)
        ae.maximum_associations = options.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = list(options.allow)
        for context in AllStoragePresentationContexts:
            # Images in any transfer syntax the decoders may read; others are refused anyway.
            syntaxes = (ALL_TRANSFER_SYNTAXES if context.abstract_syntax in IMAGE_SOP_CLASSES
                        else context.transfer_syntax)
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_released), (evt.EVT_ABORTED, self._on_aborted)]
        try:
            tls_context = options.tls.server_context() if options.tls else None
            self._server = ae.start_server((options.host, options.port), block=False,
                                           evt_handlers=handlers, ssl_context=tls_context)
        except (OSError, ssl.SSLError) as exc:
            raise SpoolError(f"cannot listen on port {options.port}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        log.info("listening as %s on port %d%s", options.ae_title, self.port,
                 " (TLS)" if options.tls else "")

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, for port 0); once started."""
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # Handlers, in the association's thread. An exception escaping a C-STORE handler makes
    # pynetdicom answer 0xC211 and log it; ours say why with a status of their own.

    def _on_store(self, event: Event) -> int:
        peer = _peer(event)
        sop_class = event.request.AffectedSOPClassUID
        sop_uid = event.request.AffectedSOPInstanceUID
        if sop_class not in IMAGE_SOP_CLASSES:
            log.warning("refused %s from %s: SOP class %s is not a CR or DX image",
                        sop_uid, peer, _sop_class_name(sop_class))
            return REFUSED_SOP_CLASS
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.options.max_instance_bytes:
            log.warning("refused %s from %s: %d bytes, over the limit of %d", sop_uid, peer,
                        len(data), self.options.max_instance_bytes)
            return OUT_OF_RESOURCES
        try:
            study_uid = str(event.dataset.get("StudyInstanceUID", ""))
        except DECODER_ERRORS as exc:  # what pydicom raises parsing a malformed data set
            log.warning("refused %s from %s: cannot read its data set: %s", sop_uid, peer, exc)
            return NOT_UNDERSTOOD
        if not (UID.fullmatch(study_uid) and UID.fullmatch(str(sop_uid))):
            log.warning("refused %s from %s: no valid Study Instance UID (%r)", sop_uid, peer,
                        study_uid)
            return NOT_UNDERSTOOD
        try:
            self.spool.store(study_uid, str(sop_uid), data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            log.error("refused %s from %s: cannot write it to the spool: %s", sop_uid, peer,
                      exc.strerror or exc)
            return OUT_OF_RESOURCES if full else PROCESSING_FAILURE
        log.info("received %s of study %s from %s", sop_uid, study_uid, peer)
        return SUCCESS

    def _on_echo(self, event: Event) -> int:
        log.info("C-ECHO from %s", _peer(event))
        return SUCCESS

    def _on_accepted(self, event: Event) -> None:
        log.info("association accepted from %s", _peer(event))

    def _on_rejected(self, event: Event) -> None:
        log.warning("association rejected from %s (not allowed, or too many at once: %d)",
                    _peer(event), self.options.max_associations)

    def _on_released(self, event: Event) -> None:
        log.info("association released by %s", _peer(event))

    def _on_aborted(self, event: Event) -> None:
        log.warning("association aborted with %s", _peer(event))


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title or '?'} at {requestor.address}:{requestor.port}"


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID as PydicomUID

    name = PydicomUID(uid).name
    return f"{name} ({uid})" if name != uid else uid
