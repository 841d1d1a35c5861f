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
Cost: the model alone (batch 32, preprocessed, median of --repeats runs) with and without
the guard's output, when --unguarded names the model without it.
"""

from __future__ import annotations

import argparse
import statistics
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


def model_seconds(model, batch: np.ndarray, repeats: int) -> float:
    model.predict(batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="guarded ONNX model (default: shipped)")
    parser.add_argument("--unguarded", type=Path, help="the same model without its guard")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    model = api.open_model(args.model, "cpu")
    if scope_threshold(model.info) is None:
        parser.error("the model has no scope guard")
    data = args.data
    print(f"model {model.info.name} {model.info.version} ({model.info.sha256[:12]}), "
          f"scope threshold {scope_threshold(model.info):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
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
    if args.unguarded:
        from pneumoscan.inference.pipeline import read_model_input

        paths = sorted((data / "kermany-original").rglob("*.jpeg"))[:32]
        batch = np.stack([read_model_input(p, model.info.preprocessing) for p in paths])
        guarded = model_seconds(model, batch, args.repeats)
        plain = model_seconds(api.open_model(args.unguarded, "cpu"), batch, args.repeats)
        print(f"model alone, batch {len(batch)}: {plain / len(batch) * 1000:.2f} ms/image "
              f"without the guard, {guarded / len(batch) * 1000:.2f} with it "
              f"(+{(guarded - plain) / len(batch) * 1000:.2f} ms, x{guarded / plain:.3f}); "
              f"medians of {args.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
