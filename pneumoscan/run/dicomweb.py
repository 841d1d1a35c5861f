"""A DICOMweb server scanned like a folder (`scan.classify_items`): its CR and DX studies
listed, the instances the ledger has not seen retrieved into a temporary cache just ahead
of the model, classified, and deleted once classified."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from pneumoscan.inference.cam import CamModel
from pneumoscan.inference.pipeline import DEFAULT_BATCH_SIZE, Engine
from pneumoscan.inputs import MAX_INSTANCE_BYTES
from pneumoscan.records import FileResult, InputFile
from pneumoscan.results.ledger import Ledger, Planned
from pneumoscan.run.scan import OnResult, Scan, classify_items, now_iso, run_info


def scan_dicomweb(url: str, model: CamModel, *, since: date | None = None,
                  batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                  threshold: float | None = None, render: bool = True,
                  on_result: OnResult | None = None,
                  on_discovered: Callable[[int], None] | None = None,
                  on_listing: Callable[[int, int], None] | None = None,
                  ledger: Ledger | None = None, force: bool = False,
                  engine: Engine | None = None,
                  max_instance_bytes: int = MAX_INSTANCE_BYTES,
                  max_runtime: float | None = None) -> Scan:
    """`scan` of the CR and DX studies on a DICOMweb server (from study date `since` on):
    one result per instance, each result's path <Study UID>/<SOP Instance UID>. With a
    `ledger`, only instances it has not seen (by SOP Instance UID) are retrieved, into a
    temporary cache, each deleted once classified. A study that cannot be listed, a match
    without valid UIDs, an instance that cannot be retrieved or is not the one asked for,
    and whatever is left when `max_runtime` seconds have passed, are error results that
    the ledger does not keep: the next run tries them again. With a ledger, a study whose
    number of instances is what it was when last listed is not listed again (its
    instances come from the ledger; `force` lists every study). `on_listing(done, total)`
    tells the studies listed so far. Raises PacsError when the server cannot be queried."""
    from pneumoscan.inputs.dicomweb import DicomWebSource, PacsError, RemoteInstance

    run = run_info(model, threshold)
    deadline = None if max_runtime is None else time.monotonic() + max_runtime
    late = (f"not done: the run reached its --max-runtime of {max_runtime:g} s; the next "
            "run does it" if max_runtime is not None else "")

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    source = DicomWebSource(url, max_instance_bytes=max_instance_bytes)
    studies, bad_studies = source.studies(since)
    failures = [FileResult(Path(bad.label), bad.label, "error", bad.reason)
                for bad in bad_studies]
    instances = []
    for done, (study_uid, instances_in_study) in enumerate(studies.items()):
        if on_listing:
            on_listing(done, len(studies))
        # A study listed before, holding as many instances now as then, is not listed again.
        known = (ledger.study_listing(source.url, study_uid, instances_in_study)
                 if ledger is not None and instances_in_study and not force else None)
        if known is not None:
            instances += [RemoteInstance(study_uid, *uids) for uids in known]
            continue
        if out_of_time():
            failures.append(FileResult(Path(study_uid), study_uid, "error",
                                       f"study {study_uid} {late}"))
            continue
        try:
            found, bad_instances = source.instances(study_uid)
        except PacsError as exc:
            failures.append(FileResult(Path(study_uid), study_uid, "error", str(exc)))
            continue
        instances += found
        failures += [FileResult(Path(study_uid, bad.label), study_uid, "error",
                                f"study {study_uid}: {bad.reason}") for bad in bad_instances]
        if ledger is not None and instances_in_study and not bad_instances:
            ledger.record_study_listing(source.url, study_uid, instances_in_study,
                                        [(i.series_uid, i.sop_uid) for i in found])
    if on_listing:
        on_listing(len(studies), len(studies))
    if on_discovered:
        on_discovered(len(instances) + len(failures))
    items = [InputFile(instance.display_path, "dicom") for instance in instances]
    sop_uids = [instance.sop_uid for instance in instances]
    by_path = {item.path: instance for item, instance in zip(items, instances)}
    with tempfile.TemporaryDirectory(prefix="pneumoscan-dicomweb-") as cache:

        def fetch(plan: Planned) -> InputFile:
            instance = by_path[plan.item.path]
            try:
                if out_of_time():
                    raise PacsError(f"instance {instance.sop_uid} {late}")
                return InputFile(source.retrieve(instance, Path(cache)), "dicom")
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
    for failure in failures:
        if on_result:
            on_result(failure)
        results.append(failure)
    run.finished = now_iso()
    return Scan(run, results)
