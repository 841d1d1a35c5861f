"""Does the score move under changes nobody can see, made to the 224 px image the model reads?

    python benchmarks/bench_robustness_224.py [--model M ...] [--json OUT]

`bench_robustness.py` changes the originals at full resolution, and the run's own reduction
to the model's size averages most of those changes away. Here every change is made to the
image at the model's input size and kept losslessly (as uint8 arrays, straight into the
network), so the network meets it as it is.

Images (../shared/data):
  validation   the 783 images of kermany224/train that training holds out (15% of patients,
               seed 42: training/data.split_by_patient), as `pneumoscan run` reads them;
  originals    the 100 TRAIN originals (kermany-original) and the 16 official VAL originals
               (kermany-val-original), read as `pneumoscan run` reads them (reduced to twice
               the model's size when decoded, then Pillow bilinear).
Changes, each against the unchanged image:
  noise-1       Gaussian noise of one grey level (sigma 1, rounded, clipped)
  shift-0.5, shift-1   moved right and down by half a pixel / one pixel (Pillow bicubic on
                an edge-padded copy, so no border comes in)
  jpeg-q95, jpeg-q75   re-encoded as JPEG at that quality (Pillow)
And, for the 100 TRAIN originals, the original reduced straight to 224 x 224 by each common
filter, against the kermany224 copy of the same image (the copies training read; their resize
is unknown): Pillow box, bilinear, bicubic, Lanczos and OpenCV's INTER_AREA, each as is and
then JPEG q75 (`resize-<filter>`, `resize-<filter>+q75`).
Printed per change: mean |delta logit| (the calibrated logit margin: log-odds of pneumonia,
the stable measure), mean and 95th percentile |dp|, decisions flipped at the model's
threshold, images whose scope decision changes; on the validation split also AUC,
sensitivity and specificity of the changed images. Several --model run one after another on
the same images.
Goals (issue 21): mean |delta logit| <= 0.25 for every change, flips <= 1% of images,
validation AUC >= 0.995.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
KERMANY224 = SHARED / "kermany224"
ORIGINALS = (SHARED / "kermany-original", SHARED / "kermany-val-original")
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SIZE = 224
FILTERS = ("box", "bilinear", "bicubic", "lanczos", "area")


def jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


def shifted(pixels: np.ndarray, by: float) -> np.ndarray:
    """Content moved right and down by `by` pixels, bicubic; the edge rows and columns are
    repeated outside the image so that no black border comes in."""
    pad = 4
    img = Image.fromarray(np.pad(pixels, pad, mode="edge"))
    moved = img.transform(img.size, Image.Transform.AFFINE, (1, 0, -by, 0, 1, -by),
                          resample=Image.Resampling.BICUBIC)
    return np.asarray(moved)[pad:-pad, pad:-pad]


def noisy(pixels: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(pixels.shape)
    return np.clip(pixels + noise, 0, 255).round().astype(np.uint8)


def changes(pixels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The changes made to an image of the model's size."""
    return {"noise-1": noisy(pixels, seed), "shift-0.5": shifted(pixels, 0.5),
            "shift-1": shifted(pixels, 1.0), "jpeg-q95": jpeg(pixels, 95),
            "jpeg-q75": jpeg(pixels, 75)}


