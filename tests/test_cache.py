"""ResultCache: exact-version keying, model isolation, batching, crash safety, bad files."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from batchwbc.engine.result_cache import CachedEntry, CacheError, ResultCache

SHA_A = "a" * 64
SHA_B = "b" * 64


def _probs(seed: int, k: int = 12) -> np.ndarray:
    p = np.random.default_rng(seed).random(k).astype(np.float32)
    return p / p.sum()


def test_roundtrip_after_reopen(tmp_path):
    db = tmp_path / "c.sqlite"
    p = _probs(1)
    with ResultCache(db, SHA_A) as c:
        assert c.lookup("/x/a.jpg", 10, 123) is None
        c.store("/x/a.jpg", 10, 123, CachedEntry(p, b"\x89PNGthumb"))
        c.store("/x/b.jpg", 11, 124, CachedEntry(_probs(2), None))
    with ResultCache(db, SHA_A) as c:
        e = c.lookup("/x/a.jpg", 10, 123)
        assert e is not None
        assert e.probs.dtype == np.float32 and np.array_equal(e.probs, p)
        assert e.thumbnail_jpeg == b"\x89PNGthumb"
        assert c.lookup("/x/b.jpg", 11, 124).thumbnail_jpeg is None
        assert (c.hits, c.misses) == (2, 0)
        assert len(c) == 2


@pytest.mark.parametrize("size,mtime", [(99, 123), (10, 124)])
def test_changed_file_misses(tmp_path, size, mtime):
    with ResultCache(tmp_path / "c.db", SHA_A) as c:
        c.store("/x/a.jpg", 10, 123, CachedEntry(_probs(1), None))
        assert c.lookup("/x/a.jpg", size, mtime) is None
        assert c.lookup("/x/other.jpg", 10, 123) is None
        assert (c.hits, c.misses) == (0, 2)


def test_changed_file_replaces_old_row(tmp_path):
    with ResultCache(tmp_path / "c.db", SHA_A) as c:
        c.store("/x/a.jpg", 10, 123, CachedEntry(_probs(1), None))
        c.store("/x/a.jpg", 12, 200, CachedEntry(_probs(2), None))
        assert len(c) == 1
        assert np.array_equal(c.lookup("/x/a.jpg", 12, 200).probs, _probs(2))


def test_other_model_never_hits(tmp_path):
    db = tmp_path / "c.db"
    with ResultCache(db, SHA_A) as c:
        c.store("/x/a.jpg", 10, 123, CachedEntry(_probs(1), None))
    with ResultCache(db, SHA_B) as c:
        assert c.lookup("/x/a.jpg", 10, 123) is None
        assert c.misses == 1 and len(c) == 0
        c.store("/x/a.jpg", 10, 123, CachedEntry(_probs(5), None))
    with ResultCache(db, SHA_A) as c:  # the first model's rows are still its own
        assert np.array_equal(c.lookup("/x/a.jpg", 10, 123).probs, _probs(1))


def test_commits_in_batches_and_on_close(tmp_path):
    db = tmp_path / "c.db"
    c = ResultCache(db, SHA_A, commit_every=3)
    for i in range(4):
        c.store(f"/x/{i}.jpg", 1, 1, CachedEntry(_probs(i), None))
    other = sqlite3.connect(db)
    assert other.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 3  # 4th still pending
    c.close()
    assert other.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 4
    other.close()


def test_killed_process_leaves_usable_cache(tmp_path):
    """A run killed mid-batch loses only its uncommitted rows; the file stays valid."""
    db = tmp_path / "c.db"
    code = textwrap.dedent(f"""
        import os, numpy as np
        from batchwbc.engine.result_cache import CachedEntry, ResultCache
        c = ResultCache({str(db)!r}, {SHA_A!r}, commit_every=10)
        for i in range(25):
            c.store(f"/x/{{i}}.jpg", 1, 1, CachedEntry(np.full(12, i, np.float32), None))
        os._exit(9)  # no close(), no atexit: like SIGKILL
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    with ResultCache(db, SHA_A) as c:
        assert len(c) == 20
        assert c.lookup("/x/19.jpg", 1, 1).probs[0] == 19
        assert c.lookup("/x/24.jpg", 1, 1) is None
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_interrupt_inside_context_keeps_finished_rows(tmp_path):
    db = tmp_path / "c.db"
    with pytest.raises(KeyboardInterrupt):
        with ResultCache(db, SHA_A) as c:
            c.store("/x/a.jpg", 1, 1, CachedEntry(_probs(1), None))
            raise KeyboardInterrupt
    with ResultCache(db, SHA_A) as c:
        assert c.lookup("/x/a.jpg", 1, 1) is not None


