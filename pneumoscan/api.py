"""The library API behind the CLI: a whole run, or its parts (open a model, scan a folder,
write the outputs).

    from pneumoscan import api
    summary = api.run(api.RunOptions(Path("scans"), report=Path("report.pdf")))
    summary.exit_code, summary.written        # what `pneumoscan run scans --out report.pdf` does

A PACS instead of a folder (docs/PACS.md): the new CR/DX images of a DICOMweb server are
classified and their DICOM outputs sent back:

    api.run(api.RunOptions("https://pacs.example/dicom-web", push="source", json=Path("r.json")))

The parts, for callers that want the results in memory:

    model = api.open_model()                      # the model shipped in the package
    scan = api.scan(Path("scans"), model)
    api.write_json(Path("results.json"), scan)

Over a folder that keeps growing, keep a state ledger so that each run computes only what
is new or changed (the results still cover the whole folder):

    with Ledger.open(Path("state.sqlite")) as ledger:  # locked until closed
        scan = api.scan(Path("scans"), model, ledger=ledger)

This module is the facade: the code is in `pneumoscan.run`, a module by concern (options,
folder scan, DICOMweb scan, outputs, the whole run, exit codes).
"""

from __future__ import annotations

from pneumoscan.run.dicomweb import scan_dicomweb
from pneumoscan.run.events import RunEvents
from pneumoscan.run.exits import (EXIT_FATAL, EXIT_LOCKED, EXIT_OK, EXIT_UNREADABLE,
                                  EXIT_USAGE, Interrupted, RunError, exit_code)
from pneumoscan.run.options import (ENGINES, RunOptions, check_writable, default_log_path,
                                    default_state_path)
from pneumoscan.run.outputs import (PARALLEL_STUDIES_FROM, DicomOutputs,
                                    remove_stale_per_study, results_json, shown_fingerprint,
                                    write_dicom_outputs, write_json, write_per_study,
                                    write_report)
from pneumoscan.run.runner import RunSummary, run
from pneumoscan.run.scan import Scan, anonymize, open_engine, open_model, run_info, scan

__all__ = [
    "ENGINES", "EXIT_FATAL", "EXIT_LOCKED", "EXIT_OK", "EXIT_UNREADABLE", "EXIT_USAGE",
    "PARALLEL_STUDIES_FROM", "DicomOutputs", "Interrupted", "RunError", "RunEvents",
    "RunOptions", "RunSummary", "Scan", "anonymize", "check_writable", "default_log_path",
    "default_state_path", "exit_code", "open_engine", "open_model", "remove_stale_per_study",
    "results_json", "run", "run_info", "scan", "scan_dicomweb", "shown_fingerprint",
    "write_dicom_outputs", "write_json", "write_per_study", "write_report",
]
