"""How faithful are the heat maps? Every CAM method on the validation split and the 116
original-resolution scans, with the measures of `cam_faithfulness.py`.

    PYTHONPATH=$PWD python benchmarks/bench_cam_faithfulness.py \
        [--model pneumoscan/models/default.onnx] [--checkpoint CKPT] [--data ../shared/data]
        [--val-limit 64] [--torch-limit 32] [--expensive-limit 8] [--reference 8]
        [--cache DIR]
        [--figure docs/model/cam-methods.png]

Sets: `val`, the validation split of kermany224 (15% of patients, seed 42: the split the
model was trained with, `evaluation.datasets.split_by_patient`), `--val-limit` images of it evenly
spread over the sorted list (both classes); `originals`, kermany-original (100 TRAIN scans)
and kermany-val-original (16), at full resolution through `run`'s decoding.

The shipped CAM (and its flip-averaged variant) come from the ONNX model alone. The other
methods need the torch network (`--checkpoint`: a training checkpoint, or the twin that
`onnx_twin.py` rebuilds from the ONNX model) and pytorch-grad-cam (`pip install
pneumoscan[bench]`); every perturbed image is scored by ONNX Runtime. Score-CAM runs one
forward pass per channel. On a busy CPU the torch methods run on `--torch-limit` images of
each set and Score-CAM on `--expensive-limit` (evenly spread over the set), each beside the
shipped CAM on the same images.

External reference: on `--reference` validation images that every method ran on,
pytorch-grad-cam's own metrics through the torch network -- ROAD (noisy linear
imputation) removing the top 20% of pixels, and CamMultImageConfidenceChange (the image
multiplied by the map) -- beside this benchmark's top-20% deletion drop, and the rank
correlation of the methods by each.

Maps and scores are cached per model, set and method in `--cache`: a rerun only computes
what is missing. Timings (ms per image to compute the map) are medians over batches of 16
on whatever CPU is free: noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import cam_faithfulness as cf  # noqa: E402

from pneumoscan.inference.model import open_session, read_model_info  # noqa: E402
from pneumoscan.inference.pipeline import read_model_pixels  # noqa: E402
from pneumoscan.inference.preprocess import normalise  # noqa: E402

BATCH = 16
# name: (target layer in the torch network or None for the ONNX path, grad-cam class,
#        expensive, grid)
METHODS = {
    "CAM": ("onnx", None, False, "7x7"),
    "Layer-CAM": ("features", "LayerCAM", False, "7x7"),
    "CAM flip-averaged": ("onnx-flip", None, False, "7x7"),
    "CAM margin": ("onnx-margin", None, False, "7x7"),
    "Grad-CAM": ("features", "GradCAM", False, "7x7"),
    "Grad-CAM++": ("features", "GradCAMPlusPlus", False, "7x7"),
    "Grad-CAM stage 5": ("features._blocks.10", "GradCAM", False, "14x14"),
    "Layer-CAM stage 5": ("features._blocks.10", "LayerCAM", False, "14x14"),
    "Layer-CAM stage 3": ("features._blocks.4", "LayerCAM", False, "28x28"),
    "Grad-CAM aug-smoothed": ("features", "GradCAM+aug", False, "7x7"),
    "Score-CAM stage 5": ("features._blocks.10", "ScoreCAM", True, "14x14"),
}


def image_sets(data: Path, val_limit: int) -> dict[str, list[Path]]:
    from pneumoscan.evaluation.datasets import list_samples, split_by_patient
    from pneumoscan.modelling.export import spread

    _, val = split_by_patient(list_samples(data / "kermany224" / "train"), 0.15, 42)
    val_paths = sorted(s.path for s in val)
    originals = sorted((data / "kermany-original").rglob("*.jpeg")) + \
        sorted((data / "kermany-val-original").rglob("*.jpeg"))
    return {"val": spread(val_paths, val_limit) if val_limit else val_paths,
            "originals": originals}


class Context:
    """One model and one image set: the ONNX session, inputs, decisions and baselines."""

    def __init__(self, model: Path, paths: list[Path], cache: Path, set_name: str):
        from onnx.utils import extract_model

        session, _ = open_session(model, "cpu", cache=False)
        self.info = read_model_info(model, session.get_modelmeta().custom_metadata_map)
        prep = self.info.preprocessing
        pixels = [read_model_pixels(p, prep) for p in paths]
        self.paths = [p for p, px in zip(paths, pixels) if isinstance(px, np.ndarray)]
        self.grey = np.stack([px if px.ndim == 2 else px[..., 0] for px in pixels
                              if isinstance(px, np.ndarray)])
        self.batch = normalise(self.grey, prep)
        # Scoring needs only the logits and CAMs: the scope guard's branch is cut off.
        with tempfile.TemporaryDirectory() as tmp:
            bare = Path(tmp) / "bare.onnx"
            extract_model(str(model), str(bare), ["input"], ["logits", "cams"])
            self.session, _ = open_session(bare, "cpu", cache=False)
        self.scorer = cf.OnnxScorer(self.session)
        self.tag = f"{self.info.name}-{self.info.version}-{set_name}-{len(self.paths)}"
        self.cache = cache
        base_file = cache / f"{self.tag}-baseline.npz"
        if base_file.exists():
            with np.load(base_file) as f:
                self.base = cf.Baseline(**{k: f[k] for k in f.files})
            self.fillers = cf.blurred(self.batch)
            return
        logits, cams = self.session.run(["logits", "cams"], {"input": self.batch})
        positive = self.info.positive_class
        p = cf.softmax(logits)[:, positive]
        decided = np.where(p >= self.info.threshold, positive, 1 - positive)
        self.fillers = cf.blurred(self.batch)
        self.base = cf.baseline(self.scorer, self.batch, decided, self.fillers)
        np.savez(base_file, **vars(self.base))


def onnx_maps(ctx: Context, flip: bool, margin: bool = False) -> tuple[np.ndarray, float]:
    """The exported CAM of the decided class; with `flip`, averaged with the CAM of the
    mirrored image mirrored back; with `margin`, minus the other class's CAM (the map of
    the decided class's log-odds, the only thing its confidence depends on)."""
    pick = np.arange(len(ctx.batch))
    out, times = [], []
    for i in range(0, len(ctx.batch), BATCH):
        x = ctx.batch[i:i + BATCH]
        t0 = time.perf_counter()
        (cams,) = ctx.session.run(["cams"], {"input": x})
        if flip:
            (mirrored,) = ctx.session.run(["cams"], {"input": x[..., ::-1].copy()})
            cams = (cams + mirrored[..., ::-1]) / 2
        times.append((time.perf_counter() - t0) / len(x))
        out.append(cams)
    cams = np.concatenate(out)
    picked = cams[pick, ctx.base.decided]
    if margin:
        picked = picked - cams[pick, 1 - ctx.base.decided]
    return picked, statistics.median(times)


