"""Sending DICOM outputs to a PACS: STOW-RS to a DICOMweb server (the source server with
`--push`, or another with `--push URL`), or C-STORE (pynetdicom) to one without DICOMweb with
`--push dicom://AET@host:port`, over DICOM TLS with `dicom+tls://AET@host:port`. A study's
outputs are sent together. `store` says truthfully what happened: instances the destination
did not store (a STOW-RS FailedSOPSequence, a C-STORE failure status, no answer) make a
`PushError` for the study, which the next run sends again; SOP classes the destination does
not accept at all (C-STORE presentation contexts it rejects) are told as such and not sent
again, since it never will take them. A C-STORE warning status (0xB000 coercion, 0xB006
elements discarded, 0xB007 data set does not match the SOP class) means stored."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

import requests
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pneumoscan.inputs import dicomweb, is_dicomweb_url
from pneumoscan.inputs.dicomweb import (
    BoundedBuffer,
    PacsError,
    check_url,
    content_type,
    describe,
    same_server,
    send,
    session_for,
)
from pneumoscan.text import printable
from pneumoscan.tls import TlsOptions

CALLING_AET = "PNEUMOSCAN"
ACSE_TIMEOUT = NETWORK_TIMEOUT = 30  # seconds
MAX_STOW_ANSWER_BYTES = 4 * 2**20  # a status per instance sent: a few KB
FAILED_SOP_SEQUENCE, REFERENCED_SOP_INSTANCE, FAILURE_REASON = "00081198", "00081155", "00081197"
STOW_PARTIAL = 202  # PS3.18 10.5.3: some instances stored, the others in FailedSOPSequence


class PushError(PacsError):
    pass


class StowDestination:
    def __init__(self, url: str, source: object = None):
        self.name = url.rstrip("/")
        # The environment's credentials are the source server's: sent to no other host.
        self.session = session_for(self.name, environment_credentials=(
            is_dicomweb_url(source) and same_server(self.name, source)))

    def store(self, datasets: Sequence[Dataset]) -> list[str]:
        """Sends the data sets in one request; raises PushError unless every one was
        stored. Returns no refusals: a DICOMweb server names none for good."""
        from pneumoscan.dicomout.writer import encode

        boundary = uuid.uuid4().hex
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                        + encode(ds) + b"\r\n" for ds in datasets) + f"--{boundary}--".encode()
        answer = BoundedBuffer()
        try:
            response = send(self.session, "POST", f"{self.name}/studies", answer,
                            limit=MAX_STOW_ANSWER_BYTES, seconds=dicomweb.REQUEST_DEADLINE,
                            data=body,
                            headers={"Content-Type": f'multipart/related; type="application/'
                                                     f'dicom"; boundary={boundary}',
                                     "Accept": "application/dicom+json"})
        except requests.RequestException as exc:
            raise PushError(f"STOW-RS to {self.name} failed: {describe(exc)}") from None
        except PacsError as exc:
            raise PushError(f"STOW-RS to {self.name} failed: {exc}") from None
        failed = self._failed(response, answer.data, len(datasets))
        if failed:
            raise PushError(f"STOW-RS to {self.name}: {len(failed)} of {len(datasets)} "
                            f"instances not stored ({'; '.join(failed[:3])}"
                            f"{'; ...' if len(failed) > 3 else ''})")
        return []

    def _failed(self, response: requests.Response, answer: bytes, sent: int) -> list[str]:
        """`instance: failure reason` of each instance the answer says was not stored.
        Raises PushError for a partial success (202) whose answer cannot be read."""
        kind = content_type(response.headers)
        try:
            if kind is None or not kind.get_content_type().endswith("json"):
                raise ValueError("not JSON")
            status = json.loads(answer) if answer else {}
            items = (status.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
            return [_failure_text(item) for item in items]
        except (ValueError, AttributeError, TypeError):  # not JSON, not DICOM JSON's shape
            if response.status_code == STOW_PARTIAL:
                raise PushError(
                    f"STOW-RS to {self.name}: the server stored only some of the {sent} "
                    f"instances, in an answer that cannot be read ("
                    f"{'without a Content-Type' if kind is None else 'not DICOM JSON'})"
                ) from None
            return []  # 200: all stored (PS3.18 10.5.3), whatever the body says


def _failure_text(item: object) -> str:
    def value(tag: str) -> object:
        values = item.get(tag, {}).get("Value") or [None] if isinstance(item, dict) else [None]
        return values[0]

    uid, reason = value(REFERENCED_SOP_INSTANCE), value(FAILURE_REASON)
    reason_text = f"failure reason 0x{reason:04X}" if isinstance(reason, int) else "no reason"
    return f"{printable(str(uid), 64)}: {reason_text}"


class CStoreDestination:
    def __init__(self, url: str, tls: TlsOptions | None = None):
        self.name, self.aet, self.host, self.port = url, *parse_cstore_url(url)
        self.tls = tls

    def store(self, datasets: Sequence[Dataset]) -> list[str]:
        """Sends each data set whose SOP class the destination accepts; raises PushError
        when one of those is not stored. Returns what it does not accept, by SOP class."""
        from pynetdicom import AE
        from pynetdicom.status import code_to_category

        ae = AE(ae_title=CALLING_AET)
        ae.acse_timeout, ae.network_timeout = ACSE_TIMEOUT, NETWORK_TIMEOUT
        for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        try:
            tls = (self.tls.client_context(), self.host) if self.tls else None
        except (OSError, ssl.SSLError) as exc:
            raise PushError(f"C-STORE to {self.name}: cannot set up TLS: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
        association = ae.associate(self.host, self.port, ae_title=self.aet, tls_args=tls)
        if not association.is_established:
            raise PushError(f"C-STORE to {self.name}: association refused or no answer"
                            + (" (or the TLS handshake failed)" if tls else ""))
        try:
            accepted = {context.abstract_syntax for context in association.accepted_contexts}
            for dataset in datasets:
                if dataset.SOPClassUID not in accepted:
                    continue
                status = association.send_c_store(dataset)
                code = status.get("Status") if status else None
                if code is None or code_to_category(code) not in ("Success", "Warning"):
                    raise PushError(f"C-STORE of {dataset.SOPInstanceUID} to {self.name} "
                                    + ("got no answer" if code is None else
                                       f"failed with status 0x{code:04X}"))
        finally:
            association.release()
        refused = sorted({ds.SOPClassUID for ds in datasets} - accepted)
        return [f"{self.name} does not accept {UID(sop_class).name} "
                f"({sum(ds.SOPClassUID == sop_class for ds in datasets)} instances)"
                for sop_class in refused]


def parse_cstore_url(url: str) -> tuple[str, str, int]:
    """(called AE title, host, port) of dicom://AET@host:port (or dicom+tls://); raises
    PushError else."""
    parts = urlsplit(url)
    shown = url.replace(f":{parts.password}@", ":...@") if parts.password else url
    usage = (f"a C-STORE destination is {parts.scheme}://AET@host:port, not "
             f"{printable(shown, 200)!r}")
    try:
        port = parts.port
    except ValueError:  # out of range, not a number
        raise PushError(f"{usage}: the port must be 1 to 65535") from None
    if parts.password is not None:
        raise PushError(f"{usage}: no password (an AE title is all a C-STORE peer knows)")
    aet = parts.username or ""
    if not aet or not parts.hostname or not port:
        raise PushError(usage)
    if len(aet) > 16 or not aet.isascii() or "\\" in aet or not aet.strip():
        raise PushError(f"{usage}: an AE title is 1 to 16 ASCII characters")
    return aet, parts.hostname, port


def check_push(spec: str, source: object) -> None:
    """Raises PushError for a --push value that cannot name a destination, before any
    work: credentials in a URL, a bad port, no DICOMweb source for --push alone."""
    if spec == "source":
        if not is_dicomweb_url(source):
            raise PushError("--push without a destination needs a DICOMweb URL as the "
                            "source; give --push URL or --push dicom://AET@host:port")
    elif is_dicomweb_url(spec):
        try:
            check_url(spec, "the --push URL")
        except PacsError as exc:
            raise PushError(str(exc)) from None
    elif spec.startswith(("dicom://", "dicom+tls://")):
        parse_cstore_url(spec)
    else:
        raise PushError("--push takes a DICOMweb URL or dicom://AET@host:port (dicom+tls:// "
                        f"for DICOM TLS), not {printable(spec, 200)!r}")


def destination(spec: str, source: object, tls: TlsOptions | None = None
                ) -> StowDestination | CStoreDestination:
    """`--push` alone (spec "source"): the DICOMweb server the run reads from; an http(s)
    URL: that DICOMweb server; dicom://AET@host:port: that C-STORE SCP; dicom+tls://...:
    that C-STORE SCP over DICOM TLS (`tls`: this node's certificate, the CA). Raises
    PushError for a value that names none (`check_push`) or credentials that cannot be
    sent."""
    check_push(spec, source)
    try:
        if spec == "source":
            return StowDestination(source, source)
        if is_dicomweb_url(spec):
            return StowDestination(spec, source)
    except PacsError as exc:
        raise PushError(str(exc)) from None
    return CStoreDestination(spec, (tls or TlsOptions()) if spec.startswith("dicom+tls://")
                             else None)
