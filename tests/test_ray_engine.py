"""`--engine ray` on real local Ray clusters: the same results as the local engine, and
every file accounted for once when an inference actor or the driver is killed mid-run.

Two clusters, each started once for this module (Ray takes seconds to start): Ray inside
the test process (`ray.init` with 2 CPUs), and a head plus a worker node started by
`ray start` on loopback, to which `pneumoscan run --ray-address` connects as a user's
run would."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_CWD, CLI_ENV, SAMPLES, copies_of_kermany224, pneumoscan_command
from ray_cluster import STARTS, ClusterError, LoopbackCluster

from pneumoscan import api
from pneumoscan.inference.ray_engine import INSTALL_HINT, RayEngine, RayOptions
from pneumoscan.results.ledger import Ledger

KERMANY_FILES = 300
PROBABILITY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """The samples (DICOM, skipped files included) and 300 Kermany images (150 a class) in two
    study folders."""
    root = tmp_path_factory.mktemp("ray-scans")
    shutil.copytree(SAMPLES, root / "samples")
    copies_of_kermany224(root / "kermany", KERMANY_FILES, studies=2)
    return root


@pytest.fixture(scope="module")
def model():
    return api.open_model(device="cpu")


@pytest.fixture(scope="module")
def local_results(scans, model):
    """The reference: the local engine's results."""
    return api.scan(scans, model, render=False).results


def assert_same(results: list[dict], reference: list[dict]) -> None:
    """Result records (FileResult.to_json()) equal, probabilities to 1e-5."""
    assert [r["path"] for r in results] == [r["path"] for r in reference]
    for ours, theirs in zip(results, reference):
        probability, reference_probability = ours.pop("probability"), theirs.pop("probability")
        assert ours == theirs
        if reference_probability is None:
            assert probability is None
        else:
            assert abs(probability - reference_probability) <= PROBABILITY_TOLERANCE


def records(results) -> list[dict]:
    return [r.to_json() for r in results]


# --- Ray in this process --------------------------------------------------------------------

def import_ray():
    return pytest.importorskip("ray", reason=INSTALL_HINT)


@pytest.fixture(scope="module")
def ray_here():
    ray = import_ray()
    for start in range(STARTS):  # as LoopbackCluster does
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 (a bare Exception: "node timed out during startup")
            ray.shutdown()
            if start == STARTS - 1:
                raise
    yield
    ray.shutdown()


# The actors decode their own files (CPU-only actors by default), or decoding tasks of their
# own feed them (actors with a GPU by default): the files' pixels then travel to the actors.
@pytest.mark.parametrize("decode_cpus", [None, 0.5], ids=["in-actors", "decoding-tasks"])
def test_same_results_and_pictures_as_the_local_engine(ray_here, scans, model, local_results,
                                                       decode_cpus):
    with RayEngine(RayOptions(actors=1, decode_cpus=decode_cpus)) as engine:
        scanned = api.scan(scans, model, engine=engine)
    assert len(scanned.results) == KERMANY_FILES + 22
    assert_same(records(scanned.results), records(local_results))
    assert scanned.run.provider == "CPUExecutionProvider"
    for result in scanned.results:  # the report's picture, made on the cluster: a JPEG
        assert (result.picture or b"")[:3] == (b"\xff\xd8\xff" if result.status == "ok" else b"")


def own_processes_titled(marker: str) -> list[int]:
    """This process's descendants whose title (Ray's `ray::...`) contains `marker`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
    mine, grew = {os.getpid()}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= children
        grew = bool(children)
    found = []
    for pid in mine - {os.getpid()}:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::") and marker in title:
            found.append(pid)
    return found


def test_every_file_accounted_for_once_when_an_actor_dies(ray_here, scans, model,
                                                           local_results, tmp_path):
    killed = []

    def kill_the_actor_once(result) -> None:
        if len(killed) == 0 and result.path.parent.name == "study-0":  # well into the run
            actors = own_processes_titled("_Classifier")
            assert actors, "no inference actor process found to kill"
            for pid in actors:
                os.kill(pid, signal.SIGKILL)
            killed.extend(actors)

    with Ledger.open(tmp_path / "state.sqlite") as ledger, \
            RayEngine(RayOptions(actors=1)) as engine:
        scanned = api.scan(scans, model, render=False, ledger=ledger, engine=engine,
                           on_result=kill_the_actor_once)
    assert killed
    assert_same(records(scanned.results), records(local_results))  # each file once, in order
    assert not any(r.from_ledger for r in scanned.results)


# --- a cluster of two nodes on loopback, as `ray start` makes one ----------------------------

@pytest.fixture(scope="module")
def loopback_cluster():
    """A head and a worker node of one CPU each on 127.0.0.1."""
    import_ray()
    try:
        with LoopbackCluster(1, [1], CLI_ENV) as cluster:
            yield cluster
    except ClusterError as exc:
        pytest.fail(str(exc))


def cluster_run(cluster: LoopbackCluster, scans: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        pneumoscan_command("run", scans, "--json", out, "--engine", "ray", "--ray-address",
                           cluster.address, "--ray-actors", "1", "--device", "cpu"),
        env=cluster.env, cwd=CLI_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged(log: Path, event: str) -> list[dict]:
    if not log.exists():
        return []
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return [line for line in lines if line["event"] == event]


def test_a_run_on_the_cluster_gives_the_local_engines_results(loopback_cluster, scans,
                                                               local_results, tmp_path):
    out = tmp_path / "r.json"
    run = cluster_run(loopback_cluster, scans / "samples", out)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert "on Ray actors" in stderr
    reference = [r for r in records(local_results) if "/samples/" in r["path"]]
    assert_same(json.loads(out.read_text())["results"], reference)


def test_driver_killed_mid_run_and_run_again(loopback_cluster, scans, local_results,
                                             tmp_path):
    out, log = tmp_path / "r.json", tmp_path / "r.pneumoscan.log.jsonl"
    first = cluster_run(loopback_cluster, scans, out)
    deadline = time.monotonic() + 600
    while len(logged(log, "file")) < 40:  # well into the run
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "no progress on the cluster"
        time.sleep(0.2)
    first.kill()
    first.communicate()
    assert not logged(log, "summary") and not out.exists()

    again = cluster_run(loopback_cluster, scans, out)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    summary = logged(log, "summary")[-1]
    # What the killed run had recorded is kept; the rest is computed now; no file twice.
    assert summary["from_ledger"] >= 40 and summary["computed"] > 0
    assert summary["from_ledger"] + summary["computed"] == KERMANY_FILES + 22
    assert_same(json.loads(out.read_text())["results"], records(local_results))


def test_without_ray_the_engine_says_how_to_install_it(tmp_path):
    # As if Ray were not installed: importing it fails.
    code = ("import sys; sys.modules['ray'] = None; from pneumoscan.cli import main; "
            "sys.argv = ['pneumoscan'] + sys.argv[1:]; main()")
    done = subprocess.run([sys.executable, "-c", code, "run", str(SAMPLES / "study-normal-1"),
                           "--json", str(tmp_path / "r.json"), "--engine", "ray"],
                          env=CLI_ENV, cwd=CLI_CWD, capture_output=True, text=True, timeout=300)
    assert done.returncode == api.EXIT_FATAL
    assert done.stderr.strip().splitlines()[-1] == (
        'pneumoscan: error: the ray engine needs Ray: pip install "pneumoscan[ray]"')
