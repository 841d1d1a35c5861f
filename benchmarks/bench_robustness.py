"""Does the score depend on how a scan was stored? Each labelled original, stored ten ways,
through `pneumoscan run` itself (`api.run`), against the score of the original file.

    python benchmarks/bench_robustness.py [--model M] [--jpeg-quality Q|none] [--json OUT]

Images: the 100 original-resolution TRAIN images in ../shared/data/kermany-original and the 16
official VAL images in ../shared/data/kermany-val-original (labels from their folders).
Ways of storing each one (the reference is the original JPEG as distributed):
  resized-box, -bilinear, -bicubic, -lanczos   squashed to the model's input size with that
                                               Pillow filter, saved as PNG (as other people
                                               make 224 px copies)
  jpeg-q50, jpeg-q95                           re-encoded at full size with that quality
  png16                                        full size, 16-bit PNG (values x 257)
  dicom-uncompressed                           full size, 12 bits stored in 16, explicit VR
                                               little endian, with a VOI window
  dicom-j2k-lossless                           the same data set, JPEG 2000 lossless
Printed: per way and over all of them, the mean, 95th percentile and maximum of |p - p_ref|,
decision flips against the reference at the model's threshold, and accuracy; and the largest
gap between the two lossless DICOM encodings of one image. `--jpeg-quality` runs a copy of the
model whose metadata asks for another JPEG round trip (`none`: without), to measure what that
preprocessing step does.
Targets (issue 10): mean |dp| <= 0.01, flips <= 1%, lossless DICOM pairs within 0.002.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ComputedRadiographyImageStorage, ExplicitVRLittleEndian,
                         JPEG2000Lossless, generate_uid)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SOURCES = (SHARED / "kermany-original", SHARED / "kermany-val-original")
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
RESIZE_FILTERS = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
REFERENCE = "original"
COMPLETE = "stored-copies-complete.txt"  # written last: a --keep folder that has it is reused


def labelled_originals() -> list[tuple[Path, int]]:
    found = [(path, label) for source in SOURCES for label, name in enumerate(CLASS_NAMES)
             for path in sorted((source / name).glob("*.jpeg"))]
    if not found:
        sys.exit(f"no labelled originals under {', '.join(map(str, SOURCES))}")
    return found


def dicom_of(grey: np.ndarray, study: str) -> Dataset:
    """A frontal chest CR holding `grey` as 12-bit values (x 16) with a window that maps
    them back onto 0-255, uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[study])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (grey.astype(np.uint16) * 16).tobytes()
    return ds


def store_every_way(path: Path, out: Path, size: tuple[int, int]) -> None:
    """Writes out/<way>/<stem>.<ext> for every way of storing `path`."""
    def target(way: str, suffix: str) -> Path:
        folder = out / way
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{path.stem}{suffix}"

    original = Image.open(path)
    original.load()
    target(REFERENCE, ".jpeg").write_bytes(path.read_bytes())
    grey = original.convert("L")
    for name, resample in RESIZE_FILTERS.items():
        grey.resize(size, resample).save(target(f"resized-{name}", ".png"))
    for quality in (50, 95):
        grey.save(target(f"jpeg-q{quality}", ".jpeg"), quality=quality)
    pixels = np.asarray(grey)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(target("png16", ".png"))
    ds = dicom_of(pixels, path.stem)
    ds.save_as(target("dicom-uncompressed", ".dcm"), enforce_file_format=True)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(target("dicom-j2k-lossless", ".dcm"), enforce_file_format=True)


def with_preprocessing(model: Path, prep, out: Path) -> Path:
    """A copy of the ONNX model whose metadata asks for `prep`."""
    import onnx

    from pneumoscan.inference.model import META_PREFIX

    proto = onnx.load(str(model))
    for entry in proto.metadata_props:
        if entry.key == META_PREFIX + "preprocessing":
            entry.value = prep.to_json()
    onnx.save(proto, str(out))
    return out


def spread(dp: np.ndarray, flips: int) -> dict:
    return {"n": int(len(dp)), "mean_abs_dp": float(dp.mean()),
            "p95_abs_dp": float(np.percentile(dp, 95)), "max_abs_dp": float(dp.max()),
            "flips": flips, "flip_rate": flips / len(dp)}


