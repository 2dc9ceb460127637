"""The decode/classify pipeline with the tiny colour model: right answers, in order, and
bad files, vanished files and dying workers never cost the other results."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import tinymodel
from batchwbc.engine import pipeline
from batchwbc.engine import preprocess as pp
from batchwbc.inputs.slide_folders import discover
from batchwbc.engine.model import Classifier
from batchwbc.core.records import THUMBNAIL_PX
from batchwbc.engine.pipeline import CRASH_REASON, Pipeline, decode_one, make_thumbnail, top_two

CRASH_MARKER = "crashme"


def crash_on_marker(path: str, size: int, preprocessing: str | None = None):
    """A decode function that kills its worker process on marked files, as a segfaulting
    decoder would (module level, so spawned workers can import it)."""
    if CRASH_MARKER in os.path.basename(path):
        os._exit(11)
    return decode_one(path, size, preprocessing)


def write_crop(path: Path, class_id: str, shape=(40, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((*shape, 3), np.uint8)
    img[:] = tinymodel.colour_for(class_id)[::-1]  # BGR for cv2
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return Classifier(tinymodel.build(tmp_path_factory.mktemp("m") / "tiny.onnx"), threads=1)


@pytest.fixture()
def slides(tmp_path):
    plan = {
        "P1": ["lymphocyte", "myeloblast", "lymphocyte", "neutrophil_segmented"],
        "P2": ["basophil"] * 3 + ["platelet"],
    }
    truth = {}
    for p, classes in plan.items():
        for i, c in enumerate(classes):
            rel = f"{p}/{'sub/' if i % 2 else ''}c{i}.png"
            write_crop(tmp_path / rel, c)
            truth[rel] = c
    (tmp_path / "P2" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return tmp_path, truth


def run(clf, root, **kw):
    found = discover(root)
    kw.setdefault("workers", 0)
    return Pipeline(clf.info.input_size, clf, kw.pop("review_threshold", 0.6), **kw).run(found.crops), found


def test_classifies_every_crop_in_discovery_order(clf, slides):
    root, truth = slides
    out, found = run(clf, root)
    assert {c.file: c.class_id for c in out.cells} == truth
    assert [c.file for c in out.cells] == [c.rel for c in found.crops if c.rel in truth]
    assert all(c.confidence > 0.9 and not c.review and c.thumbnail_jpeg is None for c in out.cells)
    assert [(e.patient, e.file) for e in out.errors] == [("P2", "P2/broken.jpg")]
    assert out.errors[0].reason  # a human sentence from preprocess
    assert out.decoded == len(truth)


def test_worker_processes_give_the_same_result_as_in_process(clf, slides):
    root, _ = slides
    a, _ = run(clf, root, workers=0)
    b, _ = run(clf, root, workers=2, batch_size=3)
    assert a.cells == b.cells and a.errors == b.errors


def test_review_cells_get_top2_and_a_jpeg_thumbnail(clf, tmp_path):
    # Half lymphocyte colour, half myeloblast colour: the model is unsure between the two.
    a, b = tinymodel.colour_for("lymphocyte"), tinymodel.colour_for("myeloblast")
    mixed = tuple((x + y) // 2 for x, y in zip(a, b))
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = mixed[::-1]
    (tmp_path / "P").mkdir()
    cv2.imwrite(str(tmp_path / "P" / "unsure.png"), img)
    write_crop(tmp_path / "P" / "sure.png", "eosinophil")
    out, _ = run(clf, tmp_path, review_threshold=0.9)
    cells = {Path(c.file).name: c for c in out.cells}
    unsure, sure = cells["unsure.png"], cells["sure.png"]
    assert unsure.review and unsure.confidence < 0.9
    assert unsure.class_id != unsure.second_class
    assert {unsure.class_id, unsure.second_class} <= set(clf.info.classes)
    assert unsure.confidence >= unsure.second_prob > 0
    thumb = cv2.imdecode(np.frombuffer(unsure.thumbnail_jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert unsure.thumbnail_jpeg[:3] == b"\xff\xd8\xff"  # JPEG
    assert thumb.shape == (THUMBNAIL_PX, THUMBNAIL_PX, 3)
    assert not sure.review and sure.thumbnail_jpeg is None


def test_file_deleted_after_discovery_becomes_an_error_row(clf, slides):
    root, truth = slides
    found = discover(root)
    victim = next(c for c in found.crops if c.rel == "P1/c0.png")
    os.unlink(victim.path)
    out = Pipeline(clf.info.input_size, clf, 0.6, workers=0).run(found.crops)
    assert "P1/c0.png" in {e.file for e in out.errors}
    assert "disappeared" in next(e.reason for e in out.errors if e.file == "P1/c0.png")
    assert len(out.cells) == len(truth) - 1


@pytest.mark.skipif(os.name != "posix", reason="replacing a file by a FIFO needs POSIX")
def test_file_replaced_by_fifo_after_discovery_does_not_hang(clf, slides):
    root, _ = slides
    found = discover(root)
    victim = next(c for c in found.crops if c.rel == "P2/c0.png")
    os.unlink(victim.path)
    os.mkfifo(victim.path)
    out = Pipeline(clf.info.input_size, clf, 0.6, workers=0).run(found.crops)
    assert ("P2/c0.png", "not a regular file") in {(e.file, e.reason) for e in out.errors}


def test_a_crashing_worker_costs_only_its_file(clf, slides):
    root, truth = slides
    write_crop(root / "P1" / f"{CRASH_MARKER}.png", "monocyte")
    found = discover(root)
    out = Pipeline(clf.info.input_size, clf, 0.6, workers=2, decode=crash_on_marker).run(found.crops)
    assert {c.file: c.class_id for c in out.cells} == truth
    crashed = [e for e in out.errors if e.reason == CRASH_REASON]
    assert [e.file for e in crashed] == [f"P1/{CRASH_MARKER}.png"]
    assert out.pool_restarts >= 1


def test_decode_only_mode_runs_no_model(slides):
    root, truth = slides
    found = discover(root)
    seen = []
    out = Pipeline(32, None, workers=0, progress=seen.append).run(found.crops)
    assert out.cells == [] and out.decoded == len(truth) and len(out.errors) == 1
    assert sum(seen) == len(found.crops)


def test_progress_counts_every_file_once(clf, slides):
    root, _ = slides
    found = discover(root)
    seen: list[int] = []
    p = Pipeline(clf.info.input_size, clf, 0.6, workers=2, batch_size=2, progress=seen.append)
    p.run(found.crops)
    assert sum(seen) == p.done == len(found.crops)


def test_cache_reproduces_a_full_run_and_recomputes_review_thumbnails(clf, slides, tmp_path_factory):
    cache_mod = pytest.importorskip("batchwbc.engine.result_cache")
    root, _ = slides
    a, b = tinymodel.colour_for("lymphocyte"), tinymodel.colour_for("myeloblast")
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = tuple((x + y) // 2 for x, y in zip(a, b))[::-1]
    cv2.imwrite(str(root / "P1" / "unsure.png"), img)
    db = tmp_path_factory.mktemp("cache") / "c.sqlite"
    found = discover(root)
    full_low = Pipeline(clf.info.input_size, clf, 0.3, workers=0).run(found.crops)
    full_high = Pipeline(clf.info.input_size, clf, 0.95, workers=0).run(found.crops)
    with cache_mod.ResultCache(db, clf.info.sha256) as cache:
        first = Pipeline(clf.info.input_size, clf, 0.3, workers=0, cache=cache).run(found.crops)
    with cache_mod.ResultCache(db, clf.info.sha256) as cache:
        second = Pipeline(clf.info.input_size, clf, 0.3, workers=0, cache=cache).run(found.crops)
    with cache_mod.ResultCache(db, clf.info.sha256) as cache:
        third = Pipeline(clf.info.input_size, clf, 0.95, workers=0, cache=cache).run(found.crops)
    assert first.cells == full_low.cells and second.cells == full_low.cells
    assert second.cached == len(full_low.cells) and second.decoded == 0
    assert first.errors == second.errors == full_low.errors
    # A higher threshold makes the unsure cell a review cell, which needs its thumbnail.
    assert third.cells == full_high.cells
    assert any(c.review and c.thumbnail_jpeg for c in third.cells)


def test_top_two_and_thumbnail_helpers():
    probs = np.array([0.1, 0.6, 0.3], np.float32)
    assert top_two(probs, ("a", "b", "c")) == ("b", pytest.approx(0.6), "c", pytest.approx(0.3))
    assert top_two(np.array([1.0], np.float32), ("a",)) == ("a", 1.0, "", 0.0)
    png = make_thumbnail(np.full((224, 224, 3), 200, np.uint8), 64)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)


def test_batch_size_must_be_positive(clf):
    with pytest.raises(ValueError):
        Pipeline(clf.info.input_size, clf, batch_size=0)


def test_thumbnail_cap_is_shared_fairly_lowest_confidence_first(clf, tmp_path):
    """max_thumbnails is shared across patients (P1 3 review cells, P2 4, cap 5: 3 + 2, the
    spare slot to the earlier patient), lowest confidence first within each patient, whatever
    order the cells finish in."""
    a, b = np.array(tinymodel.colour_for("lymphocyte")), np.array(tinymodel.colour_for("myeloblast"))
    for p, fractions in (("P1", (0.40, 0.45, 0.35)), ("P2", (0.42, 0.30, 0.48, 0.38))):
        for i, t in enumerate(fractions):
            img = np.zeros((40, 40, 3), np.uint8)
            img[:] = (a * t + b * (1 - t)).astype(np.uint8)[::-1]
            (tmp_path / p).mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / p / f"c{i}.png"), img)
    found = discover(tmp_path)
    full = Pipeline(clf.info.input_size, clf, 1.0, workers=0).run(found.crops)
    assert all(c.review and c.thumbnail_jpeg for c in full.cells)
    by_conf = {p: sorted((c for c in full.cells if c.patient == p), key=lambda c: c.confidence) for p in ("P1", "P2")}
    expected = {c.file for c in by_conf["P1"][:3] + by_conf["P2"][:2]}
    for workers in (0, 2):
        capped = Pipeline(clf.info.input_size, clf, 1.0, workers=workers, batch_size=2, max_thumbnails=5).run(found.crops)
        assert {c.file for c in capped.cells if c.thumbnail_jpeg} == expected
        assert [c.file for c in capped.cells] == [c.file for c in full.cells]


SEEN_PREPROCESSING: list = []


def record_preprocessing(path: str, size: int, preprocessing: str | None = None):
    SEEN_PREPROCESSING.append(preprocessing)
    return decode_one(path, size, preprocessing)


@pytest.mark.parametrize("contract", [pp.PREPROCESSING_WHOLE, pp.PREPROCESSING_CELL])
def test_crops_are_prepared_the_way_the_model_was_trained(contract, slides, tmp_path_factory):
    """A v1 (whole-crop) model keeps working after v2 became the training default."""
    from batchwbc.engine import model as bm

    m = Classifier(tinymodel.build(tmp_path_factory.mktemp("m") / "t.onnx", metadata={bm.KEY_PREPROCESSING: contract}))
    assert m.info.preprocessing == contract
    root, truth = slides
    SEEN_PREPROCESSING.clear()
    out, _ = run(m, root, decode=record_preprocessing)
    assert len(out.cells) == len(truth)
    assert SEEN_PREPROCESSING and set(SEEN_PREPROCESSING) == {contract}
