"""Packed training sets (python -m train.packed) carry their preprocessing contract, and a
training run refuses one packed with another contract or size instead of training on it."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from batchwbc.engine import preprocess as pp
from batchwbc.inputs.public_datasets import DatasetError
from conftest import REPO


@pytest.fixture()
def split_csv(tmp_path, shared_data):
    rows = list(csv.DictReader(open(REPO / "docs" / "model" / "test-split.csv", newline="")))[:6]
    path = tmp_path / "split.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "split": "train"})
    return path, rows


@pytest.mark.parametrize("contract", [pp.PREPROCESSING_WHOLE, pp.PREPROCESSING_CELL])
def test_round_trip_keeps_contract_and_pixels(contract, split_csv, shared_data, tmp_path):
    from train import data, packed

    path, rows = split_csv
    assert packed.pack(shared_data, path, tmp_path / "p.npz", 32, 95, preprocessing=contract) == len(rows)
    loaded = data.load(tmp_path / "p.npz", 32, preprocessing=contract)
    assert loaded.images.shape == (len(rows), 32, 32, 3) and loaded.assigned_split == ["train"] * len(rows)
    direct = np.stack([pp.prepare_file(shared_data / r["path"], 32, preprocessing=contract) for r in rows])
    assert np.abs(loaded.images.astype(int) - direct).mean() < 4  # JPEG storage, same framing


def test_mismatched_contract_or_size_is_refused(split_csv, shared_data, tmp_path):
    from train import data, packed

    path, _ = split_csv
    packed.pack(shared_data, path, tmp_path / "p.npz", 32, 85, preprocessing=pp.PREPROCESSING_CELL)
    with pytest.raises(DatasetError, match="preprocessing"):
        data.load(tmp_path / "p.npz", 32, preprocessing=pp.PREPROCESSING_WHOLE)
    with pytest.raises(DatasetError, match="48"):
        data.load(tmp_path / "p.npz", 48, preprocessing=pp.PREPROCESSING_CELL)
