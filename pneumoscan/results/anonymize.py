"""Pseudonyms in place of patient identity, for reports and JSON that leave the site.

A pseudonym is an HMAC-SHA256 of the patient's identity under a secret key (kept in the
state ledger), so one patient gets the same pseudonym in every run with that ledger, and
nobody without the key can recompute it from a name or ID.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import replace

from pneumoscan.records import FileResult

IDENTIFYING_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "ReferringPhysicianName")
PSEUDONYM_PREFIX = "anon-"


def pseudonym(key: bytes, identity: str) -> str:
    digest = hmac.new(key, identity.encode("utf-8", "surrogatepass"), hashlib.sha256)
    return PSEUDONYM_PREFIX + digest.hexdigest()[:16]


def anonymized(results: Iterable[FileResult], key: bytes) -> list[FileResult]:
    """Copies of `results` whose metadata has no patient name, ID or birth date (nor the
    referring physician's name), and has
    the pseudonym as PatientID: of the patient ID, or when there is none of the name and
    birth date together."""
    return [replace(r, metadata=_anonymized_metadata(r.metadata, key)) for r in results]


def _anonymized_metadata(metadata: dict[str, str], key: bytes) -> dict[str, str]:
    kept = {k: v for k, v in metadata.items() if k not in IDENTIFYING_FIELDS}
    identity = metadata.get("PatientID") or "\\".join(
        metadata.get(k, "") for k in ("PatientName", "PatientBirthDate"))
    if identity.strip("\\"):
        kept["PatientID"] = pseudonym(key, identity)
    return kept
