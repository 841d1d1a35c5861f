"""`pneumoscan listen`, a real C-STORE SCP in a process of its own: instances sent by a real
pynetdicom SCU (or routed by a real Orthanc) are on disk before they are acknowledged,
classified once their study settles, the outputs sent back; killed with SIGKILL while
receiving, nothing acknowledged is lost and the restarted listener finishes the work."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import CLI_CWD, CLI_ENV, SAMPLES, pneumoscan_command, run_pneumoscan
from orthanc import PASSWORD, USER, Orthanc, free_port
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    MRImageStorage,
    Verification,
)

from pneumoscan.dicomout.source import derived_uid
from pneumoscan.inputs.receiver import OUT_OF_RESOURCES, REFUSED_SOP_CLASS, SUCCESS

RG1 = SAMPLES / "dicom" / "RG1_UNCR.dcm"
RG1_STUDY = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
AET = "PNEUMOSCAN"
SETTLE = 1.0
WAIT = 240  # seconds for a study to be classified on a loaded 2-core machine


class Listener:
    """`pneumoscan listen SPOOL ...` in a subprocess, its stderr in a file."""

    def __init__(self, folder: Path, *args, limit_file_size: int | None = None):
        self.folder, self.args = folder, args
        self.spool = folder / "spool"
        self.json = folder / "results.json"
        self.port = free_port()
        self.stderr = folder / "listen.log"
        self.limit_file_size = limit_file_size
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        def limits():
            if self.limit_file_size is not None:  # a disk that fills up
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit_file_size,) * 2)

        with open(self.stderr, "ab") as log:
            self.process = subprocess.Popen(
                pneumoscan_command("listen", self.spool, "--port", self.port, "--settle", SETTLE,
                                   "--json", self.json, *self.args),
                env=CLI_ENV, cwd=CLI_CWD, stderr=log, stdout=subprocess.DEVNULL,
                preexec_fn=limits)  # noqa: PLW1509 (the tests start no thread before)
        self.wait_for("listening on port")

    def log(self) -> str:
        return self.stderr.read_text()

    def wait_for(self, text: str, count: int = 1, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"listen exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in {timeout} s: {self.log()}")
            time.sleep(0.2)

    def results(self) -> dict[str, dict]:
        """The JSON's results by SOP Instance UID (the file name)."""
        results = json.loads(self.json.read_text())["results"]
        return {Path(r["path"]).stem: r for r in results}

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)


@pytest.fixture
def listener(tmp_path):
    started = []

    def start(*args, **kwargs) -> Listener:
        server = Listener(tmp_path, *args, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)


def copies(count: int, study: str = "listen-study") -> list[pydicom.Dataset]:
    """The RG1 chest radiograph as `count` instances of one new study."""
    datasets = []
    for i in range(count):
        ds = pydicom.dcmread(RG1)
        ds.StudyInstanceUID = derived_uid(study)
        ds.SeriesInstanceUID = derived_uid(study, "series")
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = derived_uid(study, str(i))
        datasets.append(ds)
    return datasets


def send(port: int, datasets, calling: str = "TESTSCU", on_status=None) -> list[int | None]:
    """C-STORE each data set in one association; the status of each (None: no answer)."""
    ae = AE(ae_title=calling)
    for sop_class in {ComputedRadiographyImageStorage, MRImageStorage}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title=AET)
    assert association.is_established
    statuses = []
    try:
        for ds in datasets:
            status = association.send_c_store(ds) if association.is_established else None
            statuses.append(status.Status if status else None)
            if on_status:
                on_status(ds, statuses[-1])
    finally:
        if association.is_established:
            association.release()
    return statuses


