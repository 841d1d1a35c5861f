"""The scope guard's flag rates on real images, and what it adds to the model's CPU time.

    python benchmarks/bench_scope.py [--model M] [--unguarded U] [--data ../shared/data]

Each set goes through `api.scan` as `pneumoscan run` reads it (decoders, preprocessing,
metadata rules and the model's `scope_score`), and the share of its classified images that
are out of scope is printed, with the pixel check alone beside it:
  kermany-val       the validation split of kermany224 (by patient, 15%, seed 42: the split
                    the shipped model was trained with and the guard's threshold set on)
  kermany-original  the 100 TRAIN images at original resolution
  kermany-val-orig  the 16 official VAL images at original resolution
  adult-dev         54 adult chest X-rays (another hospital; the guard never saw them)
  dicom-chest       the adult CR DICOMs (RG1 uncompressed and JPEG 2000, CR-MONO1)
  photos            scikit-image's sample photographs, as PNG
  extremity-png     the tibia of RG3_J2KI.dcm, saved as PNG (its DICOM is skipped as such)
Cost, against the same model without its guard (--unguarded, or made by taking the guard
out): the model alone on a preprocessed batch of 32 originals, as many at once as `run`
runs them, the two models in turn, half the --repeats with each listed first
(guard_cost); the guard's share is the geometric mean of the two halves' median paired
ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pneumoscan import api  # noqa: E402
from pneumoscan.inference.scope import PIXEL_REASON, scope_threshold  # noqa: E402

from bench_bound import without_guard  # noqa: E402


def photo_folder(folder: Path) -> Path:
    from skimage import data as images

    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page",
             "text", "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
             "horse", "cat", "retina", "colorwheel"]
    for name in names:
        pixels = getattr(images, name)()
        if pixels.dtype != np.uint8:
            pixels = (pixels.astype(float) / pixels.max() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def extremity_folder(data: Path, folder: Path) -> Path:
    import pydicom

    from pneumoscan.inputs.dicom import _render

    Image.fromarray(_render(pydicom.dcmread(data / "dicom" / "RG3_J2KI.dcm"))).save(
        folder / "RG3_tibia.png")
    return folder


def kermany_val_folder(data: Path, folder: Path) -> Path:
    from pneumoscan.evaluation.datasets import list_samples, split_by_patient

    _, val = split_by_patient(list_samples(data / "kermany224"), 0.15, 42)
    for sample in val:
        (folder / sample.path.name).symlink_to(sample.path.resolve())
    return folder


def dicom_folder(data: Path, folder: Path) -> Path:
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "CR-MONO1-10-chest.dcm"):
        (folder / name).symlink_to((data / "dicom" / name).resolve())
    return folder


def flag_rates(model, folder: Path) -> tuple[int, int, int]:
    """(classified, out of scope, out of scope by the pixel check)."""
    results = [r for r in api.scan(folder, model, render=False).results if r.status == "ok"]
    by_pixels = sum(any(reason.startswith(PIXEL_REASON) for reason in r.scope_reasons)
                    for r in results)
    return len(results), sum(r.in_scope is False for r in results), by_pixels


def paired_seconds(models: list, batch: np.ndarray, repeats: int) -> np.ndarray:
    """(repeats, len(models)) seconds for as many batches at once as `run` runs on each
    model (its `concurrent_batches`, each on its share of the cores), the models taken in
    turn within each repeat so that background load falls on them alike. Each timing
    follows an untimed run of the same model, as in `run`, which runs one model batch
    after batch."""
    from concurrent.futures import ThreadPoolExecutor

    times = np.zeros((repeats, len(models)))
    with ThreadPoolExecutor(max(m.concurrent_batches for m in models)) as lanes:
        for repeat in range(repeats):
            first = repeat % len(models)
            for column in [*range(first, len(models)), *range(first)]:
                model = models[column]
                list(lanes.map(model.predict, [batch] * model.concurrent_batches))
                start = time.perf_counter()
                list(lanes.map(model.predict, [batch] * model.concurrent_batches))
                times[repeat, column] = (time.perf_counter() - start) / model.concurrent_batches
    return times


def guard_cost(guarded_path: Path, unguarded_path: Path, data: Path, repeats: int) -> str:
    """The guard's share of the model's time, measured twice: with the guarded model opened
    and listed first, then the unguarded one (the first of two models in a process ran
    7-12% slower on this machine, whichever it was); each half is the median of its
    paired ratios, and the figure their geometric mean."""
    from pneumoscan.inference.pipeline import read_model_input

    paths = sorted((data / "kermany-original").rglob("*.jpeg"))[:32]
    halves, per_image = [], []
    for order in ((guarded_path, unguarded_path), (unguarded_path, guarded_path)):
        models = [api.open_model(p, "cpu") for p in order]
        batch = np.stack([read_model_input(p, models[0].info.preprocessing) for p in paths])
        times = paired_seconds(models, batch, max(1, repeats // 2))
        guarded = order.index(guarded_path)
        halves.append(float(np.median(times[:, guarded] / times[:, 1 - guarded])))
        per_image.append(np.median(times, axis=0)[[guarded, 1 - guarded]] / len(batch) * 1000)
        del models
    share = float(np.sqrt(halves[0] * halves[1])) - 1
    guarded_ms, plain_ms = np.mean(per_image, axis=0)
    return (f"model alone, batch {len(paths)} as `run` runs it, {repeats} repeats in turn: "
            f"{plain_ms:.2f} ms/image without the guard, {guarded_ms:.2f} with it; the guard "
            f"adds {share:+.1%} ({halves[0] - 1:+.1%} listed first, {halves[1] - 1:+.1%} "
            f"listed second; medians of the paired ratios)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="guarded ONNX model (default: shipped)")
    parser.add_argument("--unguarded", type=Path, help="the same model without its guard "
                        "(default: made from --model by taking the guard out)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    model = api.open_model(args.model, "cpu")
    if scope_threshold(model.info) is None:
        parser.error("the model has no scope guard")
    data = args.data
    print(f"model {model.info.name} {model.info.version} ({model.info.sha256[:12]}), "
          f"scope threshold {scope_threshold(model.info):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        # The cost first, on models opened for it alone: the scans below leave nothing
        # behind in them that could change what it measures.
        print(guard_cost(model.info.path, args.unguarded or without_guard(
            model.info.path, Path(tmp) / "unguarded.onnx"), data, args.repeats), flush=True)

        def fresh(name: str) -> Path:
            folder = Path(tmp) / name
            folder.mkdir()
            return folder

        sets = {
            "kermany-val": kermany_val_folder(data, fresh("val")),
            "kermany-original": data / "kermany-original",
            "kermany-val-orig": data / "kermany-val-original",
            "adult-dev": data / "adult-dev",
            "dicom-chest": dicom_folder(data, fresh("dicom")),
            "photos": photo_folder(fresh("photos")),
            "extremity-png": extremity_folder(data, fresh("extremity")),
        }
        print(f"{'set':18} {'images':>6} {'out of scope':>13} {'by pixels':>10}")
        for name, folder in sets.items():
            count, flagged, by_pixels = flag_rates(model, folder)
            print(f"{name:18} {count:6d} {flagged:5d} ({flagged / count:5.1%}) "
                  f"{by_pixels / count:9.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
