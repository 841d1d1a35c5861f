"""`pneumoscan run` against the shared-core bound, in one command, on real chest X-rays
(../shared/data).

    python benchmarks/bench_bound.py [--files 1500] [--repeats 3] [--json FILE]

N originals (the 100 Kermany originals hard-linked under N distinct names, so every file is
its own entry in the state), one row a measurement, each in its own subprocess, repeats
interleaved across rows so that background load falls on all of them alike:
  model alone           the shipped model (with its scope guard), ONNX Runtime's CPU EP as
                        `run` opens and runs it (one thread a batch, a batch a core at
                        once), on batches of 32 decoded beforehand
  model alone, one batch on every core
                        the same, one batch at a time with every core on it (how `run`
                        ran it before)
  model alone, no guard the same model with the guard's nodes, output and metadata taken
                        out (built by this script): what the guard adds to the model
  decode alone          what the local engine's worker threads do for each file (read,
                        decode with Pillow's draft, resize), on as many threads as `run`
                        uses, no model
  run --json            `pneumoscan run N --json OUT` in this process (the library call:
                        the state ledger, the run log, the JSON), on a fresh state
  run --out report.pdf  the same with the whole-run PDF report instead of the JSON
The shared-core bound is 1 / (1/model-alone + 1/decode-alone) images/s, the model alone
the faster of its two ways: the model and the decoding share the same cores, so a run can
at best do one after the other's CPU. It is computed from the rows of this same run.
Target: run --json at >= 0.90 of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_pipeline import REPO, WARMUP_IMAGES, machine, peak_rss_mb
from bench_ray import (
    ORIGINALS,
    Clock,
    add_common_arguments,
    interleaved,
    linked_folder,
    load_line,
    print_results,
    sources,
)

sys.path.insert(0, str(REPO))  # this clone's pneumoscan, in the measuring processes too

ROWS = {"model alone": {"measure": "model-alone"},
        "model alone, one batch on every core": {"measure": "model-alone",
                                                 "options": {"threads": "all"}},
        "model alone, no guard": {"measure": "model-alone", "options": {"guard": "off"}},
        "decode alone": {"measure": "decode-alone"},
        "run --json": {"measure": "run", "options": {"output": "json"}},
        "run --out report.pdf": {"measure": "run", "options": {"output": "pdf"}}}


def without_guard(model_path: Path, out: Path) -> Path:
    """A copy of the model at `model_path` without its scope guard."""
    import onnx

    from pneumoscan.modelling import scope_guard

    model = scope_guard.without_guard(onnx.load(str(model_path)))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


# --- measurements (each in its own subprocess) -----------------------------------------------

def measure_model_alone(args) -> dict:
    """model.predict on batches of `run`'s size decoded beforehand (8 distinct, cycled), as
    many at once as `run` runs them (`--threads all`: one at a time, each on every core)."""
    import numpy as np

    from pneumoscan import api
    from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, prepare
    from pneumoscan.inference.preprocess import normalise
    from pneumoscan.inputs.discover import discover
    from pneumoscan.workers import available_cores

    threads = available_cores() if args.threads == "all" else None
    model = api.open_model(args.model, device="cpu", threads=threads)
    assert (model.info.extra.get("scope_guard") is None) == (args.guard == "off")
    prep = model.info.preprocessing
    items = list(discover(args.folder))
    pool = [normalise(np.stack([prepare(item, prep).model_pixels
                                for item in items[i:i + DEFAULT_BATCH_SIZE]]), prep)
            for i in range(0, min(len(items), 8 * DEFAULT_BATCH_SIZE), DEFAULT_BATCH_SIZE)]
    batches = -(-len(items) // DEFAULT_BATCH_SIZE)
    with ThreadPoolExecutor(model.concurrent_batches) as lanes:
        list(lanes.map(model.predict, pool[:model.concurrent_batches]))
        clock = Clock()
        list(lanes.map(model.predict, (pool[i % len(pool)] for i in range(batches))))
        return clock.read()


def measure_decode_alone(args) -> dict:
    """What the local engine's worker threads do for each file, with no model running."""
    from pneumoscan import api
    from pneumoscan.inference.pipeline import default_workers, prepare
    from pneumoscan.inputs.discover import discover

    prep = api.open_model(device="cpu").info.preprocessing
    clock = Clock()
    items = list(discover(args.folder))
    with ThreadPoolExecutor(default_workers()) as pool:
        for _ in pool.map(prepare, items, [prep] * len(items)):
            pass
    return clock.read()


