"""A PACS as the source of a run, through DICOMweb: QIDO-RS finds the CR and DX studies
(optionally from a study date on) and their CR/DX instances, WADO-RS retrieves the
instances a run needs into a local cache folder, and from there they go through the same
pipeline as a folder's files.

The server is not trusted. Every answer is streamed to a file or a bounded buffer, with a
byte limit on what it holds once decompressed (gzip and deflate are inflated here, a piece
at a time, never whole), and every request has a total deadline besides the timeouts of
each connection and read, so a server that trickles a byte at a time cannot hold the run.
A retrieved instance must be DICOM and carry the study, series and instance UIDs that were
asked for. UIDs from QIDO-RS answers must be valid DICOM UIDs before they name a request,
a file or a result. Each failure is a `PacsError` for that study or instance, whose
message says what was wrong. dicomweb-client is not used for these reasons: it reads
whole answers into memory, with neither a size limit nor a deadline.

Credentials come from the environment (PNEUMOSCAN_DICOMWEB_USER, _PASSWORD), for the
source server only, or from a netrc file (~/.netrc or $NETRC) entry for each server's
host; never from the URL or the command line, and they appear in no log, report or
message. They are not sent over plain HTTP except to a loopback address, unless
PNEUMOSCAN_DICOMWEB_ALLOW_HTTP=1. TLS certificates are verified (a private CA:
REQUESTS_CA_BUNDLE). Failed connections and 502/503/504 answers are retried with backoff.
"""

from __future__ import annotations

import email.message
import ipaddress
import json
import mmap
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pneumoscan.inputs import MAX_INSTANCE_BYTES
from pneumoscan.text import printable

USER_ENV = "PNEUMOSCAN_DICOMWEB_USER"
PASSWORD_ENV = "PNEUMOSCAN_DICOMWEB_PASSWORD"
ALLOW_HTTP_ENV = "PNEUMOSCAN_DICOMWEB_ALLOW_HTTP"
MODALITIES = ("CR", "DX")
TIMEOUT = (10, 120)  # seconds: to connect, to wait for each piece of data
REQUEST_DEADLINE = 600  # seconds for a whole request (several if retried), however it trickles
ATTEMPTS = 3  # per request; backoff 0.5, 1, 2 s between them
RETRY_STATUS = (502, 503, 504)
PAGE = 500  # QIDO-RS matches per request
MAX_QIDO_BYTES = 16 * 2**20  # a page of PAGE matches is a few hundred KB
READ_CHUNK = 64 * 2**10  # bytes read from the network at a time
INFLATE_CHUNK = 2**20  # bytes inflated at a time
COPY_CHUNK = 2**20

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
INSTANCES_IN_STUDY = "00201208"  # NumberOfStudyRelatedInstances
UID_KEYWORDS = {STUDY_UID: "Study Instance UID", SERIES_UID: "Series Instance UID",
                SOP_UID: "SOP Instance UID"}
# PS3.5 9.1: digits in components separated by periods, no leading zero, 64 characters.
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX = 64


class PacsError(RuntimeError):
    """The server could not be reached, refused a request, or answered with something that
    is not what was asked; the message says which and why, without credentials."""


@dataclass(frozen=True)
class RemoteInstance:
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def display_path(self) -> Path:
        """The path its result shows: <Study UID>/<SOP Instance UID> (the study is the
        path's parent, as a folder is a file's)."""
        return Path(self.study_uid, self.sop_uid)


@dataclass(frozen=True)
class BadMatch:
    """A QIDO-RS match that names no usable instance or study: what is wrong with it."""
    label: str  # a name for its result: never a path separator, never a raw server value
    reason: str


def is_uid(value: object) -> bool:
    return (isinstance(value, str) and len(value) <= UID_MAX
            and UID_PATTERN.fullmatch(value) is not None)