def torch_maps(ctx: Context, network, layer: str, method: str,
               index: np.ndarray) -> tuple[np.ndarray, float]:
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    aug = method.endswith("+aug")
    cls = getattr(pytorch_grad_cam, method.removesuffix("+aug"))
    target = dict(network.named_modules())[layer]
    out, times = [], []
    with cls(model=network, target_layers=[target]) as cam:
        cam.batch_size = 64  # Score-CAM's masked copies per forward pass
        for i in range(0, len(index), BATCH):
            part = index[i:i + BATCH]
            x = torch.from_numpy(ctx.batch[part])
            targets = [ClassifierOutputTarget(int(c)) for c in ctx.base.decided[part]]
            t0 = time.perf_counter()
            out.append(cam(input_tensor=x, targets=targets, aug_smooth=aug))
            times.append((time.perf_counter() - t0) / len(x))
    return np.concatenate(out), statistics.median(times)


def spread_index(total: int, limit: int | None) -> np.ndarray:
    """`limit` of `total` images evenly spaced over the set (sorted by class folder, so
    both classes in proportion), or all."""
    if limit is None or limit >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, limit).round().astype(int))


def method_scores(ctx: Context, name: str, network, limits: dict[bool, int | None]) -> dict:
    """Maps, curves and cost of one method on ctx's images (cached); `index`: which."""
    file = ctx.cache / f"{ctx.tag}-{name.replace(' ', '_')}.npz"
    if file.exists():
        with np.load(file) as f:
            cached = {k: f[k] for k in f.files}
        return {"index": np.arange(len(cached["maps"])), **cached}
    layer, method, expensive, _ = METHODS[name]
    if layer.startswith("onnx"):
        index = np.arange(len(ctx.batch))
        maps, seconds = onnx_maps(ctx, flip=layer == "onnx-flip", margin=layer == "onnx-margin")
    else:
        index = spread_index(len(ctx.batch), limits[expensive])
        maps, seconds = torch_maps(ctx, network, layer, method, index)
    maps224 = cf.upsampled(maps)
    deletion, insertion = cf.curves(ctx.scorer, ctx.batch[index], ctx.fillers[index], maps224,
                                    subset(ctx.base, index))
    result = {"index": index, "maps": maps.astype(np.float32), "deletion": deletion,
              "insertion": insertion, "seconds": np.float64(seconds)}
    np.savez(file, **result)
    return result


