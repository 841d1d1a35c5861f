"""CPU time per image of ONNX models alone (batch 32, run path session), side by side.

    python benchmarks/bench_model_cost.py MODEL [MODEL ...] [--repeats 7] [--threads 2]

One batch of 32 real 224 px chest X-rays (../shared/data/kermany224), preprocessed as each
model's metadata asks; each repeat times one `predict` call per model, models in turn, so a
busy machine slows them alike. Printed: the median milliseconds per image of each model and
its ratio to the first model's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "kermany224" / "train"
BATCH = 32


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from pneumoscan import api
    from pneumoscan.inference.pipeline import read_model_input

    p = argparse.ArgumentParser(prog="python benchmarks/bench_model_cost.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: the run's)")
    args = p.parse_args(argv)
    files = sorted(IMAGES.rglob("*.jpeg"))
    files = files[:: max(1, len(files) // BATCH)][:BATCH]  # both classes
    models = [api.open_model(path, "cpu", threads=args.threads) for path in args.models]
    batches = [np.stack([read_model_input(f, m.info.preprocessing) for f in files])
               for m in models]
    for model, batch in zip(models, batches):
        model.predict(batch)  # warm-up
    seconds: list[list[float]] = [[] for _ in models]
    for _ in range(args.repeats):
        for i, (model, batch) in enumerate(zip(models, batches)):
            started = time.perf_counter()
            model.predict(batch)
            seconds[i].append(time.perf_counter() - started)
    first = statistics.median(seconds[0])
    for path, runs in zip(args.models, seconds):
        median = statistics.median(runs)
        print(f"{path}: {median / BATCH * 1000:.1f} ms/image (median of {args.repeats} "
              f"batches of {BATCH}), {median / first:.2f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