def check_url(url: str, what: str = "the DICOMweb URL") -> None:
    """Raises PacsError for a URL that holds credentials (they would be logged with it)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise PacsError(f"credentials do not belong in {what}: set {USER_ENV} and "
                        f"{PASSWORD_ENV}, or put them in a netrc file")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError:
        raise PacsError(f"{what} has an invalid port") from None
    if not parts.hostname:
        raise PacsError(f"{what} names no host")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_server(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def session_for(url: str, *, environment_credentials: bool) -> requests.Session:
    """A session for the server at `url`: the environment's credentials when
    `environment_credentials` (the source server's), else the netrc file's for its host;
    retries on failed connections and 502/503/504. Raises PacsError for a URL with
    credentials, or credentials that would go over plain HTTP to another machine."""
    check_url(url)
    session = requests.Session()
    user = os.environ.get(USER_ENV) if environment_credentials else None
    auth = ((user, os.environ.get(PASSWORD_ENV, "")) if user
            else requests.utils.get_netrc_auth(url))
    parts = urlsplit(url)
    if (auth and parts.scheme == "http" and not is_loopback(parts.hostname or "")
            and os.environ.get(ALLOW_HTTP_ENV) != "1"):
        raise PacsError(f"credentials would be sent unencrypted to {parts.hostname} over "
                        f"plain HTTP: use https://, or set {ALLOW_HTTP_ENV}=1")
    # Set explicitly, so that a redirect to another host never carries it (requests drops
    # Authorization then, and asks netrc for that host only).
    session.auth = auth
    # Only the encodings `_Inflater` undoes (requests offers br and zstd when installed).
    session.headers["Accept-Encoding"] = "gzip, deflate"
    retry = Retry(total=ATTEMPTS - 1, backoff_factor=0.5, status_forcelist=RETRY_STATUS,
                  allowed_methods=None, raise_on_status=False)
    for prefix in ("http://", "https://"):
        session.mount(prefix, HTTPAdapter(max_retries=retry))
    return session


def describe(exc: requests.RequestException) -> str:
    """One line on a failed request, without the URL's query or any header."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {printable(str(response.reason), 80)}"
    cause = exc.args[0] if exc.args else ""
    # urllib3's MaxRetryError names the whole URL; its reason says what went wrong.
    return f"{type(exc).__name__}: {getattr(cause, 'reason', cause)}"


def content_type(headers) -> email.message.Message | None:
    """The answer's Content-Type parsed (type and parameters), None without one."""
    value = headers.get("Content-Type")
    if not value:
        return None
    message = email.message.Message()
    message["Content-Type"] = value
    return message


class _Inflater:
    """Content-Encoding undone a piece at a time, never more than INFLATE_CHUNK at once, so
    a small compressed answer cannot expand in memory past what the byte limit lets out."""

    WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
             "deflate": zlib.MAX_WBITS}

    def __init__(self, encoding: str | None):
        encoding = (encoding or "identity").strip().lower()
        if encoding != "identity" and encoding not in self.WBITS:
            raise PacsError(f"unsupported Content-Encoding {printable(encoding, 40)!r}")
        self.inflater = (zlib.decompressobj(self.WBITS[encoding]) if encoding in self.WBITS
                         else None)

    def pieces(self, data: bytes):
        if self.inflater is None:
            yield data
            return
        try:
            while data:
                yield self.inflater.decompress(data, INFLATE_CHUNK)
                data = self.inflater.unconsumed_tail
        except zlib.error as exc:
            raise PacsError(f"the answer's compressed data is corrupt: {exc}") from None


def download(session: requests.Session, url: str, into: BinaryIO, *, limit: int,
             seconds: float, headers: dict[str, str], params: dict | None = None
             ) -> requests.structures.CaseInsensitiveDict:
    """GET `url` into `into` (`send`'s limits); returns the answer's headers."""
    return send(session, "GET", url, into, limit=limit, seconds=seconds, headers=headers,
                params=params).headers


