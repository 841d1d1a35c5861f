"""A hostile or broken PACS (tests/hostile_dicomweb.py: a real HTTP server on 127.0.0.1),
and C-STORE peers configured as hospitals configure them (a real pynetdicom SCP): every
bad answer is an error for that instance or study, named with its reason, the rest of the
run is classified, memory stays flat, and what was sent is told truthfully."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pydicom
import pytest
from conftest import CLI_CWD, CLI_ENV, SAMPLES, invoke_cli, pneumoscan_command
from hostile_dicomweb import HostileServer, Instance, hostile

from pneumoscan import api
from pneumoscan.dicomout.source import derived_uid
from pneumoscan.inputs import dicomweb
from pneumoscan.inputs.dicomweb import (
    ALLOW_HTTP_ENV,
    PASSWORD_ENV,
    USER_ENV,
    PacsError,
    session_for,
)

MiB = 2**20
# (answer, the reason's words): what each broken answer becomes.
BROKEN = {
    "html": "the answer is text/html, not DICOM",
    "no-content-type": "the answer has no Content-Type",
    "no-boundary": "the multipart answer names no boundary",
    "wrong-boundary": "the multipart answer does not hold its boundary",
    "truncated": "ends before its closing boundary (truncated)",
    "random": "the answer is not a DICOM instance",
    "empty": "the answer is empty",
    "substitute": "the server sent another instance than the one asked for",
    "gzip-bomb": "the answer is larger than the limit of 64 MiB",
    "endless": "the answer is larger than the limit of 64 MiB",
    "declared-huge": "the answer is 900 MiB, over the limit of 64 MiB",
}
READABLE = ("ok", "legacy", "application-dicom")


@pytest.fixture
def server():
    servers: list[HostileServer] = []

    def start(answers: list[str], **options) -> HostileServer:
        servers.append(hostile(answers, **options))
        return servers[-1]

    yield start
    for running in servers:
        running.stop()


def by_answer(server: HostileServer, results) -> dict[str, api.FileResult]:
    answers = {i.sop: i.answer for i in server.instances}
    return {answers[r.path.name]: r for r in results if r.path.name in answers}


def test_each_broken_answer_is_an_error_for_its_instance_and_the_rest_is_classified(
        server, tmp_path):
    pacs = server([*READABLE, *BROKEN])
    options = api.RunOptions(pacs.url, json=tmp_path / "r.json", max_instance_bytes=64 * MiB)
    summary = api.run(options)
    results = by_answer(pacs, summary.scan.results)
    assert set(results) == {*READABLE, *BROKEN}  # every instance accounted for
    for answer in READABLE:  # a file without preamble is DICOM too, as in a folder
        assert results[answer].status == "ok", results[answer].reason
    for answer, words in BROKEN.items():
        assert results[answer].status == "error"
        assert f"cannot retrieve instance {results[answer].path.name}: " in results[answer].reason
        assert words in results[answer].reason, answer
    assert summary.exit_code == api.EXIT_UNREADABLE
    written = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(written) == len(READABLE) + len(BROKEN)
    # The substituted image's patient is nowhere; nothing broken is recorded as done.
    assert "SOMEONE-ELSE" not in (tmp_path / "r.json").read_text()
    again = api.run(options)
    assert again.scan.from_ledger == len(READABLE)
    assert [r.status for r in by_answer(pacs, again.scan.results).values()].count("error") == \
        len(BROKEN)


@pytest.mark.parametrize("where", ["bad_study_matches", "bad_instance_matches"])
def test_qido_matches_without_a_valid_uid_are_errors_and_name_no_request(server, tmp_path,
                                                                        where):
    broken = [{}, {"0020000D": {"vr": "UI"}, "0020000E": {"vr": "UI"}, "00080018": {"vr": "UI"}},
              *({tag: {"vr": "UI", "Value": [value]} for tag in ("0020000D", "0020000E",
                                                                   "00080018")}
                for value in (12345, "1." + "2" * 70, "1.2.\u00e9", "1.2/../3", "..", ""))]
    pacs = server(["ok"], **{where: broken})
    summary = api.run(api.RunOptions(pacs.url, json=tmp_path / "r.json"))
    errors = [r for r in summary.scan.results if r.status == "error"]
    assert len(errors) == len(broken)
    reasons = [r.reason for r in errors]
    assert sum("(absent)" in r for r in reasons) == 1
    assert sum("(no value)" in r for r in reasons) == 1  # legal DICOM JSON: no "Value"
    assert sum("(a int, not text)" in r for r in reasons) == 1
    assert sum("is not a DICOM UID" in r for r in reasons) == 5
    for error in errors:
        assert "/" not in error.path.name and ".." not in error.path.parts
    assert [r.status for r in summary.scan.results].count("ok") == 1
    assert summary.exit_code == api.EXIT_UNREADABLE
    assert not [p for p in pacs.requests if "/../" in p or "%2F" in p or "\u00e9" in p]


def test_a_server_that_trickles_is_given_up_at_the_request_deadline(server, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(dicomweb, "REQUEST_DEADLINE", 3)
    pacs = server(["trickle", "ok"])
    summary = api.run(api.RunOptions(pacs.url, json=tmp_path / "r.json"))
    results = by_answer(pacs, summary.scan.results)
    assert results["trickle"].status == "error"
    assert "the answer did not arrive in 3 s" in results["trickle"].reason
    assert results["ok"].status == "ok"


def test_max_runtime_leaves_what_is_left_to_the_next_run(server, tmp_path):
    pacs = server(["slow", "ok", "legacy"])  # slow: 2 s before its answer
    options = api.RunOptions(pacs.url, json=tmp_path / "r.json", batch_size=1)
    bounded = api.run(api.RunOptions(**{**options.__dict__, "max_runtime": 1.0}))
    results = by_answer(pacs, bounded.scan.results)
    assert results["slow"].status == "ok"  # begun in time
    for answer in ("ok", "legacy"):
        assert results[answer].status == "error"
        assert "reached its --max-runtime of 1 s; the next run does it" in results[answer].reason
    assert bounded.exit_code == api.EXIT_UNREADABLE
    rest = api.run(options)
    assert rest.scan.from_ledger == 1 and rest.exit_code == api.EXIT_OK


def test_listing_is_told_and_a_study_unchanged_since_is_not_listed_again(server, tmp_path):
    pacs = server(["ok", "legacy"])
    told = []

    class Events(api.RunEvents):
        def listing(self, done, total):
            told.append((done, total))

    options = api.RunOptions(pacs.url, json=tmp_path / "r.json")
    api.run(options, Events())
    assert told == [(0, 1), (1, 1)]
    queries = [p for p in pacs.requests if "/instances/" not in p]
    # CR and DX studies, then the study's CR and DX instances: no series query.
    assert len(queries) == 4 and not [p for p in queries if "/series" in p]
    assert all("includefield=00201208" in p for p in queries[:2])

    pacs.requests.clear()
    again = api.run(options)  # the study holds as many instances: not listed again
    assert again.scan.from_ledger == 2 and len(pacs.requests) == 2
    first = pacs.instances[0]
    pacs.instances.append(Instance(first.study, first.series, derived_uid("new", "1")))
    grown = api.run(options)  # one more instance: listed again, the new one retrieved
    assert grown.scan.from_ledger == 2 and len(grown.scan.results) == 3
    assert [r.status for r in grown.scan.results] == ["ok"] * 3


# Runs a command and writes its peak resident size (KiB) to argv[1]. The measured process
# must be started by a small one: a child's ru_maxrss counts what it shared with its parent
# until its exec, so a pytest process of 2 GiB forking it directly would be measured too.
PEAK_OF_CHILD = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def test_peak_memory_against_a_hostile_server_stays_under_1_gib(server, tmp_path):
    """Default limits, in a process of its own: its peak resident size (ru_maxrss) with
    a gzip bomb (1 MiB -> 1 GiB), a 1 GiB body without length and a declared 900 MB one."""
    pacs = server(["ok", "gzip-bomb", "endless", "declared-huge"])
    peak_file = tmp_path / "peak-kib"
    command = pneumoscan_command("run", pacs.url, "--json", tmp_path / "r.json")
    process = subprocess.Popen([sys.executable, "-c", PEAK_OF_CHILD, str(peak_file),
                                *map(str, command)],
                               env=CLI_ENV, cwd=CLI_CWD, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    output = {}
    readers = [threading.Thread(target=lambda k=k, f=f: output.__setitem__(k, f.read()))
               for k, f in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    status = process.wait()
    for reader in readers:
        reader.join()
    peak = int(peak_file.read_text()) * 1024  # KiB on Linux
    print(f"peak resident size against the hostile server: {peak / MiB:.0f} MiB")
    assert status == api.EXIT_UNREADABLE, output["stderr"]
    assert "Traceback" not in output["stderr"]
    assert output["stderr"].count("over the limit of 256 MiB") == 1
    assert output["stderr"].count("larger than the limit of 256 MiB") == 2
    assert peak < 1024 * MiB


# --- push: what was stored is told truthfully ------------------------------------------


@pytest.mark.parametrize("stow, stored", [("ok", True), ("no-content-type", True),
                                          ("failed-sop-sequence", False),
                                          ("partial-no-content-type", False)])
def test_stow_outcomes_are_read_from_the_answer(server, tmp_path, stow, stored):
    pacs = server(["ok", "substitute"], stow=stow)
    options = api.RunOptions(pacs.url, json=tmp_path / "r.json", push="source")
    summary = api.run(options)
    study = pacs.instances[0].study
    sent = [pydicom.dcmread(io.BytesIO(part))
            for body in pacs.stored for part in _parts(body)]
    assert len(sent) == 3 and {ds.StudyInstanceUID for ds in sent} == {study}
    if stored:
        assert summary.pushed == [study] and summary.push_failures == []
        assert api.run(options).pushed == []  # sent once
    else:
        (failure,) = summary.push_failures
        assert summary.pushed == []
        assert ("3 of 3 instances not stored" in failure and "failure reason 0xA700" in failure
                if stow == "failed-sop-sequence" else
                "stored only some of the 3 instances, in an answer that cannot be read "
                "(without a Content-Type)" in failure)
        again = api.run(options)
        assert again.push_failures and len(pacs.stored) == 2  # tried again
    assert summary.exit_code == api.EXIT_UNREADABLE  # the substituted instance


def test_anonymized_outputs_are_sent_and_carry_only_the_pseudonym(server, tmp_path):
    pacs = server(["ok"])
    summary = api.run(api.RunOptions(pacs.url, json=tmp_path / "r.json", push="source",
                                     anonymize=True))
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    sent = [pydicom.dcmread(io.BytesIO(part)) for body in pacs.stored for part in _parts(body)]
    assert sorted(ds.Modality for ds in sent) == ["DOC", "SEG", "SR"]  # they were none
    assert summary.pushed == [result["study"]] and summary.exit_code == api.EXIT_OK
    source = pacs.instances[0]
    for ds in sent:
        assert ds.PatientID == result["metadata"]["PatientID"] and ds.PatientID.startswith("anon-")
        assert ds.StudyInstanceUID == result["metadata"]["StudyInstanceUID"] != source.study
        for identifying in ("HOSTILE-1", source.study, source.series, source.sop):
            assert identifying not in str(ds)


def _parts(body: bytes) -> list[bytes]:
    boundary = body.split(b"\r\n", 1)[0]
    return [part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
            for part in body.split(boundary)[1:-1]]


class StoreSCP:
    """A real C-STORE SCP (pynetdicom) that accepts only `sop_classes`, and answers each
    store with the next of `statuses`."""

    def __init__(self, sop_classes: list[str], statuses: list[int]):
        from pynetdicom import AE, evt

        self.received: list[str] = []
        self.statuses = statuses
        ae = AE(ae_title="ARCHIVE")
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.store)])
        self.url = f"dicom://ARCHIVE@127.0.0.1:{self.server.server_address[1]}"

    def store(self, event) -> int:
        self.received.append(event.request.AffectedSOPClassUID)
        return self.statuses[(len(self.received) - 1) % len(self.statuses)]

    def stop(self) -> None:
        self.server.shutdown()


def test_c_store_sends_what_the_peer_accepts_and_warnings_mean_stored(tmp_path):
    from pydicom.uid import SecondaryCaptureImageStorage

    # Secondary Capture only, a common configuration: no SR, PDF or Segmentation.
    scp = StoreSCP([SecondaryCaptureImageStorage], [0xB000, 0xB006, 0xB007])
    try:
        options = api.RunOptions(SAMPLES / "dicom", json=tmp_path / "r.json", push=scp.url,
                                 dicom_sc=True)
        first = api.run(options)
        assert scp.received == [SecondaryCaptureImageStorage] * 3
        study = "1.3.6.1.4.1.5962.1.2.9.20040826185059.5457"
        assert first.pushed == [study] and first.push_failures == []
        assert sorted(first.not_accepted) == [
            f"study {study}: {scp.url} does not accept Comprehensive 3D SR Storage (3 instances)",
            f"study {study}: {scp.url} does not accept Encapsulated PDF Storage (1 instances)",
            f"study {study}: {scp.url} does not accept Segmentation Storage (3 instances)"]
        assert first.exit_code == api.EXIT_UNREADABLE
        second = api.run(options)  # nothing again: stored, or never to be accepted
        assert second.pushed == [] and second.not_accepted == [] and len(scp.received) == 3
        assert second.exit_code == api.EXIT_OK
    finally:
        scp.stop()


def test_a_c_store_failure_status_is_a_failure_sent_again(tmp_path):
    from pydicom.uid import SecondaryCaptureImageStorage

    scp = StoreSCP([SecondaryCaptureImageStorage], [0xA700])
    try:
        options = api.RunOptions(SAMPLES / "dicom", json=tmp_path / "r.json", push=scp.url,
                                 dicom_sc=True)
        (failure,) = api.run(options).push_failures
        assert "failed with status 0xA700" in failure
        assert api.run(options).push_failures and len(scp.received) == 2
    finally:
        scp.stop()


# --- credentials and --push values ------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["http://user:secret-pw@127.0.0.1:9/dicom-web", "--json", "{out}/r.json"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push",
     "https://user:secret-pw@127.0.0.1:9/dicom-web"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push", "dicom://X:secret-pw@host:104"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push", "dicom://X@host:99999"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push", "dicom://host:104"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push", "ftp://host/x"],
    [str(SAMPLES / "dicom"), "--json", "{out}/r.json", "--push"],
])
def test_bad_urls_and_push_values_are_usage_errors_before_anything_is_created(tmp_path, args):
    out = tmp_path / "out"
    result = invoke_cli("run", *[a.format(out=out) for a in args])
    assert result.exit_code == api.EXIT_USAGE, result.output
    assert "secret-pw" not in result.output and "Traceback" not in result.output
    assert not out.exists()  # no state, no log


def test_environment_credentials_go_to_the_source_server_only(server, tmp_path, monkeypatch):
    monkeypatch.setenv(USER_ENV, "pneumoscan")
    monkeypatch.setenv(PASSWORD_ENV, "secret-pw")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    source, other = server(["ok"]), server([])
    api.run(api.RunOptions(source.url, json=tmp_path / "r.json", push=other.url))
    assert len(other.stored) == 1
    assert set(other.authorizations) == {None}
    assert all(a and a.startswith("Basic ") for a in source.authorizations)


def test_no_credentials_over_plain_http_to_another_machine_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv(USER_ENV, "pneumoscan")
    monkeypatch.setenv(PASSWORD_ENV, "secret-pw")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    remote = "http://192.0.2.7/dicom-web"  # TEST-NET-1: never connected to here
    with pytest.raises(PacsError, match="unencrypted to 192.0.2.7 over plain HTTP"):
        session_for(remote, environment_credentials=True)
    result = invoke_cli("run", remote, "--json", tmp_path / "out" / "r.json")
    assert result.exit_code == api.EXIT_USAGE and not (tmp_path / "out").exists()
    assert session_for("https://192.0.2.7/dicom-web", environment_credentials=True).auth
    assert session_for(remote, environment_credentials=False).auth is None  # nothing sent
    monkeypatch.setenv(ALLOW_HTTP_ENV, "1")
    assert session_for(remote, environment_credentials=True).auth == ("pneumoscan", "secret-pw")