def measure_run(args) -> dict:
    """`pneumoscan run FOLDER --json OUT` (or `--out OUT.pdf`) on a fresh state, in this
    process, after one on the warm-up folder; `classified_s`: when every file had its
    result (the outputs are written after)."""
    from pneumoscan import api

    class Classified(api.RunEvents):
        def classified(self) -> None:
            self.seconds = clock.read()["seconds"]

    out = Path(tempfile.mkdtemp())
    try:
        for name, folder in (("warmup", args.warmup), ("measured", args.folder)):
            path = out / f"{name}.{args.output}"
            options = (api.RunOptions(folder, json=path, device="cpu") if args.output == "json"
                       else api.RunOptions(folder, report=path, device="cpu"))
            clock, events = Clock(), Classified()
            summary = api.run(options, events)
            measured = clock.read()
        assert summary.scan.counts().classified == sum(1 for _ in args.folder.iterdir())
        assert path.stat().st_size > 0
    finally:
        shutil.rmtree(out)
    return {**measured, "classified_s": events.seconds}


MEASURES = {"model-alone": measure_model_alone, "decode-alone": measure_decode_alone,
            "run": measure_run}


# --- the driver -------------------------------------------------------------------------------

def bound_table(n: int, result: dict, repeats: int) -> list[str]:
    rate = {row: n / r["median"]["seconds"] for row, r in result.items()}
    # The model alone the faster of the two ways: the bound is what the cores allow.
    model_rate = max(rate["model alone"], rate["model alone, one batch on every core"])
    bound = 1 / (1 / model_rate + 1 / rate["decode alone"])
    lines = [f"### {n} originals, files -> outputs: `run` against the shared-core bound "
             f"(median of {repeats})", "",
             "| row | runs (s) | median (s) | images/s | / bound | CPU ms / image | "
             "peak RSS (MB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for row, r in result.items():
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        lines.append(f"| {row} | {runs} | {r['median']['seconds']:.2f} | {rate[row]:.1f} | "
                     f"{rate[row] / bound:.2f} | {1000 * r['median']['cpu_s'] / n:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
        if row == "decode alone":
            lines.append(f"| shared-core bound 1/(1/model + 1/decode) |  |  | {bound:.1f} | "
                         "1.00 |  |  |")
    guarded, plain = (result[row]["median"]["seconds"]
                      for row in ("model alone", "model alone, no guard"))
    # Each repeat runs the rows one after the other: its two model rows are a pair.
    paired = statistics.median(g / p for g, p in zip(
        *(result[row]["seconds"] for row in ("model alone", "model alone, no guard"))))
    pdf = result["run --out report.pdf"]["median"]
    extra = (result["run --json"]["median"]["cpu_s"] - result["model alone"]["median"]["cpu_s"]
             - result["decode alone"]["median"]["cpu_s"])
    return lines + ["",
                    f"the scope guard: {paired - 1:+.1%} of the model without it (median of "
                    f"the {repeats} repeats' ratios; {guarded / plain - 1:+.1%} between the "
                    f"rows' medians, {1000 * (guarded - plain) / n:.2f} ms an image); "
                    "target <= 10%",
                    f"run --json: {rate['run --json'] / bound:.2f} of the bound (target 0.90); "
                    f"CPU beyond model + decoding: {1000 * extra / n:.2f} ms an image",
                    f"run --out report.pdf: every file classified after "
                    f"{pdf['classified_s']:.2f} s ({n / pdf['classified_s']:.1f} images/s, "
                    f"{n / pdf['classified_s'] / bound:.2f} of the bound), the PDF written in "
                    f"the {pdf['seconds'] - pdf['classified_s']:.2f} s after", ""]


def run_rows(args, folder: Path, warmup: Path, unguarded: Path) -> dict:
    rows = {}
    for row, spec in ROWS.items():
        options = dict(spec.get("options", {}))
        if options.get("guard") == "off":
            options["model"] = unguarded
        rows[row] = {"measure": spec["measure"], "options": options}
    return interleaved(rows, folder, warmup, args.repeats, script=Path(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    add_common_arguments(p, MEASURES)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--guard", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    p.add_argument("--threads", choices=("run", "all"), default="run", help=argparse.SUPPRESS)
    p.add_argument("--output", choices=("json", "pdf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = MEASURES[args.worker](args)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    from pneumoscan.inference.model import default_model_path

    # Hard links need the same filesystem as the data: the system temporary folder here.
    root = Path(tempfile.mkdtemp(prefix="pneumoscan-bench-bound-"))
    out = [f"machine: {machine()}", f"model: {default_model_path()}", ""]
    try:
        originals = sources(ORIGINALS)
        warmup = linked_folder(originals, WARMUP_IMAGES, root / "warmup")
        folder = linked_folder(originals, args.files, root)
        unguarded = without_guard(default_model_path(), root / "no-guard.onnx")
        out.append(load_line("the rows"))
        result = run_rows(args, folder, warmup, unguarded)
        out += bound_table(args.files, result, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_results(out, result, args.json)


if __name__ == "__main__":
    main()
