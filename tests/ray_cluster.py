"""A Ray cluster on loopback, as `ray start` makes one on real machines: a head and worker
nodes, each a `ray start --block` process that stops its node's processes when terminated.
Used by the ray engine's tests and by benchmarks/bench_ray.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

# The cluster is its starter's own: no token authentication (Ray's default for `ray start`,
# which every driver must otherwise be given).
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
# Ray's raylet gives its agent processes a few seconds to start and dies when they take
# longer, as they may on a loaded machine (CI's 2 shared cores): a node is started again.
STARTS = 3


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """`with LoopbackCluster(head_cpus, [cpus of each worker node]) as cluster:` ...
    `cluster.address`; `cluster.env` is the environment its drivers need."""

    def __init__(self, head_cpus: int, worker_cpus: list[int], env: dict | None = None):
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.env = {**(env or os.environ), **RAY_ENV}
        self.address = f"127.0.0.1:{free_port()}"
        self.nodes: list[subprocess.Popen] = []
        self.temp = ""

    def __enter__(self) -> LoopbackCluster:
        # Ray's sockets live under its temporary folder: a short path (AF_UNIX limit).
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        port = self.address.rsplit(":", 1)[1]
        try:
            self._start(["--head", f"--port={port}", f"--temp-dir={self.temp}",
                         "--include-dashboard=false"], self.head_cpus)
            for cpus in self.worker_cpus:
                self._start([f"--address={self.address}"], cpus)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in reversed(self.nodes):
            node.terminate()
            node.wait(timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _start(self, args: list[str], cpus: int) -> None:
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                   f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                   "--disable-usage-stats", *args]
        for _ in range(STARTS):
            node = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            joined = False
            try:
                joined = self._joined(len(self.nodes) + 1, node)
            finally:
                if not joined:  # also when interrupted: stop what was started
                    node.terminate()
                    node.wait(timeout=120)
            if joined:
                self.nodes.append(node)
                return
        raise ClusterError(f"ray start {' '.join(args)} did not start in {STARTS} tries")

    def _joined(self, count: int, node: subprocess.Popen) -> bool:
        """Whether the cluster gets `count` live nodes while `node` runs (asked by a separate
        driver: the caller's process may keep a Ray of its own)."""
        ask = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
               "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and node.poll() is None:
            try:
                done = subprocess.run([sys.executable, "-c", ask], env=self.env,
                                      capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                continue  # the head is not answering yet
            if done.returncode == 0 and int(done.stdout.split()[-1]) >= count:
                return True
            time.sleep(1)
        return False