def subset(base: cf.Baseline, index: np.ndarray) -> cf.Baseline:
    return cf.Baseline(*(getattr(base, f)[index] for f in ("decided", "original", "blurred",
                                                           "random_k")))


def restricted(scores: dict, index: np.ndarray) -> dict:
    """A full-set method's scores on the images of `index` only."""
    return {**{k: scores[k][index] for k in ("index", "maps", "deletion", "insertion")},
            "seconds": scores["seconds"]}


def row(name: str, grid: str, scores: dict, ctx: Context, chests: list) -> dict:
    index = scores["index"]
    n = len(index)
    base = subset(ctx.base, index)
    maps224 = cf.upsampled(scores["maps"])
    ratios = cf.top_vs_random(scores["deletion"], base)
    at20 = int(np.argmin(np.abs(cf.FRACTIONS - 0.2)))
    found = [i for i in range(n) if chests[index[i]] is not None]
    mass = cf.mass_shares(maps224)
    if found:
        inside = cf.mass_shares(maps224[found], np.stack([chests[index[i]] for i in found]))
        mass["inside chest"] = inside["inside chest"]
        mass["chest area"] = inside["chest area"]
    return {"method": name, "grid": grid, "n": n,
            "deletion_auc": float(cf.auc(scores["deletion"]).mean()),
            "insertion_auc": float(cf.auc(scores["insertion"]).mean()),
            "confidence": float(base.original.mean()),
            "top20": float(scores["deletion"][:, at20].mean()),
            "random20": float(base.random_k[:, 1].mean()),
            **{f"ratio{round(k * 100)}": v for k, v in ratios.items()},
            **mass, "chest_found": len(found), "ms_per_image": 1000 * float(scores["seconds"])}


def print_table(set_name: str, rows: list[dict]) -> None:
    print(f"\n== {set_name} ==")
    header = (f"{'method':24} {'grid':>5} {'n':>4} {'del AUC':>7} {'ins AUC':>7} "
              f"{'p':>5} {'top20':>5} {'rnd20':>5} {'r10':>5} {'r20':>5} {'r30':>5} "
              f"{'bot2':>5} {'outer':>5} {'top':>5} {'chest':>5} {'area':>5} {'ms/img':>7}")
    print(header)
    for r in rows:
        chest = f"{r['inside chest']:5.2f} {r['chest area']:5.2f}" if "inside chest" in r \
            else "    -     -"
        print(f"{r['method']:24} {r['grid']:>5} {r['n']:4d} {r['deletion_auc']:7.3f} "
              f"{r['insertion_auc']:7.3f} {r['confidence']:5.3f} {r['top20']:5.3f} "
              f"{r['random20']:5.3f} {r['ratio10']:5.2f} {r['ratio20']:5.2f} "
              f"{r['ratio30']:5.2f} {r['bottom 2 rows']:5.2f} {r['outer columns']:5.2f} "
              f"{r['top row']:5.2f} {chest} {r['ms_per_image']:7.1f}")


def common_index(scores: dict[str, dict]) -> np.ndarray:
    """The images that every method was run on."""
    return sorted(set.intersection(*(set(s["index"].tolist()) for s in scores.values())))


def on_images(scores: dict, images) -> dict:
    """A method's scores on `images` (set indices it was run on)."""
    return restricted(scores, np.searchsorted(scores["index"], images))


def reference(ctx: Context, network, all_scores: dict[str, dict], count: int) -> None:
    """pytorch-grad-cam's ROAD and CAM-multiplied-image metrics beside ours."""
    import torch
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    from scipy.stats import spearmanr

    images = common_index(all_scores)[:count]
    x = torch.from_numpy(ctx.batch[images])
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in ctx.base.decided[images]]
    at20 = int(np.argmin(np.abs(cf.FRACTIONS - 0.2)))
    print(f"\n== reference: pytorch-grad-cam metrics, {len(images)} {ctx.tag} images that "
          "every method ran on ==")
    print(f"{'method':24} {'ours: top-20% drop':>18} {'ROAD MoRF 20%':>14} "
          f"{'CamMult change':>14}")
    ours, road = [], []
    for name, scores in all_scores.items():
        mine = on_images(scores, images)
        maps224 = cf.upsampled(mine["maps"])
        drop = float((ctx.base.original[images] - mine["deletion"][:, at20]).mean())
        with torch.no_grad():
            road_drop = -float(ROADMostRelevantFirst(percentile=80)(
                x, maps224, targets, network).mean())
            change = float(CamMultImageConfidenceChange()(x, maps224, targets, network).mean())
        ours.append(drop), road.append(road_drop)
        print(f"{name:24} {drop:18.3f} {road_drop:14.3f} {change:14.3f}", flush=True)
    rho = spearmanr(ours, road).statistic
    print(f"rank agreement of the methods (Spearman), top-20% drop vs ROAD: {rho:.2f}")


