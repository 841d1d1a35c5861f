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

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pneumoscan.files import open_private, sha256_of_stream
from pneumoscan.inputs.reading import open_input
from pneumoscan.records import FileResult, InputFile
from pneumoscan.text import format_duration, printable
from pneumoscan.workers import available_cores, in_threads

SCHEMA_VERSION = 4

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
{STUDY_LISTINGS}
INSERT INTO settings VALUES ('pseudonym_key', randomblob(32));
"""
# The CR/DX instances of each PACS study as last listed, and the study's instance count
# then: a study whose count is unchanged is not listed again.
STUDY_LISTINGS = """
CREATE TABLE IF NOT EXISTS study_listings (
    name TEXT PRIMARY KEY,         -- JSON: [server URL, Study Instance UID]
    instances_in_study TEXT NOT NULL,  -- its NumberOfStudyRelatedInstances when listed
    instances TEXT NOT NULL        -- JSON list of [Series Instance UID, SOP Instance UID]
);
"""
SCHEMA = SCHEMA.replace("{STUDY_LISTINGS}", STUDY_LISTINGS.strip())

# Format N -> N + 1, in SQL. Format 1 kept the X-ray and its overlay as two images; its
# scores stay valid, and the pictures are made again when a report next needs them.
# Format 2 had no scope (in_scope, scope_reasons) in its results: results without one are
# computed again (the ledger records results, it does not classify), while the files'
# content hashes are kept, so nothing is hashed again. Format 3 had no study listings.
MIGRATIONS = {
    1: """ALTER TABLE files DROP COLUMN image_png;
          ALTER TABLE files DROP COLUMN overlay_png;
          ALTER TABLE files ADD COLUMN picture BLOB;
          UPDATE files SET rendered = 0;""",
    2: "UPDATE files SET model_sha256 = '' WHERE json_type(result, '$.in_scope') IS NULL;",
    3: STUDY_LISTINGS,
}

# Tables and columns a state file of SCHEMA_VERSION must have.
REQUIRED_COLUMNS = {
    "settings": {"name", "value"},
    "files": {"path", "stat", "content_sha256", "model_sha256", "threshold", "rendered",
              "result", "seconds", "picture", "recorded"},
    "outputs": {"name", "fingerprint", "files"},
    "study_listings": {"name", "instances_in_study", "instances"},
}
# Files SQLite keeps beside the state (they must not be links either).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

# The run holding the state records its progress (its `holder` setting) at most this often;
# a holder whose progress is older than HUNG_AFTER_S looks hung: no file may take that long
# (the pipeline abandons any that takes over its FILE_TIMEOUT_S), nor any report.
HEARTBEAT_S = 10.0
HUNG_AFTER_S = 30 * 60


class StateError(RuntimeError):
    """The state file cannot be used (run-level error); the message is one line."""


class StateLocked(StateError):
    """Another run holds the state file. `holder` is what it recorded of itself (None when
    that cannot be read), and `hung` whether it looks hung."""

    def __init__(self, message: str, holder: dict | None = None, hung: bool = False):
        super().__init__(message)
        self.holder, self.hung = holder, hung


@dataclass(frozen=True)
class Basis:
    """What a result depends on besides the file's content."""
    model_sha256: str
    threshold: float
    render: bool  # report images wanted


@dataclass(frozen=True)
class StoredPicture:
    """A report picture kept in a state file, read only when a report shows it, so that a
    report of many images never holds all their pictures at once. Plain data: it travels
    to the processes that render per-study reports, which read it there."""
    state: str
    key: bytes

    def __bytes__(self) -> bytes:
        try:
            row = _reader(self.state).execute("SELECT picture FROM files WHERE path = ?",
                                              (self.key,)).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"state file {self.state}: cannot read a report picture: "
                             f"{printable(str(exc), 200)}") from exc
        if row is None or row[0] is None:
            raise StateError(f"state file {self.state} lost the report picture of "
                             f"{printable(os.fsdecode(self.key))}")
        return row[0]


# Read-only connections of this process to state files, for StoredPicture.
_readers: dict[str, sqlite3.Connection] = {}


