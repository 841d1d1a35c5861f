"""Throughput and peak memory of pneumoscan's classification pipeline, side by side with
what a user would write without it, on real chest X-rays.

    python benchmarks/bench_pipeline.py [--model M] [--checkpoint C] [--sizes 100,1000,10000]
                                        [--repeats 3] [--sets original,224]

Configurations (each runs in its own subprocess, so its peak RSS is its own):
  ceiling   the model alone: `model.predict` on pre-decoded, preprocessed batches (pneumoscan's
            ONNX Runtime session, pipeline batch size): nothing end to end can beat it
  pneumoscan files on disk -> decode -> inference -> CAM -> results JSON, through
            `api.scan(..., render=False)` and `api.write_json`
  naive-ort one image at a time: PIL decode, resize, normalise, one ORT call per image
  eager     PyTorch eager: torchvision transforms, DataLoader (2 workers, batch 32),
            torch.no_grad(), the same network rebuilt from the training checkpoint
All four produce probabilities and CAMs for every image. Model loading and a warm-up pass are
excluded; the source files are read once beforehand so every run sees them in the page cache.
The baselines run at the comparison size only (by default 1,000 images): at 10,000 they would
take most of an hour; the scaling rows (100 / 1,000 / 10,000) are pneumoscan's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SETS = {"original": SHARED / "kermany-original", "224": SHARED / "kermany224" / "train"}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
WARMUP_IMAGES = 64
EAGER_BATCH = 32
EAGER_WORKERS = 2


# --- the configurations (run inside a worker subprocess) ---------------------------------

def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def jpeg_round_trip(img, quality: int | None):
    """The JPEG round trip a model's preprocessing may end with (models trained on the
    quality-75 training images as they are); every configuration does it, so all feed the
    model the same pixels."""
    if quality is None:
        return img
    import io

    from PIL import Image

    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer)


def timed_runs(run_once, measured, warmup, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls run_once(measured), after one run_once(warmup)."""
    run_once(warmup)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once(measured)
        seconds.append(time.perf_counter() - t0)
    return seconds