def figure(out: Path, contexts: dict[str, Context], scores: dict[str, dict[str, dict]],
           per_set: int = 2) -> None:
    """Side by side: a few images of each set, one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    names = [n for n in METHODS if all(n in scores[s] for s in contexts)]
    picks = []
    for set_name, ctx in contexts.items():
        images = common_index({n: scores[set_name][n] for n in names})
        for cls in (1, 0):  # PNEUMONIA and NORMAL decisions from each set
            picks += [(set_name, i) for i in images if ctx.base.decided[i] == cls][:per_set // 2]
    fig, axes = plt.subplots(len(picks), len(names) + 1,
                             figsize=(1.6 * (len(names) + 1), 1.7 * len(picks)))
    for r, (set_name, i) in enumerate(picks):
        ctx = contexts[set_name]
        axes[r, 0].imshow(ctx.grey[i], cmap="gray")
        label = ctx.info.class_names[ctx.base.decided[i]]
        axes[r, 0].set_ylabel(f"{set_name}\n{label}", fontsize=7)
        for c, name in enumerate(names, start=1):
            heat = cf.upsampled(on_images(scores[set_name][name], [i])["maps"])[0]
            axes[r, c].imshow(ctx.grey[i], cmap="gray")
            axes[r, c].imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"{name}\n{METHODS[name][3]}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    with Image.open(out) as image:  # a 256-colour PNG: a third of the size, same picture
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            out, optimize=True)
    print(f"\nfigure: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "pneumoscan/models/default.onnx")
    parser.add_argument("--checkpoint", type=Path, help="torch network for the other methods")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sets", default="val,originals")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--val-limit", type=int, default=64, help="0: all 783")
    parser.add_argument("--torch-limit", type=int, default=32,
                        help="images per set for the torch methods (0: all)")
    parser.add_argument("--expensive-limit", type=int, default=8,
                        help="images per set for Score-CAM")
    parser.add_argument("--reference", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cam-bench")
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--json", type=Path, help="write the table rows here")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)

    network = None
    methods = [m for m in args.methods.split(",") if m]
    if args.checkpoint is not None:
        from pneumoscan.modelling.checkpoint import load_network

        network, _ = load_network(args.checkpoint)
    else:
        methods = [m for m in methods if METHODS[m][0].startswith("onnx")]
    sets = image_sets(args.data, args.val_limit)
    limits = {False: args.torch_limit or None, True: args.expensive_limit}
    contexts, chests, scores, tables = {}, {}, {}, {}
    for set_name in args.sets.split(","):
        ctx = contexts[set_name] = Context(args.model, sets[set_name], args.cache, set_name)
        chests[set_name] = [cf.chest_mask(g) for g in ctx.grey] if set_name == "originals" \
            else [None] * len(ctx.grey)
        scores[set_name], tables[set_name] = {}, []
    for name in methods:  # method by method, so that the cheap ones report first
        for set_name, ctx in contexts.items():
            got = scores[set_name][name] = method_scores(ctx, name, network, limits)
            tables[set_name].append(row(name, METHODS[name][3], got, ctx, chests[set_name]))
            if len(got["index"]) < len(ctx.batch) and "CAM" in scores[set_name]:
                tables[set_name].append(row(f"  CAM on these {len(got['index'])}", "7x7",
                                            restricted(scores[set_name]["CAM"], got["index"]),
                                            ctx, chests[set_name]))
            print(f"{name} on {set_name} done", flush=True)
        if args.json:
            args.json.write_text(json.dumps(tables, indent=1))
    for set_name, ctx in contexts.items():
        print(f"\nmodel {ctx.info.name} {ctx.info.version}")
        print_table(f"{set_name}: {len(ctx.paths)} images", tables[set_name])
    if network is not None and args.reference and "val" in contexts:
        reference(contexts["val"], network, scores["val"], args.reference)
    if args.figure:
        figure(args.figure, contexts, scores)


if __name__ == "__main__":
    main()