def test_not_a_database(tmp_path):
    bad = tmp_path / "c.db"
    bad.write_bytes(b"this is a text file, not sqlite\n" * 100)
    with pytest.raises(CacheError) as ei:
        ResultCache(bad, SHA_A)
    msg = str(ei.value)
    assert "not a valid SQLite database" in msg and "\n" not in msg


def test_other_schema(tmp_path):
    db = tmp_path / "c.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(CacheError, match="another program"):
        ResultCache(db, SHA_A)


def test_other_schema_version(tmp_path):
    db = tmp_path / "c.db"
    ResultCache(db, SHA_A).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE cache_meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(CacheError, match="another batchwbc version"):
        ResultCache(db, SHA_A)


def test_folder_and_missing_parent(tmp_path):
    with pytest.raises(CacheError, match="is a folder"):
        ResultCache(tmp_path, SHA_A)
    with pytest.raises(CacheError, match="does not exist"):
        ResultCache(tmp_path / "nope" / "c.db", SHA_A)


def test_empty_existing_file_becomes_cache(tmp_path):
    db = tmp_path / "c.db"
    db.touch()  # e.g. created by `touch` in a setup script
    with ResultCache(db, SHA_A) as c:
        c.store("/x/a.jpg", 1, 1, CachedEntry(_probs(1), None))
    with ResultCache(db, SHA_A) as c:
        assert c.lookup("/x/a.jpg", 1, 1) is not None


def test_wal_mode(tmp_path):
    db = tmp_path / "c.db"
    ResultCache(db, SHA_A).close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failure_mid_run_disables_instead_of_crashing(tmp_path, caplog):
    c = ResultCache(tmp_path / "c.db", SHA_A)
    c._conn.close()  # simulate the database becoming unusable mid-run
    c.store("/x/a.jpg", 1, 1, CachedEntry(_probs(1), None))
    assert c.disabled_reason
    assert c.lookup("/x/a.jpg", 1, 1) is None
    assert "continues without it" in caplog.text


def test_ood_score_and_verdict_have_columns_of_their_own(tmp_path):
    """Issue 20: the score and the unclassified verdict were two extra "probabilities" read
    back with `> 0.5`; they are named fields now, and the probabilities stay probabilities."""
    db = tmp_path / "c.db"
    with ResultCache(db, SHA_A) as c:
        c.store("/x/out.jpg", 1, 1, CachedEntry(_probs(1), b"t", "", ood_score=7.25, unclassified=True))
        c.store("/x/in.jpg", 1, 1, CachedEntry(_probs(2), None, "", ood_score=0.5, unclassified=False))
        c.store("/x/none.jpg", 1, 1, CachedEntry(_probs(3), None))
    with ResultCache(db, SHA_A) as c:
        out, inside, none = (c.lookup(f"/x/{n}.jpg", 1, 1) for n in ("out", "in", "none"))
    assert (out.ood_score, out.unclassified, out.probs.shape) == (7.25, True, (12,))
    assert (inside.ood_score, inside.unclassified) == (0.5, False)
    assert (none.ood_score, none.unclassified) == (None, False)
    columns = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(results)")}
    assert {"ood_score", "unclassified"} <= columns


def test_a_format_1_cache_is_upgraded_by_dropping_its_results(tmp_path, caplog):
    """A cache of batchwbc 0.1.0 (OOD values packed into the probabilities) keeps working:
    its results are dropped once, with a warning, and computed again."""
    db = tmp_path / "c.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("CREATE TABLE results (path TEXT NOT NULL, model_sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
                " mtime_ns INTEGER NOT NULL, probs BLOB NOT NULL, thumbnail_jpeg BLOB, image_reason TEXT,"
                " PRIMARY KEY (path, model_sha256))")
    con.executemany("INSERT INTO cache_meta VALUES (?, ?)", [("application", "batchwbc-result-cache"),
                                                              ("schema_version", "1")])
    packed = np.concatenate([_probs(1), [7.25, 1.0]]).astype("<f4").tobytes()  # 12 probabilities, score, flag
    con.execute("INSERT INTO results VALUES ('/x/a.jpg', ?, 1, 1, ?, NULL, '')", (SHA_A, packed))
    con.commit()
    con.close()
    with ResultCache(db, SHA_A) as c:
        assert c.lookup("/x/a.jpg", 1, 1) is None and len(c) == 0
        c.store("/x/a.jpg", 1, 1, CachedEntry(_probs(1), None, "", 7.25, True))
    assert "cache format 1" in caplog.text and "1 results were dropped" in caplog.text
    caplog.clear()
    with ResultCache(db, SHA_A) as c:  # upgraded once
        assert c.lookup("/x/a.jpg", 1, 1).unclassified
    assert "dropped" not in caplog.text
    meta = dict(sqlite3.connect(db).execute("SELECT key, value FROM cache_meta").fetchall())
    assert meta["schema_version"] == "2"
