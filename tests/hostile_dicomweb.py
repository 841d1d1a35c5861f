"""A misbehaving DICOMweb server for the tests: a real HTTP server on 127.0.0.1 (a thread
of the test process) that answers QIDO-RS, WADO-RS and STOW-RS as a broken or hostile PACS
would. Its studies hold real DICOM files (the RG1 sample with new UIDs); each instance is
served in one of the ways `ANSWERS` names, and the QIDO-RS answers may carry broken
matches. What it was sent by STOW-RS is kept in `stored`."""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pydicom
from conftest import SAMPLES

from pneumoscan.dicomout.source import derived_uid

BOUNDARY = "hostile-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
GiB = 2**30


def radiograph(study: str, series: str, sop: str, patient: str = "HOSTILE-1") -> bytes:
    """The RG1 chest radiograph as a Part 10 file with these UIDs."""
    ds = pydicom.dcmread(SAMPLES / "dicom" / "RG1_UNCR.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID = patient
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def legacy(part10: bytes) -> bytes:
    """The same data set as a file from before Part 10: no preamble, no meta header
    (implicit VR little endian, as such files are)."""
    ds = pydicom.dcmread(io.BytesIO(part10))
    ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    assert buffer.getvalue()[128:132] != b"DICM"
    return buffer.getvalue()


def multipart(body: bytes, boundary: str = BOUNDARY) -> bytes:
    return (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + body
            + f"\r\n--{boundary}--\r\n".encode())


@dataclass
class Instance:
    study: str
    series: str
    sop: str
    answer: str = "ok"  # a key of ANSWERS


@dataclass
class HostileServer:
    instances: list[Instance] = field(default_factory=list)
    bad_study_matches: list[dict] = field(default_factory=list)
    bad_instance_matches: list[dict] = field(default_factory=list)  # in every study
    stow: str = "ok"  # ok, failed-sop-sequence, no-content-type, partial-no-content-type
    stored: list[bytes] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # of each request

    def start(self) -> HostileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server.requests.append(self.path)
                server.authorizations.append(self.headers.get("Authorization"))
                try:
                    server.answer_get(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on an answer, as it should

            def do_POST(self):
                server.requests.append(self.path)
                server.authorizations.append(self.headers.get("Authorization"))
                length = int(self.headers.get("Content-Length", 0))
                server.stored.append(self.rfile.read(length))
                server.answer_stow(self)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/dicom-web"

    def answer_get(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        path = parts.path.removeprefix("/dicom-web").strip("/").split("/")
        if path == ["studies"]:
            if int(query.get("offset", ["0"])[0]) > 0:
                return send(handler, 200, "application/dicom+json", b"[]")
            studies = dict.fromkeys(i.study for i in self.instances)
            matches = [{"0020000D": {"vr": "UI", "Value": [s]},
                        "00201208": {"vr": "IS", "Value": [
                            sum(i.study == s for i in self.instances)]}} for s in studies]
            matches += self.bad_study_matches if "CR" in query.get("ModalitiesInStudy") else []
            return send(handler, 200, "application/dicom+json", json.dumps(matches).encode())
        if len(path) == 3 and path[0] == "studies" and path[2] == "instances":
            if int(query.get("offset", ["0"])[0]) > 0 or query.get("Modality") != ["CR"]:
                return send(handler, 200, "application/dicom+json", b"[]")
            matches = [{"0020000E": {"vr": "UI", "Value": [i.series]},
                        "00080018": {"vr": "UI", "Value": [i.sop]}}
                       for i in self.instances if i.study == path[1]]
            matches += self.bad_instance_matches
            return send(handler, 200, "application/dicom+json", json.dumps(matches).encode())
        if len(path) == 6 and path[0] == "studies":
            instance = next(i for i in self.instances if i.sop == path[5])
            return ANSWERS[instance.answer](handler, instance)
        send(handler, 404, "text/plain", b"not found")

    def answer_stow(self, handler: BaseHTTPRequestHandler) -> None:
        sops = [pydicom.dcmread(io.BytesIO(part)).SOPInstanceUID
                for part in stow_parts(self.stored[-1], handler.headers["Content-Type"])]
        failed = {"00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [sop]},
             "00081197": {"vr": "US", "Value": [0xA700]}} for sop in sops]}}
        if self.stow == "ok":
            send(handler, 200, "application/dicom+json", b"{}")
        elif self.stow == "failed-sop-sequence":
            send(handler, 202, "application/dicom+json", json.dumps(failed).encode())
        elif self.stow == "no-content-type":
            send(handler, 200, None, b"stored")
        elif self.stow == "partial-no-content-type":
            send(handler, 202, None, json.dumps(failed).encode())


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client hanging up on an endless answer, as it should


