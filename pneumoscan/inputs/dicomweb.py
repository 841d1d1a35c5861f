"""A PACS as the source of a run, through DICOMweb (dicomweb-client): QIDO-RS finds the CR
and DX studies (optionally from a study date on) and their CR/DX instances, WADO-RS
retrieves the instances a run needs into a local cache folder, and from there they go
through the same pipeline as a folder's files.

Credentials come from the environment (PNEUMOSCAN_DICOMWEB_USER, _PASSWORD) or, when those
are unset, from a netrc file (~/.netrc or $NETRC, read by requests for the server's host);
never from the URL or the command line, and they appear in no log, report or message. TLS
certificates are verified (a private CA: REQUESTS_CA_BUNDLE). Every request has a timeout,
and failed connections and 502/503/504 answers are retried with backoff.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

USER_ENV = "PNEUMOSCAN_DICOMWEB_USER"
PASSWORD_ENV = "PNEUMOSCAN_DICOMWEB_PASSWORD"
MODALITIES = ("CR", "DX")
TIMEOUT = (10, 120)  # seconds: to connect, to wait for data
ATTEMPTS = 3  # per request; backoff 0.5, 1, 2 s between them
RETRY_STATUS = (502, 503, 504)
PAGE = 500  # QIDO-RS matches per request

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


class PacsError(RuntimeError):
    """The server could not be reached or refused a request; the message says which and
    why, without credentials."""


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


def client_for(url: str):
    """A dicomweb-client for the server at `url` with credentials, timeouts and retries."""
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(url)
    if parts.username or parts.password:
        raise PacsError(f"credentials do not belong in the URL: set {USER_ENV} and "
                        f"{PASSWORD_ENV}, or put them in a netrc file")
    session = requests.Session()
    user = os.environ.get(USER_ENV)
    if user:
        session.auth = (user, os.environ.get(PASSWORD_ENV, ""))
    # else requests takes them from the netrc file for this host, if it has them.
    retry = Retry(total=ATTEMPTS - 1, backoff_factor=0.5, status_forcelist=RETRY_STATUS,
                  allowed_methods=None, raise_on_status=False)
    for prefix in ("http://", "https://"):
        session.mount(prefix, HTTPAdapter(max_retries=retry))
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=TIMEOUT)
    # The session retries; dicomweb-client's own retries (5, up to 16 s apart) on top of
    # them would keep a run waiting half a minute per request on a server that is down.
    client.set_http_retry_params(retry=False)
    return client


def describe(exc: requests.RequestException) -> str:
    """One line on a failed request, without the URL's query or any header."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    cause = exc.args[0] if exc.args else ""
    # urllib3's MaxRetryError names the whole URL; its reason says what went wrong.
    return f"{type(exc).__name__}: {getattr(cause, 'reason', cause)}"


class DicomWebSource:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client = client_for(self.url)

    def studies(self, since: date | None = None) -> list[str]:
        """Study Instance UIDs of the CR and DX studies (from study date `since` on)."""
        found: dict[str, None] = {}
        for modality in MODALITIES:
            filters = {"ModalitiesInStudy": modality}
            if since:
                filters["StudyDate"] = f"{since:%Y%m%d}-"
            for uid in self._search(f"cannot query {self.url} for {modality} studies",
                                    STUDY_UID, self.client.search_for_studies,
                                    search_filters=filters):
                found[uid] = None
        return list(found)

    def instances(self, study_uid: str) -> list[RemoteInstance]:
        """The CR and DX instances of a study (not the SR, SC or PDF outputs sent to it)."""
        instances = []
        for modality in MODALITIES:
            for series_uid in self._search(
                    f"cannot list the series of study {study_uid}", SERIES_UID,
                    self.client.search_for_series, study_instance_uid=study_uid,
                    search_filters={"Modality": modality}):
                for sop_uid in self._search(
                        f"cannot list the instances of study {study_uid}", SOP_UID,
                        self.client.search_for_instances, study_instance_uid=study_uid,
                        series_instance_uid=series_uid):
                    instances.append(RemoteInstance(study_uid, series_uid, sop_uid))
        return instances

    def retrieve(self, instance: RemoteInstance, folder: Path) -> Path:
        """The instance, as sent, in `folder`/<SOP Instance UID>.dcm."""
        dataset = self._query(f"cannot retrieve instance {instance.sop_uid}",
                              self.client.retrieve_instance, instance.study_uid,
                              instance.series_uid, instance.sop_uid)
        path = Path(folder) / f"{instance.sop_uid}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        return path

    def _search(self, what: str, tag: str, method, **kwargs) -> list[str]:
        """The values of `tag` in the QIDO-RS answers, page by page. Not dicomweb-client's
        get_remaining: a server that ignores `offset` (Orthanc's plugin 1.7) would send the
        first page for ever."""
        found: dict[str, None] = {}
        while True:
            page = self._query(what, method, limit=PAGE, offset=len(found), fields=[tag],
                               **kwargs)
            new = [match[tag]["Value"][0] for match in page
                   if match[tag]["Value"][0] not in found]
            found.update(dict.fromkeys(new))
            if len(page) < PAGE or not new:
                return list(found)

    def _query(self, what: str, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except requests.RequestException as exc:
            raise PacsError(f"{what}: {describe(exc)}") from None
