"""A SQLite cache of per-crop results, so a nightly run over a growing archive only
classifies crops it has not seen before.

Why these choices:

* A row is valid only for the exact (path, size, mtime_ns, model sha256) it was computed for:
  a replaced or re-exported crop changes size or mtime, and a new model changes the sha256,
  so a stale result can never be reported. One row is kept per (path, model), so a changed
  file overwrites its old row instead of piling up.
* The full probability vector is stored (not just the winning class), so a later run with
  another review threshold recomputes the review flag exactly as a full run would.
* The image's own review reason (a greyscale crop, batchwbc.engine.crop_checks) is stored too. Rows
  from before that column existed hold NULL there and count as misses, so such crops are
  checked again once; the column is added in place, so an older cache keeps working.
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

SCHEMA_VERSION = "1"
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
    " PRIMARY KEY (path, model_sha256))",
)


class CacheError(Exception):
    """A cache file that cannot be used; str(exc) is one sentence for the user."""


@dataclass(frozen=True)
class CachedEntry:
    probs: "np.ndarray"  # float32 vector in the model's class order
    thumbnail_jpeg: bytes | None
    image_reason: str = ""  # review reason from the image itself ('' for none)


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
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(
                f"cache file {self.path} was written by another batchwbc version (cache format "
                f"{meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}); delete it to start a new cache."
            )
        conn.execute("PRAGMA journal_mode=WAL")
        self._add_image_reason_column(conn)
        # NORMAL is crash-safe in WAL mode (a power cut can lose the last commit, never corrupt).
        conn.execute("PRAGMA synchronous=NORMAL")

    @staticmethod
    def _add_image_reason_column(conn: sqlite3.Connection) -> None:
        """Upgrade a cache written before image review reasons existed (its rows stay misses)."""
        columns = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
        if "image_reason" in columns:
            return
        try:
            conn.execute("ALTER TABLE results ADD COLUMN image_reason TEXT")
        except sqlite3.OperationalError:  # another run sharing the cache added it first
            columns = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
            if "image_reason" not in columns:
                raise

    # -- use -----------------------------------------------------------------------------
    def lookup(self, abs_path: str, size: int, mtime_ns: int) -> CachedEntry | None:
        """The stored result for this exact file version and model, or None (counted as a miss)."""
        import numpy as np

        with self._lock:
            row = None
            if self.disabled_reason is None:
                try:
                    row = self._conn.execute(
                        "SELECT probs, thumbnail_jpeg, image_reason FROM results WHERE path=? AND model_sha256=? AND size=? AND mtime_ns=?",
                        (abs_path, self.model_sha256, int(size), int(mtime_ns)),
                    ).fetchone()
                except sqlite3.Error as exc:
                    self._disable(exc)
            if row is None or len(row[0]) == 0 or len(row[0]) % 4 or row[2] is None:
                self.misses += 1
                return None
            self.hits += 1
        probs = np.frombuffer(row[0], dtype="<f4").astype(np.float32)
        return CachedEntry(probs=probs, thumbnail_jpeg=bytes(row[1]) if row[1] is not None else None, image_reason=row[2])

    def store(self, abs_path: str, size: int, mtime_ns: int, probs: "np.ndarray", thumbnail_jpeg: bytes | None,
              image_reason: str = "") -> None:
        """Remember one result; committed in batches (see DEFAULT_COMMIT_EVERY) and on close."""
        import numpy as np

        blob = np.ascontiguousarray(probs, dtype="<f4").reshape(-1).tobytes()
        with self._lock:
            if self.disabled_reason is not None:
                return
            try:
                if not self._conn.in_transaction:
                    self._conn.execute("BEGIN")
                self._conn.execute(
                    "INSERT OR REPLACE INTO results(path, model_sha256, size, mtime_ns, probs, thumbnail_jpeg, image_reason)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (abs_path, self.model_sha256, int(size), int(mtime_ns), blob, thumbnail_jpeg, image_reason),
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