def bench_ceiling(args, folder: Path, warmup: Path) -> list[float]:
    import numpy as np

    from pneumoscan import api
    from pneumoscan.inference.preprocess import model_input
    from pneumoscan.inputs.loading import load_path

    model = api.open_model(args.model, "cpu")
    prep = model.info.preprocessing
    files = image_files(folder)
    n, size = len(files), args.batch_size
    # A pool of distinct decoded batches, cycled: holding N decoded images would not fit.
    pool = [np.stack([model_input(load_path(p, (prep.width, prep.height)).pixels, prep)
                      for p in files[i:i + size]])
            for i in range(0, min(n, 8 * size), size)]
    batches = [pool[i % len(pool)][:min(size, n - i * size)] for i in range(-(-n // size))]

    def run_once(these_batches):
        for batch in these_batches:
            model.predict(batch)

    return timed_runs(run_once, batches, pool[:2], args.repeats)


def bench_pneumoscan(args, folder: Path, warmup: Path) -> list[float]:
    from pneumoscan import api

    model = api.open_model(args.model, "cpu")
    out = Path(tempfile.mkdtemp()) / "results.json"

    def run_once(source: Path):
        api.write_json(out, api.scan(source, model, batch_size=args.batch_size, render=False))

    return timed_runs(run_once, folder, warmup, args.repeats)


def bench_naive_ort(args, folder: Path, warmup: Path) -> list[float]:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from pneumoscan.inference.model import read_model_info

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    prep = read_model_info(args.model, session.get_modelmeta().custom_metadata_map).preprocessing
    mean, std = np.float32(prep.mean), np.float32(prep.std)

    def run_once(source: Path):
        results = {}
        for path in image_files(source):
            img = Image.open(path).convert("L").resize((prep.width, prep.height),
                                                       Image.Resampling.BILINEAR)
            img = jpeg_round_trip(img, prep.jpeg_quality).convert("RGB")
            x = (np.asarray(img, dtype=np.float32) / 255 - mean) / std
            logits, cams = session.run(["logits", "cams"], {"input": x.transpose(2, 0, 1)[None]})
            e = np.exp(logits[0] - logits[0].max())
            results[str(path)] = float(e[1] / e.sum())
        Path(tempfile.mkdtemp(), "results.json").write_text(json.dumps(results))

    return timed_runs(run_once, folder, warmup, args.repeats)


def bench_eager(args, folder: Path, warmup: Path) -> list[float]:
    import onnx
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from pneumoscan.inference.model import read_model_info
    from pneumoscan.modelling.architectures import build_network
    from pneumoscan.modelling.checkpoint import load_network

    meta = {p.key: p.value for p in onnx.load(str(args.model)).metadata_props}
    info = read_model_info(args.model, meta)
    prep = info.preprocessing
    if args.checkpoint:
        network, _ = load_network(args.checkpoint)
    else:  # same architecture and cost; untrained weights do not change the speed
        network = build_network(info.arch, num_classes=len(info.class_names), pretrained=False)
    network.eval()
    transform = T.Compose([T.Grayscale(1), T.Resize((prep.height, prep.width)),
                           T.Lambda(lambda img: jpeg_round_trip(img, prep.jpeg_quality)),
                           T.ToTensor(), T.Lambda(lambda x: x.expand(prep.channels, -1, -1)),
                           T.Normalize(prep.mean, prep.std)])

    class Files(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return transform(Image.open(self.paths[i]))

    weight = network.classifier.weight
    bias = network.classifier.bias

    def run_once(source: Path):
        paths = image_files(source)
        loader = DataLoader(Files(paths), batch_size=EAGER_BATCH, num_workers=EAGER_WORKERS)
        probabilities = []
        with torch.no_grad():
            for x in loader:
                maps = network.features(x)
                logits = network.classifier(maps.mean(dim=(2, 3)))
                cams = torch.einsum("kc,nchw->nkhw", weight, maps) + bias[:, None, None]
                probabilities += logits.softmax(1)[:, 1].tolist()
        del cams
        Path(tempfile.mkdtemp(), "results.json").write_text(
            json.dumps(dict(zip(map(str, paths), probabilities))))

    return timed_runs(run_once, folder, warmup, args.repeats)


CONFIGS = {"ceiling": bench_ceiling, "pneumoscan": bench_pneumoscan,
           "naive-ort": bench_naive_ort, "eager": bench_eager}
LABELS = {"ceiling": "(c) model only, pre-decoded tensors (ceiling)",
          "pneumoscan": "pneumoscan: files -> results JSON",
          "naive-ort": "(b) naive ORT loop, one image at a time",
          "eager": "(a) PyTorch eager + DataLoader"}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB too


def worker(args) -> None:
    seconds = CONFIGS[args.worker](args, args.folder, args.warmup)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "child_peak_rss_mb": children}))


# --- the driver --------------------------------------------------------------------------

def build_folder(sources: list[Path], n: int, root: Path) -> Path:
    """n files in one folder: symbolic links cycling through the real images."""
    folder = root / str(n)
    if not folder.exists():
        folder.mkdir(parents=True)
        for i in range(n):
            src = sources[i % len(sources)]
            (folder / f"{i:05d}-{src.name}").symlink_to(src)
    return folder


def set_sources(name: str) -> list[Path]:
    folder = SETS[name]
    if not folder.is_dir():
        sys.exit(f"benchmark data not found: {folder} (the real data sits beside the clone)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:  # into the page cache: every configuration then reads warm files
        p.read_bytes()
    return files


def run_config(args, config: str, model: Path, folder: Path, warmup: Path) -> dict:
    """One timed run (after a warm-up) of `config` in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--worker", config, "--folder", str(folder),
           "--warmup", str(warmup), "--model", str(model), "--repeats", "1",
           "--batch-size", str(args.batch_size)]
    if args.checkpoint:
        cmd += ["--checkpoint", str(args.checkpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, rows: dict[str, tuple[str, Path]], folder: Path, warmup: Path,
            repeats: int) -> dict:
    """Each row (name -> configuration, model) run `repeats` times, the repeats interleaved
    across rows so that any background load falls on all of them alike."""
    runs: dict[str, list[dict]] = {row: [] for row in rows}
    for repeat in range(repeats):
        for row, (config, model) in rows.items():
            runs[row].append(run_config(args, config, model, folder, warmup))
            print(f"  {row:<16} {folder.name:>6} files, run {repeat + 1}: "
                  f"{runs[row][-1]['seconds'][0]:.2f} s, peak RSS "
                  f"{runs[row][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    results = {}
    for row, done in runs.items():
        seconds = [r["seconds"][0] for r in done]
        images = int(folder.name)
        results[row] = {"images": images, "seconds": seconds,
                        "median_s": statistics.median(seconds),
                        "images_per_s": images / statistics.median(seconds),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
                        "child_peak_rss_mb": max(r["child_peak_rss_mb"] for r in done)}
    return results


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import onnxruntime
    import PIL

    versions = f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, " \
               f"Pillow {PIL.__version__}"
    try:
        import torch
        versions += f", torch {torch.__version__}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}"


def comparison_table(name: str, results: dict, repeats: int) -> list[str]:
    ceiling = results[LABELS["ceiling"]]["images_per_s"]
    ours = results[LABELS["pneumoscan"]]["images_per_s"]
    n = results[LABELS["ceiling"]]["images"]
    lines = [f"### {name} images, {n} files (median of {repeats} runs)", "",
             "| configuration | images/s | runs (s) | / ceiling | pneumoscan / this | "
             "peak RSS (MB) |", "|---|---:|---|---:|---:|---:|"]
    for row, r in results.items():
        runs = ", ".join(f"{s:.2f}" for s in r["seconds"])
        rss = f"{r['peak_rss_mb']:.0f}"
        if r["child_peak_rss_mb"] > 0:
            rss += f" + {EAGER_WORKERS} workers of {r['child_peak_rss_mb']:.0f}"
        lines.append(f"| {row} | {r['images_per_s']:.1f} | {runs} | "
                     f"{r['images_per_s'] / ceiling:.0%} | {ours / r['images_per_s']:.2f}x | "
                     f"{rss} |")
    return lines + [""]


def scaling_table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["### pneumoscan end to end: how cost grows", "",
             "| images | files | runs | total (s, median) | ms / image | images/s | "
             "peak RSS (MB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['images']} | {len(r['seconds'])} | {r['median_s']:.2f} | "
                     f"{1000 * r['median_s'] / r['images']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return lines + [""]


def main() -> None:
    from pneumoscan.inference.model import default_model_path
    from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=default_model_path())
    p.add_argument("--int8", type=Path, help="also the ceiling and pneumoscan rows with this "
                                             "model (from `export-onnx --int8`)")
    p.add_argument("--checkpoint", type=Path,
                   help="training checkpoint for the PyTorch baseline (default: the model's "
                        "architecture with untrained weights, which costs the same)")
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--compare-size", type=int, default=1000,
                   help="number of files at which all configurations run")
    p.add_argument("--sets", default="original,224")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scaling-repeats", type=int,
                   help="repeats at the sizes other than --compare-size (default: --repeats)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--configs", default=",".join(CONFIGS), help="subset of " + ",".join(CONFIGS))
    p.add_argument("--json", type=Path, help="also write the raw measurements here")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.model.is_file():
        sys.exit(f"model not found: {args.model} (pass --model)")
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.compare_size})
    configs = [c for c in args.configs.split(",") if c]
    compared = {LABELS[c]: (c, args.model) for c in configs}
    if args.int8:
        compared.update({LABELS[c] + ", int8": (c, args.int8)
                         for c in ("ceiling", "pneumoscan") if c in configs})
    scaled = {LABELS["pneumoscan"]: ("pneumoscan", args.model)}
    root = Path(tempfile.mkdtemp(prefix="pneumoscan-bench-"))
    raw, out, scaling = {}, [f"machine: {machine()}", f"model: {args.model}", ""], []
    try:
        for name in args.sets.split(","):
            print(f"{name} images:", file=sys.stderr)
            sources = set_sources(name)
            warmup = build_folder(sources, WARMUP_IMAGES, root / name / "warmup")
            raw[name] = {}
            for n in sizes:
                folder = build_folder(sources, n, root / name)
                compare = n == args.compare_size
                at_n = measure(args, compared if compare else scaled, folder, warmup,
                               args.repeats if compare else args.scaling_repeats or args.repeats)
                raw[name][n] = at_n
                if LABELS["pneumoscan"] in at_n:
                    scaling.append((name, at_n[LABELS["pneumoscan"]]))
                if n == args.compare_size and {"ceiling", "pneumoscan"} <= set(configs):
                    out += comparison_table(name, at_n, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out += scaling_table(scaling)
    print("\n".join(out))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": raw}, indent=1))


if __name__ == "__main__":
    main()