def send(session: requests.Session, method: str, url: str, into: BinaryIO, *, limit: int,
         seconds: float, **request) -> requests.Response:
    """The request, its answer's body written into `into`: at most `limit` bytes once
    decoded, all of it within `seconds`. Returns the response (its body read). Raises
    PacsError for an answer over the limit or the time, and requests' exceptions for HTTP
    errors and failed connections."""
    deadline = time.monotonic() + seconds
    timeout = (min(TIMEOUT[0], seconds), min(TIMEOUT[1], seconds))
    with session.request(method, url, stream=True, timeout=timeout, **request) as response:
        response.raise_for_status()
        declared = response.headers.get("Content-Length", "")
        encoding = response.headers.get("Content-Encoding")
        if declared.isdigit() and int(declared) > limit and not encoding:
            raise PacsError(f"the answer is {int(declared) / 2**20:.0f} MiB, over the "
                            f"limit of {limit / 2**20:.0f} MiB")
        inflater = _Inflater(encoding)
        size = 0
        while True:
            if time.monotonic() > deadline:
                raise PacsError(f"the answer did not arrive in {seconds:g} s")
            # read1: what has arrived, at most READ_CHUNK; a plain read would wait for a
            # whole chunk, past the deadline, from a server sending a byte at a time.
            try:
                data = response.raw.read1(READ_CHUNK, decode_content=False)
            except urllib3.exceptions.HTTPError as exc:  # timeouts, broken connections
                raise PacsError(f"the answer broke off: {type(exc).__name__}") from None
            if not data:
                return response
            for piece in inflater.pieces(data):
                size += len(piece)
                if size > limit:
                    raise PacsError(f"the answer is larger than the limit of "
                                    f"{limit / 2**20:.0f} MiB")
                into.write(piece)


