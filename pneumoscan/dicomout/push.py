"""Sending DICOM outputs to a PACS: STOW-RS to a DICOMweb server (the source server with
`--push`, or another with `--push URL`), or C-STORE (pynetdicom) to one without DICOMweb with
`--push dicom://AET@host:port`, over DICOM TLS with `dicom+tls://AET@host:port`. A study's
outputs are sent together; a failure is a `PushError` for that study, and the next run sends
them again."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from urllib.parse import urlsplit

import requests
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pneumoscan.inputs import is_dicomweb_url
from pneumoscan.inputs.dicomweb import PacsError, client_for, describe
from pneumoscan.tls import TlsOptions

CALLING_AET = "PNEUMOSCAN"
ACSE_TIMEOUT = NETWORK_TIMEOUT = 30  # seconds
SUCCESS = 0x0000


class PushError(PacsError):
    pass


class StowDestination:
    def __init__(self, url: str):
        self.name = url.rstrip("/")
        self.client = client_for(self.name)

    def store(self, datasets: Sequence[Dataset]) -> None:
        try:
            self.client.store_instances(list(datasets))
        except requests.RequestException as exc:
            raise PushError(f"STOW-RS to {self.name} failed: {describe(exc)}") from None


class CStoreDestination:
    def __init__(self, url: str, tls: TlsOptions | None = None):
        parts = urlsplit(url)
        if not parts.username or not parts.hostname or not parts.port:
            raise PushError(f"a C-STORE destination is {parts.scheme}://AET@host:port, "
                            f"not {url!r}")
        self.name, self.aet, self.host, self.port = url, parts.username, parts.hostname, parts.port
        self.tls = tls

    def store(self, datasets: Sequence[Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AET)
        ae.acse_timeout, ae.network_timeout = ACSE_TIMEOUT, NETWORK_TIMEOUT
        for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
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
            for dataset in datasets:
                status = association.send_c_store(dataset)
                code = status.get("Status") if status else None
                if code != SUCCESS:
                    raise PushError(f"C-STORE of {dataset.SOPInstanceUID} to {self.name} "
                                    + ("got no answer" if code is None else
                                       f"failed with status 0x{code:04X}"))
        finally:
            association.release()


def destination(spec: str, source: object, tls: TlsOptions | None = None
                ) -> StowDestination | CStoreDestination:
    """`--push` alone (spec "source"): the DICOMweb server the run reads from; an http(s)
    URL: that DICOMweb server; dicom://AET@host:port: that C-STORE SCP; dicom+tls://...:
    that C-STORE SCP over DICOM TLS (`tls`: this node's certificate, the CA)."""
    if spec == "source":
        if not is_dicomweb_url(source):
            raise PushError("--push without a destination needs a DICOMweb URL as the source; "
                            "give --push URL or --push dicom://AET@host:port")
        return StowDestination(str(source))
    if is_dicomweb_url(spec):
        return StowDestination(spec)
    if spec.startswith("dicom://"):
        return CStoreDestination(spec)
    if spec.startswith("dicom+tls://"):
        return CStoreDestination(spec, tls or TlsOptions())
    raise PushError("--push takes a DICOMweb URL or dicom://AET@host:port (dicom+tls:// for "
                    f"DICOM TLS), not {spec!r}")
