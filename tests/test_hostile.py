"""Hostile and broken input end to end. Per-file behaviour is tested in test_loading,
test_dicom and test_discover; the files here are made from real ones, none is committed."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from conftest import CLI_ENV
from test_loading import SAMPLE_JPEG


# Peak resident memory of the scan alone. Not getrusage: its maximum survives exec, so a
# child of pytest starts with pytest's own peak. VmHWM is the process's own, reset here.
MEASURE_PEAK_MEMORY = """
import json, sys
from pathlib import Path
from pneumoscan import api

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field + ":"))

model = api.open_model(Path(sys.argv[1]), "cpu")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # peak := now
before = kib("VmRSS")
scan = api.scan(Path(sys.argv[2]), model, render=False)
print(json.dumps({"status": scan.results[0].status, "added_mib": (kib("VmHWM") - before) / 1024}))
"""


def test_a_very_large_image_is_classified_without_full_size_copies(tmp_path, small_onnx):
    """An 8000 x 8000 PNG of a real X-ray: 61 MiB of grey pixels once decoded. Decoding it
    needs one such buffer; the run must not add more than one more (before the image was
    shrunk right after decoding, it took 3.8)."""
    side = 8000
    folder = tmp_path / "large"
    folder.mkdir()
    with Image.open(SAMPLE_JPEG) as img:
        img.convert("L").resize((side, side), Image.Resampling.BILINEAR).save(
            folder / "large.png", compress_level=1)
    run = subprocess.run([sys.executable, "-c", MEASURE_PEAK_MEMORY, str(small_onnx),
                          str(folder)], env=CLI_ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout)
    full_size_mib = side * side / 2**20
    assert measured["status"] == "ok"
    assert measured["added_mib"] < 2 * full_size_mib, measured
