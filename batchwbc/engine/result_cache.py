"""A SQLite cache of per-crop results, so a nightly run over a growing archive only
classifies crops it has not seen before.

Why these choices:

* A row is valid only for the exact (path, size, mtime_ns, model sha256) it was computed for:
  a replaced or re-exported crop changes size or mtime, and a new model changes the sha256,
  so a stale result can never be reported. One row is kept per (path, model), so a changed
  file overwrites its old row instead of piling up.
* The full probability vector is stored (not just the winning class), so a later run with
  another review threshold recomputes the review flag exactly as a full run would.
* The image's own review reason (a greyscale crop, batchwbc.engine.crop_checks) is stored too,
  and so are the out-of-distribution score and verdict, each in a column of its own (NULL
  for a model without an OOD reference), so a cached crop is labelled unclassified exactly
  as a full run would label it.
* The format is versioned (cache_meta.schema_version). A format-1 cache (batchwbc 0.1.0) kept
  the OOD score and verdict as two extra "probabilities"; it is upgraded in place by dropping
  its results, which are computed again once, rather than guessing which rows hold extras.
  A cache of a newer format is refused in one sentence.
* WAL journal + batched commits: a killed run loses at most the last uncommitted batch
  (those crops are simply classified again next time) and never corrupts the file.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported lazily so `batchwbc --help` stays instant
    import numpy as np

SCHEMA_VERSION = "2"
#: Formats upgraded in place (their results are dropped and computed again once).
_UPGRADABLE = ("1",)
_APP_ID = "batchwbc-result-cache"
#: Commit after this many stores: large enough to keep SQLite fast, small enough that an
#: interrupted run loses little work.
DEFAULT_COMMIT_EVERY = 500
#: How long to wait for another process holding the database (two runs sharing one cache).
_BUSY_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)

_CREATE = (
    "CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS results ("
    " path TEXT NOT NULL,"
    " model_sha256 TEXT NOT NULL,"
    " size INTEGER NOT NULL,"
    " mtime_ns INTEGER NOT NULL,"
    " probs BLOB NOT NULL,"
    " thumbnail_jpeg BLOB,"
    " image_reason TEXT,"
    " ood_score REAL,"  # NULL: the model has no OOD reference
    " unclassified INTEGER,"  # the OOD verdict: 0 classified, else ood.BY_EMBEDDING / BY_COLOUR bits; NULL with ood_score
    " PRIMARY KEY (path, model_sha256))",
)


class CacheError(Exception):
    """A cache file that cannot be used; str(exc) is one sentence for the user."""


@dataclass(frozen=True)
class CachedEntry:
    """One crop's stored result: what the pipeline needs to rebuild its cell without decoding."""

    probs: "np.ndarray"  # float32 vector in the model's class order (the probabilities only)
    thumbnail_jpeg: bytes | None
    image_reason: str = ""  # review reason from the image itself ('' for none)
    ood_score: float | None = None  # out-of-distribution score; None: the model has no OOD reference
    unclassified: int = 0  # the OOD verdict (ood.BY_EMBEDDING / ood.BY_COLOUR bits); non-zero: labelled unclassified