class DicomWebSource:
    """The CR and DX instances of a DICOMweb server: listed by QIDO-RS, retrieved by
    WADO-RS. `max_instance_bytes` bounds each retrieved instance, `request_seconds` each
    request from its start to its last byte."""

    def __init__(self, url: str, *, max_instance_bytes: int = MAX_INSTANCE_BYTES,
                 request_seconds: float | None = None):
        self.url = url.rstrip("/")
        self.session = session_for(self.url, environment_credentials=True)
        self.max_instance_bytes = max_instance_bytes
        self.request_seconds = request_seconds or REQUEST_DEADLINE

    def studies(self, since: date | None = None
                ) -> tuple[dict[str, str | None], list[BadMatch]]:
        """The CR and DX studies (from study date `since` on): Study Instance UID -> its
        number of instances (NumberOfStudyRelatedInstances, None when the server does not
        say), and the matches that named no valid study UID."""
        found: dict[str, str | None] = {}
        bad: list[BadMatch] = []
        for modality in MODALITIES:
            filters = {"ModalitiesInStudy": modality}
            if since:
                filters["StudyDate"] = f"{since:%Y%m%d}-"
            matches, invalid = self._search(
                f"cannot query {self.url} for {modality} studies", "/studies", filters,
                [STUDY_UID], counted=INSTANCES_IN_STUDY)
            found.update((uid, count) for uid, count in matches)
            bad += [BadMatch(f"(study match {len(bad) + i + 1} without a valid UID)", why)
                    for i, why in enumerate(invalid)]
        return found, bad

    def instances(self, study_uid: str) -> tuple[list[RemoteInstance], list[BadMatch]]:
        """The CR and DX instances of a study (not the SR, SC or PDF outputs sent to it),
        one QIDO-RS instance query per modality, and the matches without valid UIDs."""
        instances: dict[str, RemoteInstance] = {}
        bad: list[BadMatch] = []
        for modality in MODALITIES:
            uids, invalid = self._search(
                f"cannot list the instances of study {study_uid}",
                f"/studies/{quote(study_uid)}/instances", {"Modality": modality},
                [SERIES_UID, SOP_UID])
            for series_uid, sop_uid in uids:
                instances.setdefault(sop_uid, RemoteInstance(study_uid, series_uid, sop_uid))
            bad += [BadMatch(f"(instance match {len(bad) + i + 1} without valid UIDs)", why)
                    for i, why in enumerate(invalid)]
        return list(instances.values()), bad

    def retrieve(self, instance: RemoteInstance, folder: Path) -> Path:
        """The instance, as sent, in `folder`/<SOP Instance UID>.dcm. Raises PacsError when
        it cannot be had, is not DICOM, or is not the instance asked for."""
        what = f"cannot retrieve instance {instance.sop_uid}"
        url = (f"{self.url}/studies/{quote(instance.study_uid)}/series/"
               f"{quote(instance.series_uid)}/instances/{quote(instance.sop_uid)}")
        path = Path(folder) / f"{instance.sop_uid}.dcm"
        try:
            with tempfile.TemporaryFile(dir=folder) as answer:
                headers = self._download(what, url, answer, self.max_instance_bytes, {
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
                try:
                    start, length = _dicom_body(answer, content_type(headers))
                    with open(path, "wb") as out:
                        _copy(answer, start, length, out)
                    check_instance(path, instance)
                except PacsError as exc:
                    raise PacsError(f"{what}: {exc}") from None
        except PacsError:
            path.unlink(missing_ok=True)
            raise
        except OSError as exc:  # the cache folder: a full disk
            path.unlink(missing_ok=True)
            raise PacsError(f"{what}: cannot store it: {exc.strerror or exc}") from None
        return path

    def _search(self, what: str, path: str, filters: dict[str, str], tags: list[str],
                counted: str | None = None) -> tuple[list[tuple[str, ...]], list[str]]:
        """The values of the UID `tags` in each QIDO-RS match, page by page (and of the
        number `counted`, as text or None), and a reason for each match without a valid
        UID in one of them. Not a `next` link or dicomweb-client's get_remaining: a server
        that ignores `offset` (Orthanc's plugin 1.7) would send the first page for ever,
        so paging stops at a page with nothing new."""
        found: dict[tuple[str, ...], None] = {}
        invalid: list[str] = []
        offset = 0
        while True:
            params = {**filters, "limit": PAGE, "offset": offset,
                      "includefield": tags + ([counted] if counted else [])}
            page = self._query(what, f"{self.url}{path}", params)
            new = 0
            for match in page:
                values = [uid_of(match, tag) for tag in tags]
                if counted:
                    values.append(number_of(match, counted))
                problems = [value for value in values if value and value.startswith("no valid")]
                if problems:
                    invalid.append("; ".join(problems))
                elif tuple(values) not in found:
                    found[tuple(values)] = None
                    new += 1
            offset += len(page)
            if len(page) < PAGE or not new:
                return list(found), invalid

    def _query(self, what: str, url: str, params: dict) -> list:
        buffer = BoundedBuffer()
        headers = self._download(what, url, buffer, MAX_QIDO_BYTES,
                                 {"Accept": "application/dicom+json"}, params)
        if not buffer.data:  # 204 No Content, or an empty answer: no match
            return []
        kind = content_type(headers)
        if kind is None or not kind.get_content_type().endswith("json"):
            raise PacsError(f"{what}: the answer is "
                            f"{_kind_text(kind)}, not DICOM JSON")
        try:
            page = json.loads(buffer.data)
        except ValueError:  # json's errors, UnicodeDecodeError included
            raise PacsError(f"{what}: the answer is not valid JSON") from None
        if not isinstance(page, list) or not all(isinstance(m, dict) for m in page):
            raise PacsError(f"{what}: the answer is not a list of DICOM JSON matches")
        return page

    def _download(self, what: str, url: str, into: BinaryIO, limit: int,
                  headers: dict[str, str], params: dict | None = None):
        try:
            return download(self.session, url, into, limit=limit, headers=headers,
                            params=params, seconds=self.request_seconds)
        except requests.RequestException as exc:
            raise PacsError(f"{what}: {describe(exc)}") from None
        except PacsError as exc:
            raise PacsError(f"{what}: {exc}") from None


class BoundedBuffer:
    """A write-only bytes buffer (`send` bounds what it is given)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def uid_of(match: dict, tag: str) -> str:
    """The UID of `tag` in a DICOM JSON match, or "no valid <name> (why)"."""
    name = UID_KEYWORDS[tag]
    element = match.get(tag)
    if not isinstance(element, dict):
        return f"no valid {name} (absent)"
    values = element.get("Value")
    if not isinstance(values, list) or not values:
        return f"no valid {name} (no value)"
    value = values[0]
    if not isinstance(value, str):
        return f"no valid {name} (a {type(value).__name__}, not text)"
    if not is_uid(value):
        return f"no valid {name} ({printable(repr(value), 80)} is not a DICOM UID)"
    return value


def number_of(match: dict, tag: str) -> str | None:
    """An IS value of a DICOM JSON match as text (a number, or digits), else None."""
    values = (match.get(tag) or {}).get("Value") if isinstance(match.get(tag), dict) else None
    value = values[0] if isinstance(values, list) and values else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip().isdigit() and len(value) <= 12:
        return value.strip()
    return None


def _kind_text(kind: email.message.Message | None) -> str:
    return ("without a Content-Type" if kind is None
            else printable(kind.get_content_type(), 80))


def _dicom_body(answer: BinaryIO, kind: email.message.Message | None) -> tuple[int, int]:
    """Where the DICOM file lies in a WADO-RS answer: (offset, length). The answer is
    multipart/related (PS3.18 8.7.3.1; the first part is the instance) or, from some
    servers, application/dicom itself. Raises PacsError for anything else."""
    size = answer.seek(0, os.SEEK_END)
    if size == 0:
        raise PacsError("the answer is empty")
    if kind is None:
        raise PacsError("the answer has no Content-Type")
    media = kind.get_content_type()
    if media == "application/dicom":
        return 0, size
    if media != "multipart/related":
        raise PacsError(f"the answer is {_kind_text(kind)}, not DICOM")
    boundary = kind.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise PacsError("the multipart answer names no boundary")
    delimiter = b"--" + boundary.encode("latin-1", "replace")
    with mmap.mmap(answer.fileno(), 0, access=mmap.ACCESS_READ) as body:
        first = body.find(delimiter)
        if first < 0:
            raise PacsError("the multipart answer does not hold its boundary")
        headers_end = body.find(b"\r\n\r\n", first)
        if headers_end < 0:
            raise PacsError("the multipart answer's part has no end of headers")
        start = headers_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise PacsError("the multipart answer ends before its closing boundary "
                            "(truncated)")
        part_headers = body[first + len(delimiter):headers_end].decode("latin-1")
    part_type = re.search(r"(?im)^content-type:\s*([^;\r\n]+)", part_headers)
    if part_type and part_type.group(1).strip().lower() != "application/dicom":
        raise PacsError(f"the multipart answer holds "
                        f"{printable(part_type.group(1).strip(), 80)}, not DICOM")
    return start, end - start


def _copy(source: BinaryIO, start: int, length: int, target: BinaryIO) -> None:
    source.seek(start)
    while length > 0:
        data = source.read(min(COPY_CHUNK, length))
        if not data:
            break
        target.write(data)
        length -= len(data)


def check_instance(path: Path, asked: RemoteInstance) -> None:
    """Raises PacsError unless the file at `path` is DICOM holding the study, series and
    SOP instance UIDs asked for: a server must not substitute another patient's image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from pneumoscan.inputs.problems import DECODER_ERRORS

    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    try:
        # force: a PACS may hold files from before Part 10 (no preamble, no meta header).
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True,
                             specific_tags=list(keywords))
        values = [str(ds.get(keyword, "")) for keyword in keywords]
    except (InvalidDicomError, *DECODER_ERRORS) as exc:
        raise PacsError(f"the answer is not a DICOM instance ({type(exc).__name__})") from None
    if not any(values):
        raise PacsError("the answer is not a DICOM instance (no instance UIDs)")
    wrong = [keyword for keyword, value, expected in zip(
        keywords, values, (asked.study_uid, asked.series_uid, asked.sop_uid))
             if value != expected]
    if wrong:
        raise PacsError(f"the server sent another instance than the one asked for (its "
                        f"{', '.join(wrong)} differ)")

