"""The labelled-folder layout read by `evaluate` and `adapt` (and written by `verify --export-labelled`)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from batchwbc.inputs.labelled_folders import LabelledError, read_labelled


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 200, np.uint8))


def test_patients_from_sub_folders_unknown_folders_counted(tmp_path):
    _img(tmp_path / "myeloblast" / "P1" / "a.jpg")
    _img(tmp_path / "myeloblast" / "P2" / "deep" / "b.png")
    _img(tmp_path / "lymphocyte" / "c.jpg")  # no patient folder
    _img(tmp_path / "plasma_cell" / "P1" / "d.jpg")  # not a class of the model
    (tmp_path / "labels.csv").write_text("patient,file\n")
    (tmp_path / "lymphocyte" / "notes.txt").write_text("x")
    got = read_labelled(tmp_path, ("myeloblast", "lymphocyte"))
    assert sorted((it.path.name, it.class_id, it.patient) for it in got.items) == [
        ("a.jpg", "myeloblast", "P1"), ("b.png", "myeloblast", "P2"), ("c.jpg", "lymphocyte", None)]
    assert got.unknown_folders == {"plasma_cell": 1}
    assert got.skipped == {"not an image file": 1}
    assert got.class_counts() == {"myeloblast": 2, "lymphocyte": 1}


def test_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(LabelledError, match="does not exist"):
        read_labelled(tmp_path / "nope", ("myeloblast",))
