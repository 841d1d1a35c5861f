"""The state ledger: what earlier runs found, so that a run over a growing folder decodes and
classifies only files that are new or changed (`pneumoscan run --state FILE`).

One SQLite file holds, for each input file ever classified (or PACS instance, by its SOP
Instance UID), its content SHA-256, the model
and threshold that classified it, and the result (with the report images when the run
rendered them). A file is reused when its content, the model and the threshold are the same
and, for a report, its images are there; anything else is computed again. The file is
locked (flock) for the whole run, so two runs never share it: the second one fails at once
with `StateLocked`, or waits for the first one with `wait=True`.

Crash safety: each result is committed as soon as it is known (SQLite's WAL journal), so a
run killed at any moment loses at most the files still in flight, and a path is the key of
its row, so no file is ever recorded twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pneumoscan.files import sha256_of_file
from pneumoscan.records import FileResult, InputFile

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE files (
    path BLOB PRIMARY KEY,         -- absolute path, file-system bytes (names need not be UTF-8)
    stat TEXT NOT NULL,            -- os.stat signature when hashed: unchanged -> not re-read
    content_sha256 TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,
    rendered INTEGER NOT NULL,     -- 1 when the run made the report picture (stored below)
    result TEXT NOT NULL,          -- FileResult.to_json()
    seconds REAL,
    picture BLOB,
    recorded TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE TABLE outputs (
    name TEXT PRIMARY KEY,         -- JSON: which report (file, or folder and study)
    fingerprint TEXT NOT NULL,     -- of everything it shows
    files TEXT NOT NULL            -- JSON list of the files written
);
INSERT INTO settings VALUES ('pseudonym_key', randomblob(32));
"""



def _add_scope(db: sqlite3.Connection) -> None:
    """Format 2 results have no scope: those models had no scope guard, so what the same
    model would say now comes from the metadata rules alone."""
    from pneumoscan.inference.scope import assess

    rows = db.execute("SELECT path, result FROM files").fetchall()
    for path, text in rows:
        result = json.loads(text)
        if "in_scope" in result:
            continue
        result["in_scope"], result["scope_reasons"] = (
            assess(result["metadata"], None, None) if result["status"] == "ok" else (None, []))
        db.execute("UPDATE files SET result = ? WHERE path = ?", (json.dumps(result), path))


# Format N -> N + 1 (SQL, or a function of the connection). Format 1 kept the X-ray and its
# overlay as two images; its scores stay valid, and the pictures are made again when a
# report next needs them. Format 2 had no scope (in_scope, scope_reasons) in its results.
MIGRATIONS = {
    1: """ALTER TABLE files DROP COLUMN image_png;
          ALTER TABLE files DROP COLUMN overlay_png;
          ALTER TABLE files ADD COLUMN picture BLOB;
          UPDATE files SET rendered = 0;""",
    2: _add_scope,
}


class StateError(RuntimeError):
    """The state file cannot be used (run-level error)."""


class StateLocked(StateError):
    """Another run holds the state file."""


@dataclass(frozen=True)
class Basis:
    """What a result depends on besides the file's content."""
    model_sha256: str
    threshold: float
    render: bool  # report images wanted


# The content hash recorded for a file that is not an image: discovery decided that from
# its first bytes, and it stays so while its stat does.
NOT_AN_IMAGE = ""


@dataclass
class Planned:
    """One discovered file and what the ledger knows of it. `key` is None for entries that
    are not recorded: not readable now (the pipeline says why)."""
    item: InputFile
    key: bytes | None = None
    stat: str | None = None
    content_sha256: str | None = None
    cached: FileResult | None = None


def ledger_key(path: Path) -> bytes:
    return os.fsencode(os.path.abspath(path))


# The stat of a PACS instance's row: it is never stat'ed, its SOP Instance UID is its key.
REMOTE_STAT = "dicomweb"


def remote_key(sop_uid: str) -> bytes:
    return b"dicomweb:" + sop_uid.encode("ascii")


