"""What a run tells as it goes (RunEvents): the command line shows it, a library caller may
override any of it."""

from __future__ import annotations

from pathlib import Path

from pneumoscan.inference.cam import CamModel
from pneumoscan.records import FileResult


class RunEvents:
    """What a run tells as it goes; the command line shows it, a library caller may
    override any of these."""

    def waiting(self, state_path: Path) -> None:
        """Another run holds the state file and `wait` was asked for."""

    def model_opened(self, model: CamModel) -> None:
        pass

    def listing(self, done: int, total: int) -> None:
        """A DICOMweb source: `done` of `total` studies listed (their instances found)."""

    def discovered(self, total: int) -> None:
        pass

    def result(self, result: FileResult) -> None:
        """Each file's result, in discovery order, as soon as it is known."""

    def classified(self) -> None:
        """Every file has its result; the outputs are written next."""

    def writing(self, what: str, path: Path, parts: int) -> None:
        """Output `path` ("report" or "per-study") is being rendered, in `parts` pieces:
        the studies whose reports are due, for per-study; 1 for the report, 0 when it is
        current already."""

    def wrote_part(self) -> None:
        """One more piece of the output being written is done."""

    def dicom_outputs(self, study: str) -> None:
        """The DICOM outputs of `study` are made, to be written and/or sent, next."""
