"""The ray engine against the local engine, on real chest X-rays (../shared/data). The
local engine against its 2-core bound: benchmarks/bench_bound.py.

    python benchmarks/bench_ray.py [--parts overhead,cli,scaling,memory] [--repeats 3]
                                   [--originals 1000] [--memory-files 20000]

Parts (each measurement runs in its own subprocess, so its peak RSS is its own):
  overhead  N originals (the 100 Kermany originals hard-linked under N distinct names, so
            every file is its own entry in the state) through `api.scan(render=False)` +
            JSON: the local engine; the ray engine on a Ray instance of this machine's
            cores started by the measuring process beforehand (its start-up is timed
            apart); and the ray engine on a `ray start` head of this machine's cores
            started before the part (`--ray-address`, as on a user's cluster). Each ray
            run makes its own actor pool: actor start-up is part of its time, as it is of
            a user's run. And Ray Data alone, both ways: the engine's dataset shape over the
            same files with pass-through actors (none of pneumoscan's stages imported, no model,
            no decoding), what Ray Data itself costs a run: the floor under the overhead.
  scaling   the same N on a `ray start` cluster on loopback: a head with no CPU (the
            driver) and 1, then 2, worker nodes of 1 CPU each; one actor a node (which
            prepares its own files: CPU-only actors do).
  cli       the same N through the command a user runs, `pneumoscan run N --json OUT` in a
            process of its own on a fresh state, wall seconds of the process (its imports,
            the model, the state ledger, the engine's start-up): the local engine; the ray
            engine on a running `ray start` head of this machine's cores (`--ray-address`,
            after one untimed run, as on a cluster in use: Ray Data's cluster-wide helper
            actors exist); the ray engine with a Ray started by the run (`ray.init` and
            Ray Data's helper actors included: all a user waits for).
  memory    the driver's peak RSS (VmHWM) over 20,000 files (the 224 px Kermany images,
            hard-linked), local engine vs ray engine.
Repeats are interleaved across rows, so that background load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import REPO, SHARED, WARMUP_IMAGES, machine, peak_rss_mb

sys.path.insert(0, str(REPO / "tests"))
from ray_cluster import RAY_ENV, LoopbackCluster  # noqa: E402

ORIGINALS = SHARED / "kermany-original"
SMALL = SHARED / "kermany224" / "train"
SUFFIXES = (".jpeg", ".jpg", ".png")


# --- measurements (each in its own subprocess) -----------------------------------------------

class Clock:
    """Wall seconds and this process's CPU seconds (all threads, user + system) between
    start and `read()`: on a shared machine the CPU seconds say what the work costs, the
    wall seconds also what the other processes took from it."""

    def __init__(self):
        self.wall, self.cpu, self.epoch = time.perf_counter(), self._cpu(), time.time()
        self.first: float | None = None

    def note_first(self, _result) -> None:
        """An on_result callback: the wall seconds until the first result."""
        if self.first is None:
            self.first = time.perf_counter() - self.wall

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system

    def read(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu_s": self._cpu() - self.cpu}


def sources(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        sys.exit(f"benchmark data not found: {folder} (the real data sits beside the clone)")
    return files


def linked_folder(files: list[Path], n: int, root: Path) -> Path:
    """n distinct files (hard links, cycling through `files`) in one folder."""
    folder = root / f"{n}-{files[0].parent.parent.name}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(n):
            src = files[i % len(files)]
            os.link(src, folder / f"{i:05d}-{src.name}")
    for path in folder.iterdir():  # into the page cache: every row reads warm files
        path.read_bytes()
    return folder


def scan_seconds(folder: Path, warmup: Path, engine_factory) -> dict:
    """Seconds of one `api.scan(render=False)` + JSON over `folder`, after one over
    `warmup`; engine_factory() gives a fresh engine context for each. `first_result_s`:
    when the first result came (what starting the engine's work costs)."""
    from pneumoscan import api

    model = api.open_model(device="cpu")
    out = Path(tempfile.mkdtemp()) / "results.json"
    for source in (warmup, folder):
        clock = Clock()
        with engine_factory() as engine:
            scanned = api.scan(source, model, render=False, engine=engine,
                               on_result=clock.note_first)
        api.write_json(out, scanned)
        measured = clock.read()
    assert scanned.counts().classified == sum(1 for _ in folder.iterdir())
    return {**measured, "first_result_s": clock.first, "started": clock.epoch}


def actor_timings(measured: dict) -> dict:
    """From Ray's timeline, the inference actors during the measured run: how many, how
    long the slowest took to start (its `__init__`: imports and the model), and the share
    of the run's wall time they spent on batches (preparing + scoring + finishing)."""
    import ray

    start = measured["started"]
    spans = [e for e in ray.timeline() if e.get("ph") == "X" and e["ts"] / 1e6 >= start
             and e.get("cat", "").startswith("task::MapWorker")]
    calls = [e for e in spans if e["cat"].endswith(".submit")]
    inits = [e for e in spans if e["cat"].endswith(".__init__")]
    actors = {e["tid"] for e in calls}
    return {"actors": len(actors),
            "actor_init_s": max((e["dur"] for e in inits), default=0) / 1e6,
            "actor_busy": sum(e["dur"] for e in calls) / 1e6
            / (len(actors) * measured["seconds"])}


def measure_local(args) -> dict:
    from pneumoscan.api import open_engine

    return scan_seconds(args.folder, args.warmup, lambda: open_engine("local"))


def init_ray(args) -> float:
    """Connects to `args.address`, or starts a Ray instance of this machine's cores; the
    seconds it took."""
    import ray

    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    return time.perf_counter() - t0


def measure_ray(args) -> dict:
    from pneumoscan.inference.ray_engine import RayEngine, RayOptions

    started = init_ray(args)
    options = RayOptions(actors=args.actors, actor_cpus=args.actor_cpus)
    measured = scan_seconds(args.folder, args.warmup, lambda: RayEngine(options))
    return {**measured, **actor_timings(measured), "ray_start_s": started}


class PassThrough:
    """An actor that returns its rows: Ray Data's own cost, without pneumoscan."""

    def __call__(self, batch: dict) -> dict:
        return batch


def measure_ray_data_alone(args) -> dict:
    """The ray engine's dataset shape with none of pneumoscan's stages in its actors: the same
    rows (the discovered files, pickled as the engine's are), blocks, fused pass-through
    stage, autoscaling actor pool starting at one actor a CPU, batch size and ordered
    iteration, but actors that return their rows (they import only the rows' record types,
    pneumoscan.records, to unpickle them). What Ray Data itself costs a run here: the floor
    under the ray engine's overhead."""
    import ray

    from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE
    from pneumoscan.inference.ray_engine import FILES_PER_BLOCK
    from pneumoscan.inputs.discover import discover

    init_ray(args)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_fallback_to_arrow_object_ext_type = True
    context.execution_options.preserve_order = True
    actors = int(ray.cluster_resources()["CPU"])
    for folder in (args.warmup, args.folder):
        clock = Clock()
        rows = [{"index": i, "item": item} for i, item in enumerate(discover(folder))]
        dataset = (ray.data.from_items(rows, override_num_blocks=-(-len(rows) // FILES_PER_BLOCK))
                   .map_batches(lambda batch: batch, batch_size=None, num_cpus=1)
                   .map_batches(PassThrough, batch_size=DEFAULT_BATCH_SIZE, num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(
                                    min_size=1, max_size=None, initial_size=actors)))
        returned = 0
        for row in dataset.iter_rows():
            clock.note_first(row)
            returned += 1
        measured = clock.read()
        assert returned == len(rows), (returned, len(rows))
    return {**measured, "first_result_s": clock.first}


def measure_cli(args) -> dict:
    """`pneumoscan run FOLDER --json OUT` in a child process on a fresh state, with the
    engine of `args.engine`: its wall seconds; the CPU seconds and peak RSS of the processes
    it waited for (with a Ray started by the run, Ray's own processes too)."""
    command = [sys.executable, "-m", "pneumoscan", "run", str(args.folder), "--device", "cpu"]
    if args.engine == "ray":
        command += ["--engine", "ray"] + (["--ray-address", args.address] if args.address
                                          else [])
    with tempfile.TemporaryDirectory() as out:
        results = Path(out) / "results.json"
        before = os.times()
        started = time.perf_counter()
        done = subprocess.run([*command, "--json", str(results)], capture_output=True,
                              text=True)
        seconds = time.perf_counter() - started
        after = os.times()
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
        counts = json.loads(results.read_text())["counts"]
    assert counts["classified"] == sum(1 for _ in args.folder.iterdir()), counts
    return {"seconds": seconds,
            "cpu_s": (after.children_user + after.children_system
                      - before.children_user - before.children_system),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


MEASURES = {"local": measure_local, "ray": measure_ray, "ray-data-alone": measure_ray_data_alone,
            "cli": measure_cli}


def worker(args) -> None:
    result = MEASURES[args.worker](args)
    result.setdefault("peak_rss_mb", peak_rss_mb())  # the cli rows give their children's
    print(json.dumps(result))


# --- the driver -----------------------------------------------------------------------------

def run_measure(name: str, folder: Path, warmup: Path, script: Path = Path(__file__),
                **extra) -> dict:
    """Measure `name` of `script` (this one, or another benchmark with the same worker
    options) in a subprocess of its own."""
    cmd = [sys.executable, str(script), "--worker", name, "--folder", str(folder),
           "--warmup", str(warmup)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name:<14} {folder.name}: {result['seconds']:.2f} s, {result['cpu_s']:.2f} CPU s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return result


def interleaved(rows: dict[str, dict], folder: Path, warmup: Path, repeats: int,
                script: Path = Path(__file__)) -> dict:
    """Each row (name -> measure of `script` and its options) `repeats` times, interleaved."""
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for _ in range(repeats):
        for row, spec in rows.items():
            runs[row].append(run_measure(spec["measure"], folder, warmup, script,
                                         **spec.get("options", {})))
    return {row: {"seconds": [r["seconds"] for r in done],
                  "median": {key: statistics.median(r[key] for r in done)
                             for key in done[0] if key != "started"},
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in done)}
            for row, done in runs.items()}


def table(title: str, n: int, results: dict, reference: str) -> list[str]:
    lines = [f"### {title}", "", "| row | runs (s) | median (s) | images/s | vs "
             f"{reference} | first result (s) | CPU ms / image | peak RSS (MB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, r in results.items():
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        median = r["median"]
        first = median.get("first_result_s")
        lines.append(f"| {row} | {runs} | {median['seconds']:.2f} | "
                     f"{n / median['seconds']:.1f} | "
                     f"{median['seconds'] / results[reference]['median']['seconds']:.2f}x | "
                     f"{'' if first is None else f'{first:.2f}'} | "
                     f"{1000 * median['cpu_s'] / n:.2f} | {r['peak_rss_mb']:.0f} |")
    return lines + [""] + [
        f"{row}: ray.init {r['median']['ray_start_s']:.1f} s (not in the row); "
        f"{r['median']['actors']:.0f} actor(s), the slowest started in "
        f"{r['median']['actor_init_s']:.2f} s; the actors worked "
        f"{100 * r['median']['actor_busy']:.0f}% of the run's wall time"
        for row, r in results.items() if "actors" in r["median"]] + [""]


def add_common_arguments(p: argparse.ArgumentParser, measures: dict) -> None:
    """--json, and the options the driver gives a measuring subprocess (run_measure)."""
    p.add_argument("--json", type=Path, help="also write the raw measurements here")
    p.add_argument("--worker", choices=measures, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=Path, help=argparse.SUPPRESS)


def print_results(out: list[str], raw: dict, json_path: Path | None) -> None:
    """The tables (and the load after them); the raw measurements into `json_path`."""
    out.append(f"load average after: {os.getloadavg()}")
    print("\n".join(out))
    if json_path:
        json_path.write_text(json.dumps({"machine": machine(), "results": raw}, indent=1))


def load_line(part: str) -> str:
    return f"load average before {part}: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="overhead,cli,scaling,memory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--originals", type=int, default=1000)
    p.add_argument("--memory-files", type=int, default=20000)
    add_common_arguments(p, MEASURES)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--actors", type=int, help=argparse.SUPPRESS)
    p.add_argument("--actor-cpus", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=("local", "ray"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.update(RAY_ENV)  # inherited by the measuring subprocesses and `ray start`
    if args.worker:
        return worker(args)
    parts = args.parts.split(",")
    # Hard links need the same filesystem as the data: the system temporary folder here.
    root = Path(tempfile.mkdtemp(prefix="pneumoscan-bench-ray-"))
    raw, out = {}, [f"machine: {machine()}", f"load average before: {os.getloadavg()}", ""]
    try:
        originals = sources(ORIGINALS)
        warmup = linked_folder(originals, WARMUP_IMAGES, root / "warmup")
        if {"overhead", "scaling", "cli"} & set(parts):
            folder = linked_folder(originals, args.originals, root)
        if "overhead" in parts:
            print("overhead:", file=sys.stderr)
            out.append(load_line("overhead"))
            with LoopbackCluster(os.cpu_count(), []) as cluster:
                raw["overhead"] = interleaved(
                    {"local engine": {"measure": "local"},
                     "ray engine": {"measure": "ray"},
                     "ray engine, --ray-address": {"measure": "ray", "options": {
                         "address": cluster.address}},
                     "Ray Data alone (pass-through actors)": {"measure": "ray-data-alone"},
                     "Ray Data alone, --ray-address": {"measure": "ray-data-alone",
                                                       "options": {"address": cluster.address}}},
                    folder, warmup, args.repeats)
            out += table(f"{args.originals} originals: ray engine vs local engine "
                         f"(median of {args.repeats})", args.originals, raw["overhead"],
                         "local engine")
        if "scaling" in parts:
            raw["scaling"] = {}
            out.append(load_line("scaling"))
            for workers in (1, 2):
                print(f"scaling, {workers} worker node(s):", file=sys.stderr)
                with LoopbackCluster(0, [1] * workers) as cluster:
                    rows = {f"{workers} worker(s) of 1 CPU": {"measure": "ray", "options": {
                        "address": cluster.address, "actors": workers}}}
                    raw["scaling"].update(interleaved(rows, folder, warmup, args.repeats))
            first = next(iter(raw["scaling"]))
            out += table(f"{args.originals} originals on a loopback cluster (median of "
                         f"{args.repeats})", args.originals, raw["scaling"], first)
        if "cli" in parts:
            print("cli:", file=sys.stderr)
            out.append(load_line("cli"))
            with LoopbackCluster(os.cpu_count(), []) as cluster:
                rows = {"local engine": {"measure": "cli", "options": {"engine": "local"}},
                        "ray engine, --ray-address": {"measure": "cli", "options": {
                            "engine": "ray", "address": cluster.address}},
                        "ray engine, Ray started by the run": {"measure": "cli", "options": {
                            "engine": "ray"}}}
                for spec in rows.values():  # untimed: imports cached, the cluster in use
                    run_measure(spec["measure"], warmup, warmup, **spec["options"])
                raw["cli"] = interleaved(rows, folder, warmup, args.repeats)
            out += table(f"{args.originals} originals: `pneumoscan run --json` in a process "
                         f"of its own (median of {args.repeats})", args.originals, raw["cli"],
                         "local engine")
        if "memory" in parts:
            print("memory:", file=sys.stderr)
            out.append(load_line("memory"))
            small = linked_folder(sources(SMALL), args.memory_files, root)
            raw["memory"] = interleaved({"local engine": {"measure": "local"},
                                         "ray engine": {"measure": "ray"}},
                                        small, warmup, 1)
            out += table(f"{args.memory_files} files (224 px): the driver's peak RSS",
                         args.memory_files, raw["memory"], "local engine")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_results(out, raw, args.json)


if __name__ == "__main__":
    main()