def stat_signature(path: Path) -> str:
    """Changes whenever the file may have changed: a write, a replacement, a touch."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class Ledger:
    """An open, locked state file. Use as a context manager, or call `close`."""

    def __init__(self, path: Path, lock_fd: int, db: sqlite3.Connection):
        self.path, self._lock_fd, self._db = path, lock_fd, db

    @classmethod
    def open(cls, path: Path, *, wait: bool = False) -> Ledger:
        """Lock and open (or create, owner-only) the state file at `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open state file {path}: {exc.strerror or exc}") from exc
        try:
            _lock(lock_fd, path, wait)
            return cls(path, lock_fd, _connect(path))
        except BaseException:
            os.close(lock_fd)  # also releases the lock
            raise

    def close(self) -> None:
        # SQLite's own (fcntl) locks die with any descriptor of the file: close SQLite first.
        self._db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pseudonym_key(self) -> bytes:
        """A random secret made with the state file, for stable patient pseudonyms."""
        return self._db.execute("SELECT value FROM settings WHERE name = 'pseudonym_key'"
                                ).fetchone()[0]

    # --- input files ----------------------------------------------------------------------

    def plan(self, items: Iterable[InputFile], basis: Basis, *,
             force: bool = False) -> list[Planned]:
        """Each item with its content hash and, when the ledger holds a result that is still
        valid for it, that result. Reads each image whose stat changed since it was hashed;
        decodes none. Files that are not images are recorded too (by their stat), so that
        an unchanged one counts as unchanged."""
        plans = []
        with self._db:
            for item in items:
                plan = Planned(item)
                plans.append(plan)
                if item.unreadable:
                    continue
                try:
                    self._fingerprint(plan)
                except OSError:
                    continue  # gone or unreadable now: the pipeline reports it, nothing is kept
                if not force:
                    plan.cached = self._reusable(plan, basis)
        return plans

    def plan_remote(self, items: Iterable[InputFile], sop_uids: Iterable[str], basis: Basis, *,
                    force: bool = False) -> list[Planned]:
        """Like `plan`, for instances on a PACS: keyed by SOP Instance UID (by the standard,
        one instance for ever), so nothing needs to be retrieved to know it was seen."""
        plans = []
        with self._db:
            for item, sop_uid in zip(items, sop_uids):
                plan = Planned(item, remote_key(sop_uid), REMOTE_STAT, sop_uid)
                if not force:
                    plan.cached = self._reusable(plan, basis)
                plans.append(plan)
        return plans

    def _fingerprint(self, plan: Planned) -> None:
        """Set the plan's key, stat and content hash; the hash is read again only when the
        stat changed. Raises OSError, leaving the plan as it was, when the file cannot be."""
        key, path = ledger_key(plan.item.path), plan.item.path
        stat = stat_signature(path)
        row = self._db.execute("SELECT stat, content_sha256 FROM files WHERE path = ?",
                               (key,)).fetchone()
        if row and row[0] == stat:
            digest = row[1]
        elif plan.item.kind is None:
            digest = NOT_AN_IMAGE
        else:
            digest = sha256_of_file(path)
            if row and row[1] == digest:  # touched, copied over, moved back: the same content
                self._db.execute("UPDATE files SET stat = ? WHERE path = ?", (stat, key))
        plan.key, plan.stat, plan.content_sha256 = key, stat, digest

    def _reusable(self, plan: Planned, basis: Basis) -> FileResult | None:
        picture = "picture" if basis.render else "NULL"
        row = self._db.execute(
            f"SELECT result, seconds, rendered, {picture} FROM files WHERE path = ?"
            " AND content_sha256 = ? AND model_sha256 = ? AND threshold = ?",
            (plan.key, plan.content_sha256, basis.model_sha256, basis.threshold)).fetchone()
        if row is None:
            return None
        result_json, seconds, rendered, picture = row
        data = json.loads(result_json)
        if basis.render and not rendered and data["status"] == "ok":
            return None  # classified without report images: make them now
        return result_from_json(data, plan.item.path, seconds=seconds, picture=picture)

    def record(self, plan: Planned, result: FileResult, basis: Basis) -> None:
        """Keep `result` of a planned file, in its own transaction. Only results of content
        that stayed the same while it was processed are kept: a file still being copied in,
        or gone, is tried again next run."""
        if plan.key is None or not (plan.stat == REMOTE_STAT or _stat_unchanged(plan)):
            return
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO files (path, stat, content_sha256, model_sha256,"
                " threshold, rendered, result, seconds, picture)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (plan.key, plan.stat, plan.content_sha256, basis.model_sha256,
                 basis.threshold, int(basis.render), json.dumps(result.to_json()),
                 result.seconds, result.picture))

    def forget_missing(self, root: Path, plans: Sequence[Planned]) -> None:
        """Drop the rows of files under `root` that this run did not find (deleted, moved),
        except under folders it could not list."""
        root_key = ledger_key(root)
        seen = {ledger_key(p.item.path) for p in plans}
        unlisted = [ledger_key(p.item.path) + b"/" for p in plans if p.item.unreadable]
        gone = [(key,) for (key,) in self._db.execute("SELECT path FROM files")
                if (key == root_key or key.startswith(root_key.rstrip(b"/") + b"/"))
                and key not in seen and not key.startswith(tuple(unlisted))]
        with self._db:
            self._db.executemany("DELETE FROM files WHERE path = ?", gone)

    # --- reports --------------------------------------------------------------------------

    def output_is_current(self, name: Sequence[str], fingerprint: str) -> bool:
        """Whether the report `name` was written showing exactly `fingerprint`, and all its
        files are still there."""
        row = self._db.execute("SELECT fingerprint, files FROM outputs WHERE name = ?",
                               (json.dumps(list(name)),)).fetchone()
        return bool(row) and row[0] == fingerprint and all(
            os.path.exists(os.fsencode(f)) for f in json.loads(row[1]))

    def forget_output(self, name: Sequence[str]) -> None:
        with self._db:
            self._db.execute("DELETE FROM outputs WHERE name = ?", (json.dumps(list(name)),))

    def output_written(self, name: Sequence[str], fingerprint: str,
                       files: Iterable[Path]) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)",
                             (json.dumps(list(name)), fingerprint,
                              json.dumps([str(f) for f in files])))


def result_from_json(data: dict, path: Path, **extra) -> FileResult:
    """A recorded result for the file now at `path`. A study named after the file's folder
    follows that folder's current spelling (the scanned folder may be given another way)."""
    study = data["study"]
    if study == str(Path(data["path"]).parent):
        study = str(path.parent)
    return FileResult(path=path, study=study, status=data["status"], reason=data["reason"],
                      probability=data["probability"], label=data["label"],
                      threshold=data["threshold"], metadata=data["metadata"],
                      in_scope=data["in_scope"], scope_reasons=data["scope_reasons"],
                      from_ledger=True, **extra)


def _stat_unchanged(plan: Planned) -> bool:
    try:
        return stat_signature(plan.item.path) == plan.stat
    except OSError:
        return False


def _lock(fd: int, path: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateLocked(f"state file {path} is in use by another pneumoscan run; "
                              "this run did nothing (use --wait to wait for it)") from None
        raise StateError(f"cannot lock state file {path}: {exc.strerror or exc}") from exc


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Format `version` -> `version` + 1, in one transaction."""
    step = MIGRATIONS[version]
    if isinstance(step, str):
        db.executescript(f"BEGIN; {step} PRAGMA user_version = {version + 1}; COMMIT;")
        return
    db.execute("BEGIN")
    try:
        step(db)
        db.execute(f"PRAGMA user_version = {version + 1}")
    except BaseException:
        db.rollback()
        raise
    db.commit()


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL, a killed process loses nothing
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not db.execute("SELECT 1 FROM sqlite_master").fetchone():
            db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version in MIGRATIONS:
            while version < SCHEMA_VERSION:
                _migrate(db, version)
                version += 1
        elif version != SCHEMA_VERSION:
            raise StateError(f"state file {path} has format {version}, this pneumoscan reads "
                             f"format {SCHEMA_VERSION}: give another --state file")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StateError(f"state file {path} is not a pneumoscan state file: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db