def downscaled(original: Path) -> dict[str, np.ndarray]:
    """The original (greyscale) reduced straight to SIZE x SIZE by each filter, as is and
    then stored as JPEG q75."""
    import cv2

    grey = Image.open(original).convert("L")
    out = {}
    for name in FILTERS:
        if name == "area":
            small = cv2.resize(np.asarray(grey), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        else:
            small = np.asarray(grey.resize((SIZE, SIZE), getattr(Image.Resampling,
                                                                 name.upper())))
        out[f"resize-{name}"] = small
        out[f"resize-{name}+q75"] = jpeg(small, 75)
    return out


def image_sets(prep) -> dict:
    """{set: {"labels": (N,), "reference": uint8 (N, S, S), "changed": {change: (N, S, S)}}}."""
    from pneumoscan.evaluation.datasets import list_samples
    from pneumoscan.inference.pipeline import read_model_pixels
    from pneumoscan.evaluation.datasets import split_by_patient

    def read(path: Path) -> np.ndarray:
        pixels = read_model_pixels(path, prep)
        if not isinstance(pixels, np.ndarray):
            sys.exit(f"cannot read {path}: {pixels.reason}")
        return pixels

    _, val = split_by_patient(list_samples(KERMANY224), 0.15, 42)
    originals = [(path, label) for source in ORIGINALS for label, name in enumerate(CLASS_NAMES)
                 for path in sorted((source / name).glob("*.jpeg"))]
    if not val or not originals:
        sys.exit(f"no images under {SHARED}")
    sets = {}
    for name, items in (("validation", [(s.path, s.label) for s in val]),
                        ("originals", originals)):
        reference = np.stack([read(path) for path, _ in items])
        per_image = [changes(pixels, seed) for seed, pixels in enumerate(reference)]
        sets[name] = {"labels": np.array([label for _, label in items]),
                      "reference": reference,
                      "changed": {change: np.stack([c[change] for c in per_image])
                                  for change in per_image[0]}}
    with_copy = [(path, label) for path, label in originals
                 if (KERMANY224 / "train" / CLASS_NAMES[label] / path.name).exists()]
    resized = [downscaled(path) for path, _ in with_copy]
    sets["originals vs kermany224 copy"] = {
        "labels": np.array([label for _, label in with_copy]),
        "reference": np.stack([read(KERMANY224 / "train" / CLASS_NAMES[label] / path.name)
                               for path, label in with_copy]),
        "changed": {change: np.stack([r[change] for r in resized]) for change in resized[0]}}
    return sets


class Scorer:
    """Calibrated logit margins and scope scores of uint8 (N, S, S) images, from the ONNX
    model as `pneumoscan run` opens it."""

    def __init__(self, path: Path):
        from pneumoscan.inference.cam.onnx_cam import SCOPE_OUTPUT, OnnxCamModel
        from pneumoscan.inference.scope import scope_threshold

        self.model = OnnxCamModel(path, "cpu")
        self.info = self.model.info
        self.threshold = self.info.threshold
        self.scope_threshold = scope_threshold(self.info)
        self.outputs = ["logits"] + [SCOPE_OUTPUT] * (self.scope_threshold is not None)

    def __call__(self, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
        from pneumoscan.inference.preprocess import normalise

        margins, scope = [], []
        for i in range(0, len(images), batch):
            x = normalise(images[i:i + batch], self.info.preprocessing)
            logits, *score = self.model.session.run(self.outputs, {self.model.input_name: x})
            positive = self.info.positive_class
            margins.append(logits[:, positive].astype(np.float64)
                           - logits[:, 1 - positive].astype(np.float64))
            scope.append(score[0] if score else np.zeros(len(x)))
        return np.concatenate(margins), np.concatenate(scope)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def measure(scorer: Scorer, sets: dict) -> dict:
    from pneumoscan.evaluation.metrics import binary_metrics

    threshold = scorer.threshold
    scope_threshold = np.inf if scorer.scope_threshold is None else scorer.scope_threshold
    result = {}
    for set_name, images in sets.items():
        labels = images["labels"]
        ref_margin, ref_scope = scorer(images["reference"])
        ref_p = sigmoid(ref_margin)
        rows = {"reference": {"n": len(labels),
                              **binary_metrics(labels, ref_p, threshold),
                              "flagged": int((ref_scope > scope_threshold).sum())}}
        for change, changed in images["changed"].items():
            margin, scope = scorer(changed)
            p = sigmoid(margin)
            dp = np.abs(p - ref_p)
            metrics = binary_metrics(labels, p, threshold)
            rows[change] = {
                "n": len(labels),
                "mean_abs_dlogit": float(np.abs(margin - ref_margin).mean()),
                "p95_abs_dlogit": float(np.percentile(np.abs(margin - ref_margin), 95)),
                "mean_abs_dp": float(dp.mean()), "p95_abs_dp": float(np.percentile(dp, 95)),
                "max_abs_dp": float(dp.max()),
                "flips": int(((p >= threshold) != (ref_p >= threshold)).sum()),
                "scope_changes": int(((scope > scope_threshold)
                                      != (ref_scope > scope_threshold)).sum()),
                "flagged": int((scope > scope_threshold).sum()),
                **{k: metrics[k] for k in ("auc", "sensitivity", "specificity", "accuracy")}}
        result[set_name] = rows
    return result


def print_table(model: str, threshold: float, result: dict) -> None:
    print(f"\nmodel {model}, threshold {threshold:.4f}")
    for set_name, rows in result.items():
        ref = rows["reference"]
        print(f"{set_name} ({ref['n']} images): unchanged AUC {ref['auc']:.4f} sens "
              f"{ref['sensitivity']:.4f} spec {ref['specificity']:.4f} acc "
              f"{ref['accuracy']:.4f}, flagged out of scope {ref['flagged']}")
        print(f"  {'change':22} {'|dlogit|':>8} {'p95':>6} {'|dp|':>7} {'p95':>6} {'max':>6} "
              f"{'flips':>5} {'scope':>5} {'AUC':>7} {'sens':>6} {'spec':>6}")
        for change, row in rows.items():
            if change == "reference":
                continue
            print(f"  {change:22} {row['mean_abs_dlogit']:8.3f} {row['p95_abs_dlogit']:6.2f} "
                  f"{row['mean_abs_dp']:7.4f} {row['p95_abs_dp']:6.3f} {row['max_abs_dp']:6.3f} "
                  f"{row['flips']:5d} {row['scope_changes']:5d} {row['auc']:7.4f} "
                  f"{row['sensitivity']:6.3f} {row['specificity']:6.3f}")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from pneumoscan.inference.model import default_model_path

    p = argparse.ArgumentParser(prog="python benchmarks/bench_robustness_224.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, action="append",
                   help="ONNX model, repeatable (default: the shipped one)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    models = args.model or [default_model_path()]
    scorers = [Scorer(path) for path in models]
    preps = {scorer.info.preprocessing for scorer in scorers}
    if len(preps) != 1 or next(iter(preps)).height != SIZE:
        sys.exit(f"the models must share one preprocessing at {SIZE} px")
    started = time.perf_counter()
    sets = image_sets(preps.pop())
    print(f"images read and changed in {time.perf_counter() - started:.0f} s")
    out = {}
    for scorer in scorers:
        started = time.perf_counter()
        name = f"{scorer.info.name} {scorer.info.version} ({scorer.info.sha256[:12]})"
        out[name] = {"threshold": scorer.threshold, **measure(scorer, sets)}
        print_table(name, scorer.threshold, {k: v for k, v in out[name].items()
                                             if k != "threshold"})
        print(f"  ({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