def measure(scores: dict[str, dict[str, float]], labels: dict[str, int],
            threshold: float) -> dict:
    """Per way and overall spread against the reference, accuracy, lossless DICOM gaps."""
    ref = scores[REFERENCE]
    rows, all_dp, all_flips = {}, [], 0
    for way, by_image in scores.items():
        stems = sorted(by_image)
        p = np.array([by_image[s] for s in stems])
        y = np.array([labels[s] for s in stems])
        correct = float(((p >= threshold) == y.astype(bool)).mean())
        if way == REFERENCE:
            rows[way] = {"n": len(stems), "accuracy": correct}
            continue
        dp = np.abs(p - np.array([ref[s] for s in stems]))
        flips = int(((p >= threshold) != (np.array([ref[s] for s in stems]) >= threshold)).sum())
        rows[way] = {**spread(dp, flips), "accuracy": correct}
        all_dp.append(dp)
        all_flips += flips
    pairs = sorted(set(scores["dicom-uncompressed"]) & set(scores["dicom-j2k-lossless"]))
    lossless_gap = np.abs([scores["dicom-uncompressed"][s] - scores["dicom-j2k-lossless"][s]
                           for s in pairs])
    return {"ways": rows, "all": spread(np.concatenate(all_dp), all_flips),
            "lossless_dicom": {"n": len(pairs), "max_gap": float(lossless_gap.max()),
                               "mean_gap": float(lossless_gap.mean())}}


def print_table(result: dict) -> None:
    print(f"model {result['model']}, threshold {result['threshold']:.4f}, JPEG round trip "
          f"{result['jpeg_quality']}; {result['images']} images")
    print(f"{'way':22} {'n':>4} {'mean|dp|':>9} {'p95':>7} {'max':>7} {'flips':>6} {'acc':>6}")
    for way, row in [*result["ways"].items(), ("all ways", result["all"])]:
        if "mean_abs_dp" not in row:
            print(f"{way:22} {row['n']:4d} {'(reference)':>33} {row['accuracy']:6.3f}")
            continue
        acc = f"{row['accuracy']:6.3f}" if "accuracy" in row else ""
        print(f"{way:22} {row['n']:4d} {row['mean_abs_dp']:9.4f} {row['p95_abs_dp']:7.4f} "
              f"{row['max_abs_dp']:7.4f} {row['flips']:6d} {acc}")
    print(f"official VAL images correct (original files): {result['val_correct']}/"
          f"{result['val_images']}")
    gap = result["lossless_dicom"]
    print(f"lossless DICOM pairs (uncompressed vs JPEG 2000 lossless): max gap "
          f"{gap['max_gap']:.4f}, mean {gap['mean_gap']:.4f} over {gap['n']} images")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from pneumoscan import api
    from pneumoscan.inference.model import default_model_path

    p = argparse.ArgumentParser(prog="python benchmarks/bench_robustness.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped one)")
    p.add_argument("--jpeg-quality", help="override the model's JPEG round trip: a quality, "
                                          "or none")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--keep", type=Path, help="write the stored copies here and keep them; "
                                             "a later run with the same folder reuses them "
                                             "(writing takes minutes: JPEG 2000 at full size)")
    args = p.parse_args(argv)

    model_path = args.model or default_model_path()
    prep = api.open_model(model_path, "cpu").info.preprocessing
    originals = labelled_originals()
    labels = {path.stem: label for path, label in originals}
    held_out = [path.stem for path, _ in originals if path.is_relative_to(SOURCES[1])]
    with tempfile.TemporaryDirectory() as tmp:
        if args.jpeg_quality is not None:
            quality = None if args.jpeg_quality.lower() == "none" else int(args.jpeg_quality)
            prep = replace(prep, jpeg_quality=quality)
            model_path = with_preprocessing(model_path, prep, Path(tmp) / "model.onnx")
        root = (args.keep or Path(tmp)) / "scans"
        complete = root.parent / COMPLETE
        started = time.perf_counter()
        if not complete.exists():
            for path, _ in originals:
                store_every_way(path, root, (prep.width, prep.height))
            complete.write_text(f"{len(originals)} images, {prep.width}x{prep.height}\n")
        written = time.perf_counter() - started
        summary = api.run(api.RunOptions(scans=root, json=Path(tmp) / "results.json",
                                         model=model_path, device="cpu"))
    scan = summary.scan
    unscored = [r for r in scan.results if r.probability is None]
    for r in unscored:
        print(f"not scored: {r.path}: {r.status}: {r.reason}", file=sys.stderr)
    scores: dict[str, dict[str, float]] = {}
    for r in scan.results:
        if r.probability is not None:
            way = Path(r.path).relative_to(root).parts[0]
            scores.setdefault(way, {})[Path(r.path).stem] = r.probability
    result = {"model": f"{scan.run.model_name} {scan.run.model_version} "
                       f"({scan.run.model_sha256[:12]})",
              "threshold": scan.run.threshold, "jpeg_quality": prep.jpeg_quality,
              "images": len(originals), "unscored": len(unscored),
              "val_images": len(held_out),
              "val_correct": sum((scores[REFERENCE][s] >= scan.run.threshold) == labels[s]
                                 for s in held_out if s in scores[REFERENCE]),
              "seconds_writing": round(written, 1),
              **measure(scores, labels, scan.run.threshold), "scores": scores}
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