def test_received_study_is_classified_once_settled_as_run_over_the_spool_would(listener,
                                                                              tmp_path):
    server = listener("--dicom-out", tmp_path / "dicom-out")
    mr = pydicom.dcmread(SAMPLES / "dicom" / "MR2_J2KI.dcm")
    mr.decompress()
    datasets = copies(2)
    assert send(server.port, [*datasets, mr]) == [SUCCESS, SUCCESS, REFUSED_SOP_CLASS]
    server.wait_for("files (", count=2)  # the run at start, then the settled study's
    log = server.log()
    assert "refused" in log and "MR Image Storage" in log
    assert "association accepted from TESTSCU" in log
    spooled = sorted((server.spool / derived_uid("listen-study")).iterdir())
    assert [p.stem for p in spooled] == sorted(ds.SOPInstanceUID for ds in datasets)
    assert not (server.spool / ".incoming").exists()
    results = server.results()
    assert set(results) == {ds.SOPInstanceUID for ds in datasets}
    assert {r["status"] for r in results.values()} == {"ok"}
    assert len(list((tmp_path / "dicom-out").rglob("SR-*.dcm"))) == 2
    # More images of the study later: classified again for those, the others kept.
    later = copies(3)[2]
    assert send(server.port, [later]) == [SUCCESS]
    server.wait_for("files (", count=3)
    assert "3 files (2 unchanged since the last run)" in server.log()
    results = server.results()
    assert set(results) == {ds.SOPInstanceUID for ds in [*datasets, later]}
    assert len(list((tmp_path / "dicom-out").rglob("SR-*.dcm"))) == 3
    # Cron over the same spool: the same results.
    cron = run_pneumoscan("run", server.spool, "--json", tmp_path / "cron.json")
    assert cron.returncode == 0, cron.stderr
    by_cron = {Path(r["path"]).stem: r for r in json.loads((tmp_path / "cron.json").read_text())
               ["results"]}
    for uid, result in results.items():
        assert by_cron[uid]["probability"] == pytest.approx(result["probability"], abs=1e-6)
        assert by_cron[uid]["label"] == result["label"]
    # A C-ECHO is answered; an AE title not on --allow is not (see the next test).
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", server.port, ae_title=AET)
    assert association.send_c_echo().Status == SUCCESS
    association.release()
    assert server.stop() == 128 + signal.SIGTERM


def test_only_allowed_callers_as_many_at_once_as_allowed_and_instances_under_the_limit(
        listener):
    server = listener("--allow", "MODALITY1", "--max-instance-mb", "1",
                      "--max-associations", "1")
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assert not ae.associate("127.0.0.1", server.port, ae_title=AET).is_established
    server.wait_for("association rejected from INTRUDER")
    big = copies(1)[0]  # RG1 is 8 MB uncompressed
    assert len(big.PixelData) > 1024 * 1024
    assert send(server.port, [big], calling="MODALITY1") == [OUT_OF_RESOURCES]
    server.wait_for("over the limit")
    assert not list(server.spool.rglob("*.dcm"))
    # One association at a time: a second one while the first is open is rejected.
    allowed = AE(ae_title="MODALITY1")
    allowed.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    deadline = time.monotonic() + 30  # the released association's thread may be ending
    while not (first := allowed.associate("127.0.0.1", server.port, ae_title=AET)
               ).is_established:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not allowed.associate("127.0.0.1", server.port, ae_title=AET).is_established
    server.wait_for("association rejected from MODALITY1")
    first.release()


def test_a_full_disk_answers_a_failure_and_keeps_nothing(listener):
    server = listener(limit_file_size=1024 * 1024)  # no file over 1 MB can be written
    assert send(server.port, copies(1)) == [OUT_OF_RESOURCES]
    server.wait_for("cannot write it to the spool")
    assert not [p for p in server.spool.rglob("*") if p.is_file()]  # no temporary left


def test_kill_9_while_receiving_loses_nothing_acknowledged_and_a_restart_finishes(listener,
                                                                                   tmp_path):
    server = listener()
    acknowledged = []
    kill_after = 4

    def on_status(ds, status):
        if status == SUCCESS:
            acknowledged.append(ds.SOPInstanceUID)
        if len(acknowledged) == kill_after and server.process.poll() is None:
            server.process.kill()  # SIGKILL, with the next instance on its way

    statuses = send(server.port, copies(12), on_status=on_status)
    server.process.wait()
    assert len(acknowledged) == kill_after and None in statuses
    # Every acknowledged instance is in the spool, whole; nothing else but half-written
    # temporaries (removed at restart).
    spooled = {p.stem: p for p in server.spool.rglob("*.dcm") if not p.name.startswith(".")}
    assert set(acknowledged) <= set(spooled)
    for uid in acknowledged:
        assert pydicom.dcmread(spooled[uid]).SOPInstanceUID == uid

    restarted = listener()
    restarted.wait_for("files (")  # the run at start, then the recovered study's
    restarted.wait_for("new instances settled")
    deadline = time.monotonic() + WAIT
    while not (restarted.json.exists() and set(acknowledged) <= set(restarted.results())):
        assert time.monotonic() < deadline, restarted.log()
        time.sleep(0.5)
    assert not list(restarted.spool.rglob(".*.part"))
    assert {r["status"] for r in restarted.results().values()} == {"ok"}


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    for path in sorted((SAMPLES / "dicom").glob("*.dcm")):
        server.upload(path)
    yield server
    server.kill()