def stow_parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    parts = body.split(b"--" + boundary)[1:-1]
    return [part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for part in parts]


def send(handler: BaseHTTPRequestHandler, status: int, content_type: str | None, body: bytes,
         **headers: str) -> None:
    handler.send_response(status)
    if content_type:
        handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


def stream(handler: BaseHTTPRequestHandler, content_type: str, chunks, **headers: str) -> None:
    """An answer without Content-Length: chunks until the client hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Connection", "close")
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    for chunk in chunks:
        handler.wfile.write(chunk)
    handler.close_connection = True


def _ok(handler, instance):
    send(handler, 200, MULTIPART, multipart(radiograph(instance.study, instance.series,
                                                       instance.sop)))


def _substitute(handler, instance):
    """Another patient's image from another study, for the one asked."""
    send(handler, 200, MULTIPART, multipart(radiograph(
        derived_uid("other-study"), derived_uid("other-series"), derived_uid("other-sop"),
        patient="SOMEONE-ELSE")))


@functools.cache
def gzip_bomb() -> bytes:
    """1 MiB of gzip that inflates to 1 GiB of zeros."""
    zeros = bytes(2**20)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9) as out:
        for _ in range(GiB // len(zeros)):
            out.write(zeros)
    return buffer.getvalue()


def _gzip_bomb(handler, instance):
    send(handler, 200, MULTIPART, gzip_bomb(), Content_Encoding="gzip")


def _endless(handler, instance):
    """A multipart body of more than 1 GiB, with no Content-Length."""
    start = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    block = bytes(2**20)
    stream(handler, MULTIPART, [start, *(block for _ in range(GiB // len(block) + 64))])


def _declared_huge(handler, instance):
    handler.send_response(200)
    handler.send_header("Content-Type", MULTIPART)
    handler.send_header("Content-Length", str(900 * 2**20))
    handler.end_headers()
    handler.wfile.write(bytes(2**20))
    handler.close_connection = True


def _trickle(handler, instance):
    """A valid answer, one byte every 0.5 s: each read is in time, the whole never."""
    body = multipart(radiograph(instance.study, instance.series, instance.sop))
    handler.send_response(200)
    handler.send_header("Content-Type", MULTIPART)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for i in range(len(body)):
        handler.wfile.write(body[i:i + 1])
        handler.wfile.flush()
        time.sleep(0.5)


def _body(content_type, make):
    return lambda handler, instance: send(handler, 200, content_type, make(instance))


def _ok_body(instance: Instance) -> bytes:
    return radiograph(instance.study, instance.series, instance.sop)


ANSWERS = {
    "ok": _ok,
    "legacy": _body(MULTIPART, lambda i: multipart(legacy(_ok_body(i)))),
    "application-dicom": _body("application/dicom", _ok_body),
    "html": _body("text/html", lambda i: b"<html><body>Login required</body></html>"),
    "no-content-type": _body(None, lambda i: multipart(_ok_body(i))),
    "no-boundary": _body('multipart/related; type="application/dicom"',
                         lambda i: multipart(_ok_body(i))),
    "wrong-boundary": _body(MULTIPART, lambda i: multipart(_ok_body(i), "another-one")),
    "truncated": _body(MULTIPART, lambda i: multipart(_ok_body(i))[:50_000]),
    "random": _body("application/dicom", lambda i: os.urandom(100_000)),
    "empty": _body(MULTIPART, lambda i: b""),
    "substitute": _substitute,
    "gzip-bomb": _gzip_bomb,
    "endless": _endless,
    "declared-huge": _declared_huge,
    "trickle": _trickle,
    "slow": lambda handler, instance: (time.sleep(2), _ok(handler, instance)),
}


def hostile(answers: list[str], **options) -> HostileServer:
    """A server with one CR study holding one instance per answer (in that order)."""
    study, series = derived_uid("hostile-study"), derived_uid("hostile-series")
    return HostileServer([Instance(study, series, derived_uid("hostile", answer), answer)
                          for answer in answers], **options).start()

