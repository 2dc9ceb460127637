"""train.evalkit: the one place evaluations pick split rows, decode them and predict in batches."""
from __future__ import annotations

import numpy as np
import pytest

from batchwbc.core import catalogue
from batchwbc.engine import preprocess as pp
from conftest import REPO
from train import evalkit

TEST_SPLIT = REPO / "docs" / "model" / "test-split.csv"


def test_split_rows_selects_one_or_several_splits(tmp_path):
    from train.split import write_split_csv

    write_split_csv(tmp_path / "s.csv", [("a", "basophil", "X", "train"), ("b", "monocyte", "X", "val"),
                                         ("c", "smudge", "Y", "test"), ("d", "basophil", "Y", "val")])
    assert [r["path"] for r in evalkit.split_rows(tmp_path / "s.csv", "val")] == ["b", "d"]
    assert [r["path"] for r in evalkit.split_rows(tmp_path / "s.csv", ("train", "test"))] == ["a", "c"]
    rows = evalkit.split_rows(tmp_path / "s.csv", ("train", "val", "test"))
    assert list(evalkit.labels(rows)) == [catalogue.CLASS_IDS.index(c) for c in ("basophil", "monocyte", "smudge", "basophil")]
    assert list(evalkit.labels(rows[:2], classes=["monocyte", "basophil"])) == [1, 0]


def test_decoding_is_the_runtimes_and_the_margin_is_passed_through(shared_data):
    rows = evalkit.split_rows(TEST_SPLIT, "test")[:5]
    x, y = evalkit.decode_rows(shared_data, rows, 32, pp.PREPROCESSING_CELL)
    runtime = np.stack([pp.prepare_file(shared_data / r["path"], 32, preprocessing=pp.PREPROCESSING_CELL) for r in rows])
    assert x.dtype == np.uint8 and np.array_equal(x, runtime)
    assert list(y) == [catalogue.CLASS_IDS.index(r["class_id"]) for r in rows]
    assert np.array_equal(evalkit.frame(evalkit.decode_raw(shared_data, rows), 32, pp.PREPROCESSING_CELL), x)
    narrow, _ = evalkit.decode_rows(shared_data, rows, 32, pp.PREPROCESSING_CELL, margin=1.4)
    assert not np.array_equal(narrow, x)  # the margin experiment really decodes at another margin
    assert pp.CELL_MARGIN == 1.8


class _Session:
    """Looks like an onnxruntime InferenceSession; records its batch sizes."""

    def __init__(self):
        self.batches = []

    def get_inputs(self):
        return [type("I", (), {"name": "image"})()]

    def run(self, outputs, feeds):
        b = feeds["image"]
        self.batches.append(len(b))
        return [b.reshape(len(b), -1)[:, :2].astype(np.float32)]


class _Classifier:
    info = object()

    def __init__(self):
        self.batches = []

    def predict(self, b):
        self.batches.append(len(b))
        return b.reshape(len(b), -1)[:, :2].astype(np.float32)


class _Keras:
    def predict(self, x, batch_size, verbose):
        assert x.dtype == np.float32 and verbose == 0
        self.batch_size = batch_size
        return x.reshape(len(x), -1)[:, :2]


@pytest.mark.parametrize("model", [_Session(), _Classifier(), _Keras()])
def test_predict_batches_any_model_and_keeps_the_order(model):
    x = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    out = evalkit.predict(model, x, 4)
    assert np.array_equal(out, x.reshape(10, -1)[:, :2].astype(np.float32))
    if isinstance(model, _Keras):
        assert model.batch_size == 4
    else:
        assert model.batches == [4, 4, 2]