class ResultCache:
    """Per-crop results of one model, persisted in SQLite.

    Use it as a context manager (or call close()): pending stores are committed on exit,
    also when the run is interrupted, because every stored row is a finished result.
    Not meant to be shared between processes' threads casually: one instance per run, used
    from the process that collects results (calls are serialised by a lock anyway).
    """

    def __init__(self, db_path: str | os.PathLike, model_sha256: str, commit_every: int = DEFAULT_COMMIT_EVERY):
        self.path = Path(db_path)
        self.model_sha256 = model_sha256
        self.commit_every = max(1, int(commit_every))
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self._pending = 0
        self.disabled_reason: str | None = None  # set when the cache failed mid-run
        self._lock = threading.Lock()
        self._conn = self._open()

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        p = self.path
        if p.is_dir():
            raise CacheError(f"cache path {p} is a folder, not a cache file.")
        if not p.parent.is_dir():
            raise CacheError(f"the folder for cache file {p} does not exist.")
        try:
            conn = sqlite3.connect(str(p), timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise CacheError(f"cache file {p} cannot be opened ({exc}).") from None
        try:
            self._check_or_create(conn)
        except CacheError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            msg = str(exc)
            if "not a database" in msg or "malformed" in msg or "encrypted" in msg:
                raise CacheError(f"cache file {p} is not a batchwbc cache (not a valid SQLite database); delete it or choose another --cache path.") from None
            raise CacheError(f"cache file {p} cannot be used ({msg}).") from None
        return conn

    def _check_or_create(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if not tables:  # nobody created it meanwhile
                    for stmt in _CREATE:
                        conn.execute(stmt)
                    conn.executemany(
                        "INSERT INTO cache_meta(key, value) VALUES (?, ?)",
                        [("application", _APP_ID), ("schema_version", SCHEMA_VERSION)],
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        meta: dict[str, str] = {}
        try:
            meta = dict(conn.execute("SELECT key, value FROM cache_meta").fetchall())
        except sqlite3.OperationalError:
            pass
        if meta.get("application") != _APP_ID:
            raise CacheError(f"cache file {self.path} is an SQLite database of another program; choose another --cache path.")
        if meta.get("schema_version") in _UPGRADABLE:
            self._upgrade(conn)
        elif meta.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(
                f"cache file {self.path} was written by another batchwbc version (cache format "
                f"{meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}); delete it to start a new cache."
            )
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is crash-safe in WAL mode (a power cut can lose the last commit, never corrupt).
        conn.execute("PRAGMA synchronous=NORMAL")

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Bring an older cache to this format by dropping its results (one transaction, so two
        runs opening it at once upgrade it once): its crops are classified again, once."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = conn.execute("SELECT value FROM cache_meta WHERE key='schema_version'").fetchone()[0]
            dropped = 0
            if old in _UPGRADABLE:  # not upgraded by another run meanwhile
                dropped = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                conn.execute("DROP TABLE results")
                conn.execute(_CREATE[1])
                conn.execute("UPDATE cache_meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if old in _UPGRADABLE:
            log.warning("cache file %s was written by an earlier batchwbc (cache format %s); its %d results were "
                        "dropped and are computed again once.", self.path, old, dropped)

    # -- use -----------------------------------------------------------------------------
    def lookup(self, abs_path: str, size: int, mtime_ns: int) -> CachedEntry | None:
        """The stored result for this exact file version and model, or None (counted as a miss)."""
        import numpy as np

        with self._lock:
            row = None
            if self.disabled_reason is None:
                try:
                    row = self._conn.execute(
                        "SELECT probs, thumbnail_jpeg, image_reason, ood_score, unclassified FROM results"
                        " WHERE path=? AND model_sha256=? AND size=? AND mtime_ns=?",
                        (abs_path, self.model_sha256, int(size), int(mtime_ns)),
                    ).fetchone()
                except sqlite3.Error as exc:
                    self._disable(exc)
            if row is None or len(row[0]) == 0 or len(row[0]) % 4 or row[2] is None:
                self.misses += 1
                return None
            self.hits += 1
        probs = np.frombuffer(row[0], dtype="<f4").astype(np.float32)
        return CachedEntry(probs=probs, thumbnail_jpeg=bytes(row[1]) if row[1] is not None else None,
                           image_reason=row[2], ood_score=None if row[3] is None else float(row[3]),
                           unclassified=int(row[4] or 0) if row[3] is not None else 0)

    def store(self, abs_path: str, size: int, mtime_ns: int, entry: CachedEntry) -> None:
        """Remember one result; committed in batches (see DEFAULT_COMMIT_EVERY) and on close."""
        import numpy as np

        blob = np.ascontiguousarray(entry.probs, dtype="<f4").reshape(-1).tobytes()
        ood = (None, None) if entry.ood_score is None else (float(entry.ood_score), int(entry.unclassified))
        with self._lock:
            if self.disabled_reason is not None:
                return
            try:
                if not self._conn.in_transaction:
                    self._conn.execute("BEGIN")
                self._conn.execute(
                    "INSERT OR REPLACE INTO results(path, model_sha256, size, mtime_ns, probs, thumbnail_jpeg,"
                    " image_reason, ood_score, unclassified) VALUES (?,?,?,?,?,?,?,?,?)",
                    (abs_path, self.model_sha256, int(size), int(mtime_ns), blob, entry.thumbnail_jpeg,
                     entry.image_reason, *ood),
                )
                self._pending += 1
                self.stored += 1
                if self._pending >= self.commit_every:
                    self._commit_locked()
            except sqlite3.Error as exc:
                self._disable(exc)

    def _disable(self, exc: Exception) -> None:
        """A cache that fails mid-run (disk full, file locked too long) must not fail the run:
        results are still reported, they are just not remembered."""
        self.disabled_reason = str(exc)
        log.warning("result cache %s stopped working (%s); this run continues without it.", self.path, exc)
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def commit(self) -> None:
        with self._lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        if self.disabled_reason is None and self._conn.in_transaction:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._disable(exc)
        self._pending = 0

    def __len__(self) -> int:
        """Rows for this model (all file versions ever stored and not yet replaced)."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM results WHERE model_sha256=?", (self.model_sha256,)).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self._commit_locked()
            finally:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
