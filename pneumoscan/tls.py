"""DICOM TLS (PS3.15 B.1, the IHE ATNA secure node): TLS 1.2 or later, each node with its
certificate, peers verified against a CA. `listen` serves with it (and may require callers'
certificates); `--push dicom+tls://AET@host:port` calls with it."""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pneumoscan.listen")

# pynetdicom's server makes the TLS handshake in its accepting thread: a caller that
# connects and says nothing would hold every other caller off. A handshake gets this long.
HANDSHAKE_TIMEOUT = 10.0  # seconds


class _ServerContext(ssl.SSLContext):
    """A server context whose handshakes are bounded in time, and logged when they fail (a
    caller without the CA's certificate, or not speaking TLS): pynetdicom drops them
    without a word."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        try:
            host, port = sock.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "a caller that left"
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.warning("refused a connection from %s: TLS handshake failed: %s", peer,
                        getattr(exc, "reason", None) or exc)
            sock.close()
            raise
        wrapped.settimeout(None)  # as pynetdicom has its sockets: blocking, select()ed
        return wrapped


@dataclass(frozen=True)
class TlsOptions:
    certificate: Path | None = None  # this node's, PEM; with `key`
    key: Path | None = None
    ca: Path | None = None  # the CA that signs the peers' certificates

    def server_context(self) -> ssl.SSLContext:
        """For listening: this node's certificate; with `ca`, callers must present a
        certificate that CA signed."""
        if self.certificate is None:
            raise ValueError("a TLS server needs its certificate and key")
        context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.certificate, self.key)
        if self.ca is not None:
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For calling: the server's certificate verified (against `ca`, else the system's
        CAs) and its host name checked; this node's certificate presented when given."""
        context = ssl.create_default_context(cafile=self.ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate is not None:
            context.load_cert_chain(self.certificate, self.key)
        return context
