"""train.robustness reports every source, the third one included (issue 11), and recolours each
source's crops in another source's stain, none left out."""
from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from tests import tinymodel  # noqa: E402
from train import robustness  # noqa: E402

SOURCES = ("AML-LMU", "DeepAPL", "PBC")
CLASSES = ("lymphocyte", "monocyte")


def test_next_source_is_cyclic_and_never_itself():
    assert [robustness._next_source(list(SOURCES), s) for s in SOURCES] == ["DeepAPL", "PBC", "AML-LMU"]
    assert robustness._next_source(["PBC"], "PBC") == "PBC"


def test_accuracy_is_reported_per_source(tmp_path):
    model = tinymodel.build(tmp_path / "tiny.onnx")
    rows = []
    for s in SOURCES:
        for c in CLASSES:
            for i in range(2):
                rel = f"{s}/{c}_{i}.png"
                (tmp_path / s).mkdir(exist_ok=True)
                img = np.zeros((48, 48, 3), np.uint8)
                img[:] = tinymodel.colour_for(c)
                cv2.imwrite(str(tmp_path / rel), img[..., ::-1])
                rows.append({"path": rel, "class_id": c, "source": s, "split": "test"})
    res = robustness.evaluate(str(model), tmp_path, rows,
                              conditions=(("as exported", 1.0, None, 0.0), ("colour of the other source", 1.0, None, 0.0, True)))
    plain = res[0]
    assert set(plain["paper10_accuracy_by_source"]) == set(SOURCES)
    assert all(v == pytest.approx(plain["paper10_accuracy"]) for v in plain["paper10_accuracy_by_source"].values())
    assert res[1]["recoloured"] and set(res[1]["paper10_accuracy_by_source"]) == set(SOURCES)
