"""A real Orthanc server for the PACS tests: the Debian packages `orthanc` and
`orthanc-dicomweb`, started on free loopback ports with a temporary configuration and
storage, HTTP basic authentication on, the DICOMweb plugin loaded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
USER, PASSWORD = "pneumoscan", "s3cret-for-tests"
AET = "ORTHANC"
START_TIMEOUT = 60


def orthanc_binary() -> str:
    """The Orthanc executable and its DICOMweb plugin, or skip with the reason (a failure
    in CI, where .ci/run installs them)."""
    binary = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)
    missing = [] if binary else ["the Orthanc binary (Debian package orthanc)"]
    if not dicomweb_plugin():
        missing.append("the DICOMweb plugin (Debian package orthanc-dicomweb)")
    if missing:
        message = "PACS tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    return binary


def dicomweb_plugin() -> Path | None:
    return next((Path(d) / "libOrthancDicomWeb.so" for d in PLUGIN_DIRS
                 if (Path(d) / "libOrthancDicomWeb.so").exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One server; `start` and `kill` it as often as a test needs, on the same storage.
    `configuration`: more of Orthanc's settings (DICOM TLS, say)."""

    def __init__(self, folder: Path, **configuration):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "pneumoscan-tests",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "OverwriteInstances": True,
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            **configuration,
        }, indent=1))
        self.process: subprocess.Popen | None = None
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def cstore_url(self) -> str:
        return f"dicom://{AET}@127.0.0.1:{self.dicom_port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([orthanc_binary(), str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log.read_text()[-2000:]}")
            try:
                if self.get("/system").get("DicomAet") == AET:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer in {START_TIMEOUT} s")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def get(self, path: str):
        response = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=10)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> dict:
        response = requests.post(self.url + "/instances", data=path.read_bytes(),
                                 auth=(USER, PASSWORD), timeout=30)
        response.raise_for_status()
        return response.json()

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Each instance of the study with its tags, by Orthanc's REST API."""
        matches = requests.post(self.url + "/tools/find", auth=(USER, PASSWORD), timeout=10,
                                json={"Level": "Study",
                                      "Query": {"StudyInstanceUID": study_uid}}).json()
        instances = []
        for study_id in matches:
            for instance in self.get(f"/studies/{study_id}/instances"):
                instances.append(self.get(f"/instances/{instance['ID']}/simplified-tags"))
        return instances
