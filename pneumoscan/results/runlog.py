"""The run log: one JSON object a line, appended, so cron runs leave a record to grep.

Every line has `time`, `run` (an id shared by the lines of one run) and `event`:
`start`, then one `file` per file computed in this run (results reused from the state
ledger are only counted), then `summary`; or `locked` when another run held the state file,
`failed` when the run stopped with an error, `interrupted` when a signal stopped it. Each
line is one append write, so lines of runs that share the log never interleave, and a killed
run leaves whole lines.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from pneumoscan.files import open_private
from pneumoscan.records import FileResult


class RunLog:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Paths and reasons may name patients: owner-only, like the reports, and never
        # through a link.
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self.path = path
        self.run_id = uuid.uuid4().hex[:12]

    @classmethod
    def append_if_present(cls, path: Path, event: str, **fields) -> None:
        """One line for a run that did not start: into the log if it exists (a cron job's
        log says why a run failed), creating nothing otherwise."""
        if Path(path).is_file():
            with cls(path) as log:
                log.write(event, **fields)

    def write(self, event: str, **fields) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "run": self.run_id, "event": event, **fields}
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    def file(self, result: FileResult) -> None:
        self.write("file", path=str(result.path), status=result.status,
                   reason=result.reason, label=result.label,
                   probability=result.probability, seconds=result.seconds)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
