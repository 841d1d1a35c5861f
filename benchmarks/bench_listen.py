"""The push deployment's latency per study: a real Orthanc (as in tests/test_listen.py)
holding N chest studies of M images each (the sample CR RG1_UNCR.dcm, 1955 x 1841, 15-bit,
under new UIDs) routes them one after another to `pneumoscan listen` (here the library's
`run.listen.listen` in a thread, with --settle S) by REST /modalities/.../store; listen
classifies each settled study and sends its SR, Segmentation and PDF back by C-STORE.
Prints, per study, the seconds Orthanc took to send it, and from the end of that sending to
the moment every output is in Orthanc (the settle time included), then their medians.

    nice -n 19 python benchmarks/bench_listen.py [--studies 5] [--images 2] [--settle 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bench_pacs import upload_study  # noqa: E402
from orthanc import PASSWORD, USER, Orthanc, free_port  # noqa: E402

from pneumoscan import api  # noqa: E402
from pneumoscan.inputs.receiver import ReceiverOptions  # noqa: E402
from pneumoscan.run.listen import ListenOptions, listen  # noqa: E402

AUTH = (USER, PASSWORD)
OUTPUT_MODALITIES = {"SR", "SEG", "DOC"}


def outputs_landed(server: Orthanc, study_uid: str, images: int) -> bool:
    modalities = [i["Modality"] for i in server.instances_of_study(study_uid)]
    return sum(m in OUTPUT_MODALITIES for m in modalities) == 2 * images + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-listen-") as tmp:
        folder = Path(tmp)
        server = Orthanc(folder / "orthanc")
        server.start()
        stop = threading.Event()
        try:
            studies = [upload_study(server, s, args.images, folder, "bench-listen")
                       for s in range(args.studies)]
            port = free_port()
            run = api.RunOptions(folder / "spool", state=folder / "state.sqlite",
                                 push=server.cstore_url)
            thread = threading.Thread(target=listen, args=(
                ListenOptions(folder / "spool", ReceiverOptions(port=port),
                                        args.settle), run), kwargs={"stop": stop})
            thread.start()
            requests.put(f"{server.url}/modalities/pneumoscan", auth=AUTH, timeout=10,
                         json={"AET": "PNEUMOSCAN", "Host": "127.0.0.1", "Port": port}
                         ).raise_for_status()
            time.sleep(5)  # the listener's first (empty) run opens the model
            sending, answering = [], []
            for uid in studies:
                study_id = requests.post(f"{server.url}/tools/lookup", data=uid, auth=AUTH,
                                         timeout=10).json()[0]["ID"]
                start = time.perf_counter()
                requests.post(f"{server.url}/modalities/pneumoscan/store", auth=AUTH,
                              timeout=600, json={"Resources": [study_id], "Synchronous": True}
                              ).raise_for_status()
                sent = time.perf_counter()
                while not outputs_landed(server, uid, args.images):
                    time.sleep(0.1)
                done = time.perf_counter()
                sending.append(sent - start)
                answering.append(done - sent)
                print(f"study {len(sending)}: sent in {sending[-1]:.2f} s, outputs back "
                      f"{answering[-1]:.2f} s later (settle {args.settle:g} s included)")
            print(f"median per study of {args.images} images: sending "
                  f"{statistics.median(sending):.2f} s, outputs back "
                  f"{statistics.median(answering):.2f} s after it")
        finally:
            stop.set()
            server.kill()


if __name__ == "__main__":
    main()
