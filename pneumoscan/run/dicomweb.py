"""A DICOMweb server scanned like a folder (`scan.classify_items`): its CR and DX studies
listed, the instances the ledger has not seen retrieved into a temporary cache just ahead
of the model, classified, and deleted once classified."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, Engine
from pneumoscan.records import FileResult, InputFile
from pneumoscan.results.ledger import Ledger, Planned
from pneumoscan.run.scan import OnResult, Scan, classify_items, now_iso, run_info


def scan_dicomweb(url: str, model: CamModel, *, since: date | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                  threshold: float | None = None, render: bool = True,
                  on_result: OnResult | None = None,
                  on_discovered: Callable[[int], None] | None = None,
                  ledger: Ledger | None = None, force: bool = False,
                  engine: Engine | None = None) -> Scan:
    """`scan` of the CR and DX studies on a DICOMweb server (from study date `since` on):
    one result per instance, each result's path <Study UID>/<SOP Instance UID>. With a
    `ledger`, only instances it has not seen (by SOP Instance UID) are retrieved, into a
    temporary cache, each deleted once classified. A study that cannot be listed, or an
    instance that cannot be retrieved, is an error result that the ledger does not keep:
    the next run tries it again. Raises PacsError when the server cannot be queried."""
    from pneumoscan.inputs.dicomweb import DicomWebSource, PacsError

    run = run_info(model, threshold)
    source = DicomWebSource(url)
    instances, unlisted = [], []
    for study_uid in source.studies(since):
        try:
            instances += source.instances(study_uid)
        except PacsError as exc:
            unlisted.append(FileResult(Path(study_uid), study_uid, "error", str(exc)))
    if on_discovered:
        on_discovered(len(instances) + len(unlisted))
    items = [InputFile(instance.display_path, "dicom") for instance in instances]
    sop_uids = [instance.sop_uid for instance in instances]
    by_path = {item.path: instance for item, instance in zip(items, instances)}
    with tempfile.TemporaryDirectory(prefix="pneumoscan-dicomweb-") as cache:

        def fetch(plan: Planned) -> InputFile:
            try:
                return InputFile(source.retrieve(by_path[plan.item.path], Path(cache)), "dicom")
            except PacsError as exc:
                plan.key = None  # not kept: retrieved again next run
                return InputFile(plan.item.path, None, str(exc), unreadable=True)

        def on_instance(result: FileResult) -> None:
            (Path(cache) / f"{result.path.name}.dcm").unlink(missing_ok=True)
            if on_result:
                on_result(result)

        _, results = classify_items(
            items, model, run,
            lambda known, basis: known.plan_remote(items, sop_uids, basis, force=force),
            ledger=ledger, engine=engine, batch_size=batch_size, workers=workers,
            render=render, on_result=on_instance, fetch=fetch)
    for failure in unlisted:
        if on_result:
            on_result(failure)
        results.append(failure)
    run.finished = now_iso()
    return Scan(run, results)