def route(orthanc: Orthanc, port: int, tls: bool = False) -> None:
    """Orthanc sends the RG1 study to pneumoscan, declared as one of its modalities, as a
    routing rule would (REST /modalities/.../store)."""
    auth = (USER, PASSWORD)
    requests.put(f"{orthanc.url}/modalities/pneumoscan", auth=auth, timeout=10,
                 json={"AET": AET, "Host": "127.0.0.1", "Port": port, "UseDicomTls": tls}
                 ).raise_for_status()
    study_id = requests.post(f"{orthanc.url}/tools/lookup", data=RG1_STUDY, auth=auth,
                             timeout=10).json()[0]["ID"]
    requests.post(f"{orthanc.url}/modalities/pneumoscan/store", auth=auth, timeout=120,
                  json={"Resources": [study_id], "Synchronous": True}).raise_for_status()


def test_orthanc_routes_a_study_and_the_results_land_back_in_it(orthanc, listener, tmp_path):
    server = listener("--push", orthanc.cstore_url, "--state", tmp_path / "state.sqlite")
    route(orthanc, server.port)
    deadline = time.monotonic() + WAIT
    while sorted(i["Modality"] for i in orthanc.instances_of_study(RG1_STUDY)) != (
            ["CR"] * 3 + ["DOC"] + ["SEG"] * 3 + ["SR"] * 3):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.5)
    server.wait_for("DICOM outputs sent for 1 studies; not sent for 0")  # the run's summary


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA of the test's own, and certificates it signs for the server (localhost,
    127.0.0.1) and a client; PEM files in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    files: dict[str, Path] = {}

    def issue(name: str, issuer_key, issuer_name, ca: bool = False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer_name or subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        certificate = builder.sign(issuer_key or key, hashes.SHA256())
        files[f"{name}.crt"] = folder / f"{name}.crt"
        files[f"{name}.key"] = folder / f"{name}.key"
        files[f"{name}.crt"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return key, certificate.subject

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = issue("ca", None, None, ca=True)
    issue("server", ca_key, ca_name,
          san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    issue("client", ca_key, ca_name)
    return files


def tls_association(port: int, pki: dict[str, Path], *, client_certificate: bool):
    import ssl

    context = ssl.create_default_context(cafile=pki["ca.crt"])
    if client_certificate:
        context.load_cert_chain(pki["client.crt"], pki["client.key"])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=AET, tls_args=(context, "127.0.0.1"))


def test_dicom_tls_both_ways_with_orthanc_and_the_tests_own_ca(listener, tmp_path):
    """Orthanc routes a study over DICOM TLS to listen, which requires a client
    certificate its CA signed, and the results go back over TLS; a caller without a
    certificate, or without TLS, gets no association."""
    pki = make_pki(tmp_path / "pki")
    orthanc = Orthanc(tmp_path / "orthanc", DicomTlsEnabled=True,
                      DicomTlsCertificate=str(pki["server.crt"]),
                      DicomTlsPrivateKey=str(pki["server.key"]),
                      DicomTlsTrustedCertificates=str(pki["ca.crt"]),
                      DicomTlsRemoteCertificateRequired=True)
    orthanc.start()
    try:
        orthanc.upload(RG1)
        server = listener("--tls-cert", pki["server.crt"], "--tls-key", pki["server.key"],
                          "--tls-ca", pki["ca.crt"], "--state", tmp_path / "state.sqlite",
                          "--push", orthanc.cstore_url.replace("dicom://", "dicom+tls://"))
        assert not tls_association(server.port, pki, client_certificate=False).is_established
        plain = AE(ae_title="TESTSCU")
        plain.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assert not plain.associate("127.0.0.1", server.port, ae_title=AET).is_established
        server.wait_for("TLS handshake failed", count=2)  # both refusals logged
        association = tls_association(server.port, pki, client_certificate=True)
        assert association.is_established
        association.release()

        route(orthanc, server.port, tls=True)
        deadline = time.monotonic() + WAIT
        while sorted(i["Modality"] for i in orthanc.instances_of_study(RG1_STUDY)) != (
                ["CR", "DOC", "SEG", "SR"]):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.5)
    finally:
        orthanc.kill()
