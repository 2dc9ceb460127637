"""Crops that cannot be a cell (too small, strips) and greyscale crops (no stain colour)."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import fuzz_corpus
import tinymodel
from batchwbc.engine import crop_checks
from batchwbc.engine.result_cache import CachedEntry, ResultCache
from batchwbc.engine.pipeline import decode_one
from batchwbc.engine.preprocess import UnreadableImage


@pytest.mark.parametrize("w,h,word", [(1, 1, "too small"), (31, 400, "too small"), (400, 31, "too small"),
                                      (8000, 3, "too small"), (121, 40, "strip"), (40, 121, "strip"),
                                      (1000, 300, "strip")])
def test_shape_problem_names_the_size(w, h, word):
    reason = crop_checks.shape_problem(w, h)
    assert reason is not None and f"{w}x{h} pixels" in reason and word in reason


@pytest.mark.parametrize("w,h", [(32, 32), (360, 363), (400, 400), (120, 40), (40, 120), (2500, 2500)])
def test_real_crop_shapes_pass(w, h):
    assert crop_checks.shape_problem(w, h) is None


def test_check_crop_shape_raises_unreadable_image():
    with pytest.raises(UnreadableImage, match="too small"):
        crop_checks.check_crop_shape(np.zeros((3, 8000, 3), np.uint8))
    crop_checks.check_crop_shape(np.zeros((64, 64, 3), np.uint8))


def test_decode_one_refuses_a_strip(tmp_path):
    f = tmp_path / "strip.png"
    f.write_bytes(fuzz_corpus._pil_bytes(np.zeros((3, 8000, 3), np.uint8), "PNG"))
    arr, reason, *_ = decode_one(str(f), 32)
    assert arr is None and "8000x3 pixels" in reason


def test_greyscale_detection():
    cell = fuzz_corpus.cell_like()
    grey3 = np.repeat(fuzz_corpus.grey_of(cell)[:, :, None], 3, axis=2)
    noisy = np.clip(grey3.astype(np.int16) + np.random.default_rng(0).integers(-1, 2, grey3.shape), 0, 255).astype(np.uint8)
    assert crop_checks.is_greyscale(grey3) and crop_checks.is_greyscale(noisy)
    assert not crop_checks.is_greyscale(cell)
    for rgb in tinymodel.COLOURS:  # the test model's class colours are all colourful
        assert not crop_checks.is_greyscale(np.broadcast_to(np.array(rgb, np.uint8), (32, 32, 3)))
    tinted = grey3.astype(np.int16)
    tinted[..., 0] += 6  # a faint but real colour cast is not greyscale
    assert not crop_checks.is_greyscale(np.clip(tinted, 0, 255).astype(np.uint8))


def test_review_reasons():
    assert crop_checks.review_reasons(0.9, 0.6) == ""
    assert crop_checks.review_reasons(0.5, 0.6) == crop_checks.LOW_CONFIDENCE_REASON
    assert crop_checks.review_reasons(0.9, 0.6, crop_checks.GREYSCALE_REASON) == crop_checks.GREYSCALE_REASON
    both = crop_checks.review_reasons(0.5, 0.6, crop_checks.GREYSCALE_REASON)
    assert both.startswith(crop_checks.GREYSCALE_REASON) and both.endswith(crop_checks.LOW_CONFIDENCE_REASON)


def test_cache_from_before_image_reasons_is_upgraded_and_its_rows_rechecked(tmp_path):
    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO cache_meta VALUES ('application', 'batchwbc-result-cache'), ('schema_version', '1');"
        "CREATE TABLE results (path TEXT NOT NULL, model_sha256 TEXT NOT NULL, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, probs BLOB NOT NULL, thumbnail_jpeg BLOB, PRIMARY KEY (path, model_sha256));"
    )
    conn.execute("INSERT INTO results VALUES ('/a.png', 'sha', 10, 20, ?, NULL)", (np.ones(3, "<f4").tobytes(),))
    conn.commit()
    conn.close()
    with ResultCache(db, "sha") as cache:
        assert cache.lookup("/a.png", 10, 20) is None  # written before greyscale was checked: decode again
        cache.store("/a.png", 10, 20, CachedEntry(np.ones(3, np.float32), b"jpg", crop_checks.GREYSCALE_REASON))
        cache.store("/b.png", 10, 20, CachedEntry(np.ones(3, np.float32), None))
    with ResultCache(db, "sha") as cache:
        assert cache.lookup("/a.png", 10, 20).image_reason == crop_checks.GREYSCALE_REASON
        assert cache.lookup("/b.png", 10, 20).image_reason == ""


def test_greyscale_reason_survives_the_cache(tmp_path):
    from test_fuzz_cli import run_cli, sheet_rows

    model = tinymodel.build(tmp_path / "tiny.onnx")
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    cell = fuzz_corpus.cell_like()
    (slides / "P1" / "grey.png").write_bytes(fuzz_corpus._pil_bytes(fuzz_corpus.grey_of(cell), "PNG"))
    (slides / "P1" / "colour.png").write_bytes(fuzz_corpus._pil_bytes(
        np.broadcast_to(np.array(tinymodel.colour_for("monocyte"), np.uint8), (40, 40, 3)).copy(), "PNG"))
    db = tmp_path / "cache.sqlite"
    for night in ("a", "b"):
        r = run_cli(["run", slides, "--out", tmp_path / f"{night}.xlsx", "--model", model, "--workers", "0", "--cache", db])
        assert r.exit_code == 0, r.output
        cells = {c["File"]: c for c in sheet_rows(tmp_path / f"{night}.xlsx", "Cells")}
        assert cells["P1/grey.png"]["Review"] == "yes"
        assert cells["P1/grey.png"]["Review reason"].startswith(crop_checks.GREYSCALE_REASON)
        assert cells["P1/colour.png"]["Review"] == "no" and not cells["P1/colour.png"]["Review reason"]
        review = sheet_rows(tmp_path / f"{night}.xlsx", "Review")
        assert [c["File"] for c in review] == ["P1/grey.png"]
    assert "2 results reused" in str(sheet_rows(tmp_path / "b.xlsx", "Run"))