def _reader(state: str) -> sqlite3.Connection:
    if state not in _readers:
        _readers[state] = sqlite3.connect(f"{Path(state).absolute().as_uri()}?mode=ro",
                                          uri=True, check_same_thread=False)
    return _readers[state]


def _close_reader(state: str) -> None:
    reader = _readers.pop(state, None)
    if reader is not None:
        reader.close()


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


def stat_signature(st: os.stat_result) -> str:
    """Changes whenever the file may have changed: a write, a replacement, a touch."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class Ledger:
    """An open, locked state file. Use as a context manager, or call `close`.

    Every problem with the file itself (a full disk, damaged pages, a wrong schema, a
    garbled row) is a StateError with one line saying what and where; what was committed
    before it stays."""

    def __init__(self, path: Path, lock_fd: int, db: sqlite3.Connection):
        self.path, self._lock_fd, self._db = path, lock_fd, db
        self._started, self._beaten = time.time(), 0.0

    @classmethod
    def open(cls, path: Path, *, wait: bool = False) -> Ledger:
        """Lock and open (or create, owner-only) the state file at `path`. A symbolic link
        there (or at SQLite's files beside it) is refused, as is an empty file: an empty
        state is a truncated one, whose results and pseudonym key are gone."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _create(path)
        try:
            lock_fd = open_private(path, os.O_RDWR)
        except OSError as exc:
            raise StateError(f"cannot use state file {path}: {exc.strerror or exc}") from exc
        try:
            _lock(lock_fd, path, wait)
            _refuse_links(path)
            if os.fstat(lock_fd).st_size == 0:
                raise StateError(
                    f"state file {path} is empty (0 bytes): it was truncated, and its results "
                    "and pseudonym key are lost. Refusing to start afresh silently: move it "
                    "aside (or restore it from a backup) and run again; every file is then "
                    "computed again and, with --anonymize, patients get new pseudonyms")
            ledger = cls(path, lock_fd, _connect(path))
        except BaseException:
            os.close(lock_fd)  # also releases the lock
            raise
        try:
            ledger.pseudonym_key  # noqa: B018 (checked now, not when first needed)
            ledger._beat(force=True)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        # SQLite's own (fcntl) locks die with any descriptor of the file: close SQLite first.
        _close_reader(str(self.path))
        with contextlib.suppress(sqlite3.Error):
            with self._db:
                self._db.execute("DELETE FROM settings WHERE name = 'holder'")
        self._db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _using(self, action: str) -> Iterator[None]:
        """SQLite's errors while `action` as one StateError line."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StateError(f"state file {self.path}: cannot {action}: "
                             f"{printable(str(exc), 200)}") from exc

    @contextlib.contextmanager
    def _decoding(self, action: str) -> Iterator[None]:
        """Around the decoding of recorded rows alone: JSON and rows that make no sense (a
        damaged state file) as one StateError line. Errors of our own code elsewhere stay
        what they are: bugs."""
        try:
            yield
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"state file {self.path} is damaged: cannot {action}: "
                             f"{type(exc).__name__}: {printable(str(exc), 200)}") from exc

    @property
    def pseudonym_key(self) -> bytes:
        """A random secret made with the state file, for stable patient pseudonyms."""
        with self._using("read the pseudonym key"):
            row = self._db.execute(
                "SELECT value FROM settings WHERE name = 'pseudonym_key'").fetchone()
        if row is None or not isinstance(row[0], bytes) or len(row[0]) < 16:
            raise StateError(f"state file {self.path} is damaged: its pseudonym key is "
                             "missing. Restore it from a backup, or move it aside to start "
                             "afresh (patients then get new pseudonyms)")
        return row[0]

    def _beat(self, force: bool = False) -> None:
        """Record that the run holding the state is making progress (at most every
        HEARTBEAT_S), for a run that finds it locked to tell a working holder from a hung
        one."""
        now = time.time()
        if not force and now - self._beaten < HEARTBEAT_S:
            return
        holder = {"pid": os.getpid(), "host": os.uname().nodename, "started": self._started,
                  "progress": now}
        with self._using("record progress"), self._db:
            self._db.execute("INSERT OR REPLACE INTO settings VALUES ('holder', ?)",
                             (json.dumps(holder),))
        self._beaten = now

    # --- input files ----------------------------------------------------------------------

    def plan(self, items: Iterable[InputFile], basis: Basis, *,
             force: bool = False) -> list[Planned]:
        """Each item with its content hash and, when the ledger holds a result that is still
        valid for it, that result. Reads each image whose stat changed since it was hashed
        (in a thread a core: on a fresh state this reads every file before the first is
        decoded); decodes none. Files that are not images are recorded too (by their
        stat), so that an unchanged one counts as unchanged."""
        plans = [Planned(item) for item in items]
        with self._using("read recorded results"), self._db:
            recorded = ((plan, self._recorded(plan.item.path))
                        for plan in plans if not plan.item.unreadable)
            for plan, row, read in in_threads(_fingerprint, recorded, available_cores(),
                                              "pneumoscan-hash"):
                if isinstance(read, OSError):
                    continue  # gone or unreadable now: the pipeline reports it, nothing is kept
                signature, digest = read
                key = ledger_key(plan.item.path)
                if (row and row[0] != signature and row[1] == digest
                        and plan.item.kind is not None):
                    # touched, copied over, moved back: the same content
                    self._db.execute("UPDATE files SET stat = ? WHERE path = ?",
                                     (signature, key))
                plan.key, plan.stat, plan.content_sha256 = key, signature, digest
                if not force:
                    plan.cached = self._reusable(plan, basis)
                self._beat()
        return plans

    def plan_remote(self, items: Iterable[InputFile], sop_uids: Iterable[str], basis: Basis, *,
                    force: bool = False) -> list[Planned]:
        """Like `plan`, for instances on a PACS: keyed by SOP Instance UID (by the standard,
        one instance for ever), so nothing needs to be retrieved to know it was seen."""
        plans = []
        with self._using("read recorded results"), self._db:
            for item, sop_uid in zip(items, sop_uids):
                plan = Planned(item, remote_key(sop_uid), REMOTE_STAT, sop_uid)
                if not force:
                    plan.cached = self._reusable(plan, basis)
                plans.append(plan)
        return plans

    def _recorded(self, path: Path) -> tuple[str, str] | None:
        """(stat, content hash) recorded for the file at `path`, if any."""
        return self._db.execute("SELECT stat, content_sha256 FROM files WHERE path = ?",
                                (ledger_key(path),)).fetchone()

    def _reusable(self, plan: Planned, basis: Basis) -> FileResult | None:
        row = self._db.execute(
            "SELECT result, seconds, rendered, picture IS NOT NULL FROM files WHERE path = ?"
            " AND content_sha256 = ? AND model_sha256 = ? AND threshold = ?",
            (plan.key, plan.content_sha256, basis.model_sha256, basis.threshold)).fetchone()
        if row is None or plan.key is None:
            return None
        result_json, seconds, rendered, has_picture = row
        picture = self.stored_picture(plan.key) if basis.render and has_picture else None
        with self._decoding("read recorded results"):
            result = result_from_json(json.loads(result_json), plan.item.path,
                                      seconds=seconds, picture=picture)
        if basis.render and not rendered and result.status == "ok":
            return None  # classified without report images: make them now
        return result

    def stored_picture(self, key: bytes) -> StoredPicture:
        return StoredPicture(str(self.path), key)

    def record(self, plan: Planned, result: FileResult, basis: Basis) -> bool:
        """Keep `result` of a planned file, in its own transaction. Only results of content
        that stayed the same while it was processed are kept: a file still being copied in,
        or gone, is tried again next run. Returns whether it was kept."""
        if plan.key is None or not (plan.stat == REMOTE_STAT or _stat_unchanged(plan)):
            return False
        with self._using("record a result"), self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO files (path, stat, content_sha256, model_sha256,"
                " threshold, rendered, result, seconds, picture)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (plan.key, plan.stat, plan.content_sha256, basis.model_sha256,
                 basis.threshold, int(basis.render), json.dumps(result.to_json()),
                 result.seconds, result.picture))
        self._beat()
        return True

    def forget_missing(self, root: Path, plans: Sequence[Planned]) -> None:
        """Drop the rows of files under `root` that this run did not find (deleted, moved),
        except under folders it could not list."""
        root_key = ledger_key(root)
        seen = {ledger_key(p.item.path) for p in plans}
        unlisted = [ledger_key(p.item.path) + b"/" for p in plans if p.item.unreadable]
        with self._using("forget deleted files"):
            gone = [(key,) for (key,) in self._db.execute("SELECT path FROM files")
                    if (key == root_key or key.startswith(root_key.rstrip(b"/") + b"/"))
                    and key not in seen and not key.startswith(tuple(unlisted))]
            with self._db:
                self._db.executemany("DELETE FROM files WHERE path = ?", gone)

    # --- PACS study listings --------------------------------------------------------------

    def study_listing(self, server: str, study_uid: str, instances_in_study: str
                      ) -> list[tuple[str, str]] | None:
        """(series UID, SOP instance UID) of the study's CR/DX instances as last listed,
        if the study held `instances_in_study` instances then too; else None."""
        with self._using("read a study listing"):
            row = self._db.execute(
                "SELECT instances_in_study, instances FROM study_listings WHERE name = ?",
                (json.dumps([server, study_uid]),)).fetchone()
            if row is None or row[0] != instances_in_study:
                return None
            return [(series, sop) for series, sop in json.loads(row[1])]

    def record_study_listing(self, server: str, study_uid: str, instances_in_study: str,
                             instances: Iterable[tuple[str, str]]) -> None:
        with self._using("record a study listing"), self._db:
            self._db.execute("INSERT OR REPLACE INTO study_listings VALUES (?, ?, ?)",
                             (json.dumps([server, study_uid]), instances_in_study,
                              json.dumps([list(pair) for pair in instances])))

    # --- reports --------------------------------------------------------------------------

    def output_is_current(self, name: Sequence[str], fingerprint: str) -> bool:
        """Whether the report `name` was written showing exactly `fingerprint`, and all its
        files are still there."""
        with self._using("read recorded reports"):
            row = self._db.execute("SELECT fingerprint, files FROM outputs WHERE name = ?",
                                   (json.dumps(list(name)),)).fetchone()
        if not row or row[0] != fingerprint:
            return False
        with self._decoding("read recorded reports"):
            files = json.loads(row[1])
        return all(os.path.exists(os.fsencode(f)) for f in files)

    def outputs(self, prefix: Sequence[str]) -> dict[tuple[str, ...], list[Path]]:
        """The recorded reports whose names start with `prefix`, and their files."""
        with self._using("read recorded reports"):
            rows = self._db.execute("SELECT name, files FROM outputs").fetchall()
        with self._decoding("read recorded reports"):
            named = {tuple(json.loads(name)): [Path(f) for f in json.loads(files)]
                     for name, files in rows}
        return {name: files for name, files in named.items()
                if name[:len(prefix)] == tuple(prefix)}

    def forget_output(self, name: Sequence[str]) -> None:
        with self._using("forget a report"), self._db:
            self._db.execute("DELETE FROM outputs WHERE name = ?", (json.dumps(list(name)),))

    def output_written(self, name: Sequence[str], fingerprint: str,
                       files: Iterable[Path]) -> None:
        with self._using("record a report"), self._db:
            self._db.execute("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)",
                             (json.dumps(list(name)), fingerprint,
                              json.dumps([str(f) for f in files])))
        self._beat()


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
                      cam=data.get("cam"),  # not in results recorded before it was kept
                      from_ledger=True, **extra)


def _fingerprint(planned: tuple[Planned, tuple[str, str] | None]
                 ) -> tuple[Planned, tuple[str, str] | None, tuple[str, str] | OSError]:
    """(plan, its recorded (stat, hash), and its (stat, content hash) now, or the OSError
    that says it cannot be read now (or is no longer a regular file: InputChanged)). The
    content is hashed only when the stat changed."""
    plan, row = planned
    try:
        with open_input(plan.item.path, follow_link=plan.item.link) as fh:
            signature = stat_signature(os.fstat(fh.fileno()))
            if row and row[0] == signature:
                digest = row[1]
            elif plan.item.kind is None:
                digest = NOT_AN_IMAGE
            else:
                digest = sha256_of_stream(fh)
    except OSError as exc:
        return plan, row, exc
    return plan, row, (signature, digest)


def _stat_unchanged(plan: Planned) -> bool:
    try:
        return stat_signature(os.stat(plan.item.path)) == plan.stat
    except OSError:
        return False


def _refuse_links(path: Path) -> None:
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.is_symlink():
            raise StateError(f"{side} is a symbolic link: refused (SQLite would write the "
                             "state where it points); remove the link")


def _create(path: Path) -> None:
    """A new state file at `path` unless there is one: made complete in a temporary file
    and linked into place, so that no run ever sees a state file half made, and an empty
    one can only be a truncated one."""
    if os.path.lexists(path):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # mkstemp makes it 0600
    try:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode = WAL")  # recorded in the file, for good
            db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        finally:
            db.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another run made it first: use theirs
            os.link(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise StateError(f"cannot create state file {path}: {exc}") from exc
    finally:
        for leftover in (tmp, *(tmp + suffix for suffix in SQLITE_SIDE_FILES)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _lock(fd: int, path: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = read_holder(path)
            hung = holder is not None and time.time() - holder["progress"] > HUNG_AFTER_S
            raise StateLocked(f"state file {path} is in use by another pneumoscan run"
                              f"{describe_holder(holder, time.time())}; this run did nothing "
                              "(use --wait to wait for it)", holder, hung) from None
        raise StateError(f"cannot lock state file {path}: {exc.strerror or exc}") from exc


def read_holder(path: Path) -> dict | None:
    """What the run holding the state recorded of itself (pid, host, started, progress:
    Unix times), or None when that cannot be read. Reads without writing anything."""
    try:
        db = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM settings WHERE name = 'holder'").fetchone()
        finally:
            db.close()
        holder = json.loads(row[0])
        return {"pid": int(holder["pid"]), "host": str(holder["host"]),
                "started": float(holder["started"]), "progress": float(holder["progress"])}
    except (sqlite3.Error, TypeError, ValueError, KeyError):
        return None


def describe_holder(holder: dict | None, now: float) -> str:
    """` (PID 123, started 2 h 5 min ago, last progress 4 s ago)`, saying when it looks
    hung; "" when nothing is known of the holder."""
    if holder is None:
        return ""
    where = "" if holder["host"] == os.uname().nodename else f" on {printable(holder['host'], 64)}"
    started = datetime.fromtimestamp(holder["started"], timezone.utc).isoformat(timespec="seconds")
    text = (f" (PID {holder['pid']}{where}, started {started}, "
            f"{format_duration(now - holder['started'])} ago; last progress "
            f"{format_duration(now - holder['progress'])} ago")
    if now - holder["progress"] > HUNG_AFTER_S:
        text += (f": it looks hung, as no run goes {format_duration(HUNG_AFTER_S)} without "
                 f"progress; check that process and stop it (kill {holder['pid']}), the next "
                 "run then catches up")
    return text + ")"


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Format `version` -> `version` + 1, in one transaction."""
    db.executescript(f"BEGIN; {MIGRATIONS[version]} PRAGMA user_version = {version + 1}; COMMIT;")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL, a killed process loses nothing
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version in MIGRATIONS:
            while version < SCHEMA_VERSION:
                _migrate(db, version)
                version += 1
        elif version == 0:
            raise StateError(f"state file {path} is not a pneumoscan state file")
        elif version != SCHEMA_VERSION:
            raise StateError(f"state file {path} has format {version}, this pneumoscan reads "
                             f"format {SCHEMA_VERSION}: give another --state file")
        _check_schema(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StateError(f"state file {path} is not a pneumoscan state file, or is damaged: "
                         f"{printable(str(exc), 200)}") from exc
    except BaseException:
        db.close()
        raise
    return db


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    for table, columns in REQUIRED_COLUMNS.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not present:
            raise StateError(f"state file {path} is damaged: it has no table {table}")
        if columns - present:
            raise StateError(f"state file {path} is damaged: table {table} lacks column(s) "
                             f"{', '.join(sorted(columns - present))}")
