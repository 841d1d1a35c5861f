"""The PACS round trip per study: a real Orthanc (as in tests/test_pacs.py) holding N chest
studies of M images each (the sample CR RG1_UNCR.dcm, 1955 x 1841, 15-bit, under new UIDs),
then `api.run(URL, push="source")`: QIDO-RS, WADO-RS retrieval, classification with CAMs,
the study's PDF report, SR and Segmentation per image, STOW-RS back. Prints, for each
repeat on a fresh state file, the seconds until every image had its result (query,
retrieve, classify) and for the DICOM outputs and their sending, then their medians per
study; and the time of a second run that finds nothing new.

    nice -n 19 python benchmarks/bench_pacs.py [--studies 10] [--images 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from orthanc import PASSWORD, USER, Orthanc  # noqa: E402

from pneumoscan import api  # noqa: E402
from pneumoscan.dicomout.source import derived_uid  # noqa: E402
from pneumoscan.inputs.dicomweb import PASSWORD_ENV, USER_ENV  # noqa: E402


class Clock(api.RunEvents):
    """Wall and CPU seconds (this process, all its threads) at the start and when every
    image has its result."""

    def __init__(self):
        self.start = (time.perf_counter(), time.process_time())
        self.classified_at = None

    def classified(self):
        self.classified_at = (time.perf_counter(), time.process_time())


def upload_study(server: Orthanc, study: int, images: int, folder: Path,
                 prefix: str = "bench") -> str:
    """Study number `study`: `images` copies of the RG1 radiograph under new UIDs (named
    after `prefix`), uploaded to `server`. Returns its Study Instance UID."""
    source = pydicom.dcmread(ROOT / "samples" / "dicom" / "RG1_UNCR.dcm")
    uid = derived_uid(f"{prefix}-study", str(study))
    for i in range(images):
        ds = source.copy()
        ds.StudyInstanceUID = uid
        ds.SeriesInstanceUID = derived_uid(f"{prefix}-series", str(study))
        ds.SOPInstanceUID = derived_uid(prefix, str(study), str(i))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"BENCH-{study}"
        path = folder / f"{study}-{i}.dcm"
        ds.save_as(path)
        server.upload(path)
    return uid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ[USER_ENV], os.environ[PASSWORD_ENV] = USER, PASSWORD
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = Orthanc(tmp / "orthanc")
        server.start()
        try:
            for study in range(args.studies):
                upload_study(server, study, args.images, tmp)
            fetch_classify, outputs_push, totals, cpu = [], [], [], []
            for repeat in range(args.repeats):
                options = api.RunOptions(server.dicomweb_url, json=tmp / f"r{repeat}.json",
                                         push="source")
                clock = Clock()
                summary = api.run(options, clock)
                end = (time.perf_counter(), time.process_time())
                assert len(summary.pushed) == args.studies, summary.push_failures
                fetch_classify.append(clock.classified_at[0] - clock.start[0])
                outputs_push.append(end[0] - clock.classified_at[0])
                totals.append(end[0] - clock.start[0])
                cpu.append(end[1] - clock.start[1])
                print(f"run {repeat + 1}: {totals[-1]:.1f} s = query, retrieve, classify "
                      f"{fetch_classify[-1]:.1f} s + DICOM outputs and STOW-RS "
                      f"{outputs_push[-1]:.1f} s; CPU {cpu[-1]:.1f} s", flush=True)
                t0 = time.perf_counter()
                again = api.run(options)
                assert again.scan.from_ledger == args.studies * args.images and not again.pushed
                print(f"  second run, nothing new: {time.perf_counter() - t0:.1f} s")
        finally:
            server.kill()
    n = args.studies
    print(f"{n} studies x {args.images} images, medians of {args.repeats} runs "
          f"(model loading included):")
    print(f"  round trip per study {statistics.median(totals) / n:.2f} s "
          f"(query+retrieve+classify {statistics.median(fetch_classify) / n:.2f} s, "
          f"outputs+push {statistics.median(outputs_push) / n:.2f} s), "
          f"CPU {statistics.median(cpu) / n:.2f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
