"""Dataset readers: the public layouts as published, and what they must refuse to guess."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from batchwbc.inputs.public_datasets import DEEPAPL_SOURCE, DatasetError, LMU_SOURCE, PBC_SOURCE, read_any

# Counts documented in ../shared/data/README.md for this subset.
EXPECTED = {
    ("basophil", PBC_SOURCE): 500, ("eosinophil", PBC_SOURCE): 500, ("lymphocyte", PBC_SOURCE): 500,
    ("monocyte", PBC_SOURCE): 500, ("neutrophil_segmented", PBC_SOURCE): 950,
    ("neutrophil_band", PBC_SOURCE): 950, ("promyelocyte", PBC_SOURCE): 507,
    ("myelocyte", PBC_SOURCE): 968, ("metamyelocyte", PBC_SOURCE): 870,
    ("erythroblast", PBC_SOURCE): 450, ("platelet", PBC_SOURCE): 300,
    ("myeloblast", LMU_SOURCE): 850, ("neutrophil_segmented", LMU_SOURCE): 265,
    # DeepAPL: README counts after the label mapping of ADR 0008 (blast + promonocyte, lymphocyte +
    # variant, giant thrombocyte + aggregation); plasma cells (44) and one prolymphocyte are skipped.
    ("myeloblast", DEEPAPL_SOURCE): 1800 + 65, ("promyelocyte", DEEPAPL_SOURCE): 511,
    ("smudge", DEEPAPL_SOURCE): 500, ("lymphocyte", DEEPAPL_SOURCE): 450 + 229,
    ("neutrophil_segmented", DEEPAPL_SOURCE): 400, ("monocyte", DEEPAPL_SOURCE): 400,
    ("erythroblast", DEEPAPL_SOURCE): 292, ("myelocyte", DEEPAPL_SOURCE): 111,
    ("neutrophil_band", DEEPAPL_SOURCE): 105, ("eosinophil", DEEPAPL_SOURCE): 85,
    ("metamyelocyte", DEEPAPL_SOURCE): 63, ("basophil", DEEPAPL_SOURCE): 39,
    ("platelet", DEEPAPL_SOURCE): 40 + 18,
}


def test_shared_data_counts_per_class_and_source(shared_data):
    scan = read_any(shared_data)
    assert dict(scan.counts()) == EXPECTED
    assert scan.skipped[(PBC_SOURCE, "subtype not given (IG_)")] == 151
    assert scan.skipped[(PBC_SOURCE, "subtype not given (NEUTROPHIL_)")] == 50
    assert scan.skipped[(PBC_SOURCE, "hidden file")] == 1  # the stray malformed file
    assert scan.skipped[(DEEPAPL_SOURCE, "label Plasma cells not in the catalogue")] == 44
    deepapl = [it for it in scan.items if it.source == DEEPAPL_SOURCE]
    assert len({it.patient for it in deepapl}) == 82
    assert all(it.patient is None for it in scan.items if it.source != DEEPAPL_SOURCE)


def test_deepapl_layout_keeps_patient_and_counts_unknown_labels(tmp_path):
    root = tmp_path / "DeepAPL"
    (root).mkdir()
    (root / "master.csv").write_text("Patient_ID,Diagnosis\nPatient_00,APL\n")
    signed = root / "All" / "Patient_00" / "Signed slides"
    _img(signed / "Blast, no lineage spec" / "BL_1.jpg")
    _img(signed / "Smudge cells" / "SMU_2.jpg")
    _img(root / "All" / "Patient_01" / "10026" / "Signed slides" / "Promonocyte" / "PMO_3.jpg")  # slide sub-folder
    _img(signed / "Plasma cells" / "PC_4.jpg")  # outside the catalogue: skipped, counted
    _img(signed / "Mystery cells" / "X_5.jpg")  # unknown label: skipped, never guessed
    _img(root / "All" / "Patient_00" / "loose.jpg")  # not in a label folder
    scan = read_any(tmp_path)
    got = sorted((it.path.name, it.class_id, it.patient) for it in scan.items)
    assert got == [("BL_1.jpg", "myeloblast", "Patient_00"), ("PMO_3.jpg", "myeloblast", "Patient_01"),
                   ("SMU_2.jpg", "smudge", "Patient_00")]
    assert scan.skipped[(DEEPAPL_SOURCE, "unknown label Mystery cells")] == 1
    assert scan.skipped[(DEEPAPL_SOURCE, "label Plasma cells not in the catalogue")] == 1
    assert scan.skipped[(DEEPAPL_SOURCE, "not inside a Signed slides label folder")] == 1


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
