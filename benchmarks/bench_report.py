"""How long the report stage takes for N real chest X-rays.

Images: the 224 px Kermany JPEGs under shared/data/kermany224/train, grouped into studies
by patient as the data README describes (about 1.8 images per study), with synthetic but
plausible CAMs (two blobs over the lung fields), probabilities and DICOM-like metadata,
plus 1 % skipped files. Prints wall-clock and CPU seconds for the pictures (X-ray beside
its CAM overlay, made in the pipeline's worker threads; one thread here), the HTML and the
PDF, and the PDF's images/s to hold against classification (bench_pipeline.py). On a shared
machine the CPU seconds are the steadier figure.

    nice -n 19 python benchmarks/bench_report.py [--sizes 100 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from pneumoscan.api import Scan, write_per_study
from pneumoscan.evaluation.datasets import patient_id
from pneumoscan.inputs.loading import load_path
from pneumoscan.records import FileResult, RunInfo
from pneumoscan.report.html import render_html
from pneumoscan.report.pdf import render_pdf
from pneumoscan.report.pictures import render_picture
from pneumoscan.workers import available_cores

T = TypeVar("T")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kermany224" / "train"
THRESHOLD = 0.5
RUN = RunInfo(model_name="densenet121-kermany", model_version="1.0.0",
              model_sha256="3f2a9c1e5b7d4f60a1c2e3d4b5a69788c0d1e2f3a4b5c6d7e8f90a1b2c3d4e5f",
              provider="CPUExecutionProvider", pneumoscan_version="0.1.0",
              started="2025-01-01T09:00:00Z", finished="2025-01-01T09:00:20Z", threshold=THRESHOLD)


def plausible_cam(rng: np.random.Generator, pneumonia: bool) -> np.ndarray:
    """7 x 7, 0..1: one blob per lung field, the stronger one where the 'finding' is."""
    y, x = np.mgrid[0:7, 0:7].astype(np.float32)
    cam = np.zeros((7, 7), np.float32)
    for centre_x, weight in ((2.0, 1.0 if pneumonia else 0.4), (4.5, rng.uniform(0.2, 0.8))):
        centre_y = rng.uniform(2.5, 4.5)
        cam += weight * np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / 3.0)
    cam += rng.uniform(0, 0.1, (7, 7)).astype(np.float32)
    return (cam - cam.min()) / (cam.max() - cam.min())


def pick_files(n: int) -> list[Path]:
    """n files, half of each class, consecutive so that a patient's images stay together."""
    normal = sorted((DATA / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((DATA / "PNEUMONIA").glob("*.jpeg"))
    return normal[: n // 2] + pneumonia[: n - n // 2]


@dataclass
class Timing:
    """Medians over the runs: wall-clock seconds, and CPU seconds of this process (the
    fairer figure on a shared machine)."""
    wall: float
    cpu: float


def timed(work: Callable[[], T], repeats: int) -> tuple[Timing, T]:
    """Medians of `repeats` runs, and the last run's output."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        output = work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus)), output


def build_results(paths: list[Path]) -> tuple[list[FileResult], Timing]:
    """FileResults with real pixels and pictures; also the time spent on pictures."""
    rng = np.random.default_rng(0)
    results, pictures = [], Timing(0.0, 0.0)
    for i, path in enumerate(paths):
        patient = patient_id(path)
        if i % 100 == 99:
            results.append(FileResult(path, patient, "skipped", "not a frontal chest radiograph"))
            continue
        loaded = load_path(path)
        pneumonia = path.parent.name == "PNEUMONIA"
        probability = float(np.clip(rng.normal(0.85 if pneumonia else 0.2, 0.15), 0, 1))
        cam = plausible_cam(rng, pneumonia)
        picture_time, picture = timed(partial(render_picture, loaded.pixels, cam), 1)
        pictures = Timing(pictures.wall + picture_time.wall, pictures.cpu + picture_time.cpu)
        metadata = {"PatientID": patient, "PatientName": f"Anonymous^{patient}", "Modality": "CR",
                    "ViewPosition": "PA", "StudyDate": "20250101"}
        results.append(FileResult(path, patient, "ok", probability=probability,
                                  label="PNEUMONIA" if probability >= THRESHOLD else "NORMAL",
                                  threshold=THRESHOLD, metadata=metadata,
                                  picture=picture))
    return results, pictures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3, help="runs per size under 1000 images")
    args = parser.parse_args()
    print("wall / CPU seconds (pictures: total of one thread; HTML and PDF: median of runs);"
          " per-study reports: wall seconds, in this process / in one worker process per core")
    print(f"{'N':>5} {'studies':>7} {'pictures s':>13} {'HTML s':>11} {'PDF s':>13} "
          f"{'PDF images/s':>13} {'HTML MB':>7} {'PDF MB':>6} {'per-study s':>13}")
    for n in args.sizes:
        results, pictures = build_results(pick_files(n))
        repeats = args.repeats if n < 1000 else 1
        html_time, html = timed(partial(render_html, RUN, results), repeats)
        pdf_time, pdf = timed(partial(render_pdf, html), repeats)
        studies = len({r.study for r in results})
        scan = Scan(run=RUN, results=results)
        with tempfile.TemporaryDirectory() as folder:
            per_study = [timed(partial(write_per_study, Path(folder), scan, processes=processes),
                               1)[0].wall for processes in (1, available_cores())]
        print(f"{n:>5} {studies:>7} {pictures.wall:>6.2f}/{pictures.cpu:<6.2f} "
              f"{html_time.wall:>5.2f}/{html_time.cpu:<5.2f} "
              f"{pdf_time.wall:>6.2f}/{pdf_time.cpu:<6.2f} "
              f"{n / pdf_time.wall:>6.1f}/{n / pdf_time.cpu:<6.1f} "
              f"{len(html) / 1e6:>7.1f} {len(pdf) / 1e6:>6.1f} "
              f"{per_study[0]:>6.2f}/{per_study[1]:<6.2f}")


if __name__ == "__main__":
    main()
