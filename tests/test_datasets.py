"""Dataset readers: the public layouts as published, and what they must refuse to guess."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from batchwbc.datasets import DatasetError, LMU_SOURCE, PBC_SOURCE, read_any

# Counts documented in ../shared/data/README.md for this subset.
EXPECTED = {
    ("basophil", PBC_SOURCE): 1035, ("eosinophil", PBC_SOURCE): 950, ("lymphocyte", PBC_SOURCE): 1025,
    ("monocyte", PBC_SOURCE): 950, ("neutrophil_segmented", PBC_SOURCE): 950,
    ("neutrophil_band", PBC_SOURCE): 950, ("promyelocyte", PBC_SOURCE): 507,
    ("myelocyte", PBC_SOURCE): 968, ("metamyelocyte", PBC_SOURCE): 870,
    ("erythroblast", PBC_SOURCE): 700, ("platelet", PBC_SOURCE): 500,
    ("myeloblast", LMU_SOURCE): 850, ("neutrophil_segmented", LMU_SOURCE): 400,
}


def test_shared_data_counts_per_class_and_source(shared_data):
    scan = read_any(shared_data)
    assert dict(scan.counts()) == EXPECTED
    assert scan.skipped[(PBC_SOURCE, "subtype not given (IG_)")] == 151
    assert scan.skipped[(PBC_SOURCE, "subtype not given (NEUTROPHIL_)")] == 50
    assert scan.skipped[(PBC_SOURCE, "hidden file")] == 1  # the stray malformed file


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 200, np.uint8))


def test_pbc_layout_prefixes_and_strays(tmp_path):
    root = tmp_path / "PBC_dataset_normal_DIB"
    _img(root / "ig" / "MMY_1.jpg")
    _img(root / "ig" / "MY_2.jpg")
    _img(root / "ig" / "PMY_3.jpg")
    _img(root / "ig" / "IG_4.jpg")  # unspecified subtype: skipped, not guessed
    _img(root / "ig" / "XYZ_5.jpg")  # unknown prefix
    _img(root / "ig" / "noprefix.jpg")  # malformed name
    _img(root / "neutrophil" / "BNE_6.jpg")
    _img(root / "neutrophil" / "SNE_7.jpg")
    (root / "neutrophil" / "notes.txt").write_text("x")
    (root / "neutrophil" / ".DS_Store").write_bytes(b"\0")
    scan = read_any(tmp_path)
    got = sorted((it.path.name, it.class_id) for it in scan.items)
    assert got == [("BNE_6.jpg", "neutrophil_band"), ("MMY_1.jpg", "metamyelocyte"), ("MY_2.jpg", "myelocyte"),
                   ("PMY_3.jpg", "promyelocyte"), ("SNE_7.jpg", "neutrophil_segmented")]
    assert sum(scan.skipped.values()) == 5


def test_lmu_layout_any_extension_and_unknown_codes(tmp_path):
    root = tmp_path / "AML-Cytomorphology_LMU"
    _img(root / "MYO" / "MYO_0001.tiff")
    _img(root / "NGB" / "NGB_0001.TIF")
    _img(root / "KSC" / "KSC_0001.tiff")  # smudge cell: not in the catalogue
    scan = read_any(root)
    assert sorted(it.class_id for it in scan.items) == ["myeloblast", "neutrophil_band"]
    assert {it.source for it in scan.items} == {LMU_SOURCE}
    assert sum(scan.skipped.values()) == 1


def test_generic_layout(tmp_path):
    _img(tmp_path / "lab" / "myeloblast" / "a" / "x.png")
    _img(tmp_path / "lab" / "not_a_class" / "y.png")
    scan = read_any(tmp_path / "lab")
    assert [(it.class_id, it.source) for it in scan.items] == [("myeloblast", "lab")]
    assert sum(scan.skipped.values()) == 1


def test_unknown_layout_is_one_sentence(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match="no labelled images in a known layout"):
        read_any(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        read_any(tmp_path / "missing")
