"""What a report says about a set of results: counts, and the files grouped into studies
with one decision each. Plain data for the templates; no formatting here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from pneumoscan.records import DICOM_FIELDS, NOT_SHOWN, FileResult

POSITIVE = "PNEUMONIA"
NEGATIVE = "NORMAL"
UNCLASSIFIED = "NOT CLASSIFIED"  # a study none of whose files could be classified
# A study all of whose classified images are out of the model's scope: never NORMAL.
OUT_OF_SCOPE = "review: outside the model's intended use"


@dataclass(frozen=True)
class Counts:
    files: int
    classified: int
    pneumonia: int  # classified within the model's intended use, and so labelled
    normal: int
    skipped: int
    errors: int
    # Classified, but not what the model is made for: counted apart, in neither of the
    # above (classified = pneumonia + normal + out_of_scope).
    out_of_scope: int

    @classmethod
    def of(cls, results: Iterable[FileResult]) -> Counts:
        results = list(results)
        in_scope = [r.label for r in results if r.status == "ok" and r.in_scope is not False]
        return cls(
            files=len(results),
            classified=sum(r.status == "ok" for r in results),
            pneumonia=in_scope.count(POSITIVE),
            normal=in_scope.count(NEGATIVE),
            skipped=sum(r.status == "skipped" for r in results),
            errors=sum(r.status == "error" for r in results),
            out_of_scope=sum(r.status == "ok" and r.in_scope is False for r in results),
        )


@dataclass(frozen=True)
class Study:
    """The files of one study, in input order."""
    key: str
    files: tuple[FileResult, ...]

    @property
    def classified(self) -> list[FileResult]:
        return [r for r in self.files if r.status == "ok"]

    @property
    def not_classified(self) -> list[FileResult]:
        return [r for r in self.files if r.status != "ok"]

    @property
    def out_of_scope(self) -> bool:
        """Images were classified, and none of them is one the model is made for."""
        return bool(self.classified) and all(r.in_scope is False for r in self.classified)

    @property
    def decision(self) -> str:
        """OUT_OF_SCOPE if every classified image is out of scope; else PNEUMONIA if any
        image is, NORMAL if images were classified and none is."""
        if self.out_of_scope:
            return OUT_OF_SCOPE
        labels = {r.label for r in self.classified}
        if POSITIVE in labels:
            return POSITIVE
        return NEGATIVE if labels else UNCLASSIFIED

    @property
    def highest_probability(self) -> float | None:
        probabilities = [r.probability for r in self.classified if r.probability is not None]
        return max(probabilities, default=None)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        """(label, value) of the fields all the study's files agree on (those that have
        them): DICOM fields in their usual order, then any other keyword."""
        return [(label, values[0]) for _, label, values in self._fields if len(values) == 1]

    @property
    def shared_fields(self) -> dict[str, str]:
        """keyword -> value of the fields all the study's files agree on."""
        return {keyword: values[0] for keyword, _, values in self._fields if len(values) == 1}

    def image_metadata(self, result: FileResult) -> list[tuple[str, str]]:
        """(label, value) of `result`'s fields that differ between the study's files, such
        as each image's SOP instance UID."""
        return [(label, result.metadata[keyword]) for keyword, label, values in self._fields
                if len(values) > 1 and result.metadata.get(keyword)]

    @cached_property
    def _fields(self) -> list[tuple[str, str, list[str]]]:
        """(keyword, label, distinct non-empty values) of every field shown, in display
        order."""
        values: dict[str, dict[str, None]] = {}
        for result in self.files:
            for keyword, value in result.metadata.items():
                if value and keyword not in NOT_SHOWN:
                    values.setdefault(keyword, {})[value] = None
        others = sorted(values.keys() - DICOM_FIELDS.keys())
        order = [k for k in DICOM_FIELDS if k in values] + others
        return [(k, DICOM_FIELDS.get(k, k), list(values[k])) for k in order]


_DECISION_RANK = {POSITIVE: 0, OUT_OF_SCOPE: 1, NEGATIVE: 2, UNCLASSIFIED: 3}


def group_studies(results: Iterable[FileResult]) -> list[Study]:
    """The studies of the images among `results`, in reading order: positive first, then
    the most probable pneumonia first, then by key so that the order is stable."""
    files: dict[str, list[FileResult]] = {}
    for result in results:
        if result.study is not None:  # None: not an image, so part of no study
            files.setdefault(result.study, []).append(result)
    studies = [Study(key, tuple(group)) for key, group in files.items()]

    def reading_order(study: Study) -> tuple:
        highest = study.highest_probability
        return (_DECISION_RANK[study.decision], -highest if highest is not None else 1.0, study.key)

    return sorted(studies, key=reading_order)
