"""Peak memory of writing the whole-run report of N images, as HTML and as PDF.

Each case runs in a process of its own, which first builds N results holding distinct
report pictures (the X-ray beside a CAM, from a real 224 px Kermany image; each result its
own copy, as results read from the state ledger are), then writes the report. Prints the
peak resident memory of the process (VmHWM) before and after writing, the difference (what
writing the report added) and the file's size. A PDF of more than PDF_MAX_IMAGES images is
the run's summary only (README: very large runs).

    nice -n 19 python benchmarks/bench_report_memory.py [--sizes 1000 5000 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany224" / "train"

CASE = r"""
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.report.html import write_report
from pneumoscan.report.pictures import render_picture

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

n, image, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
pixels = np.asarray(Image.open(image).convert("L"))
rng = np.random.default_rng(0)
picture = render_picture(pixels, rng.random((7, 7), dtype=np.float32))
run = RunInfo("bench", "1", "0" * 64, "CPU", "bench", "now", "later", threshold=0.5)
# Trailing bytes after a JPEG's end marker are ignored by decoders: distinct objects of
# the real size, as N pictures read from the ledger are.
results = [FileResult(Path(f"/scans/study{i // 2:05}/{i:05}.png"), f"/scans/study{i // 2:05}",
                      "ok", probability=float(i % 100) / 100, label="PNEUMONIA" if i % 3 else
                      "NORMAL", threshold=0.5, picture=picture + i.to_bytes(4, "big"))
           for i in range(n)]
before = peak_mib()
write_report(out, run, results)
print(json.dumps({"before_mib": before, "peak_mib": peak_mib(), "bytes": out.stat().st_size}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    args = parser.parse_args()
    image = next((DATA / "NORMAL").glob("*.jpeg"))
    print(f"{'images':>7} {'format':>6} {'before MiB':>10} {'peak MiB':>9} {'added MiB':>9} "
          f"{'file MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            for suffix in ("html", "pdf"):
                out = Path(tmp) / f"report.{suffix}"
                done = subprocess.run([sys.executable, "-c", CASE, str(n), str(image), str(out)],
                                      capture_output=True, text=True, check=True)
                m = json.loads(done.stdout)
                print(f"{n:>7} {suffix:>6} {m['before_mib']:>10.0f} {m['peak_mib']:>9.0f} "
                      f"{m['peak_mib'] - m['before_mib']:>9.0f} {m['bytes'] / 1e6:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
