"""train.evaluate: a split's metric artefacts, each written by a function of its own (issue 20)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from batchwbc.core import catalogue  # noqa: E402


def test_per_source_metrics_counts_each_lab_apart():
    from train.evaluate import per_source_metrics

    ids = ["a", "b", "c"]
    labels = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    got = per_source_metrics(pred, labels, ["x", "x", "x", "y", "y"], ids)
    assert got["x"] == {"n": 3, "accuracy": pytest.approx(2 / 3),
                        "per_class": {"a": {"n": 2, "recall": 0.5}, "b": {"n": 1, "recall": 1.0}},
                        "predicted": {"a": 1, "b": 2}}
    assert got["y"]["accuracy"] == 0.5 and got["y"]["per_class"]["c"] == {"n": 1, "recall": 0.0}


def test_write_artifacts_writes_every_file_and_returns_the_metrics_json(tmp_path):
    from train.evaluate import write_artifacts

    k = len(catalogue.CLASS_IDS)
    rng = np.random.default_rng(0)
    labels = np.arange(60) % k
    logits = rng.normal(size=(60, k)) + 3 * np.eye(k)[labels] * (rng.random(60) > 0.3)[:, None]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sources = ["PBC" if i % 2 else "LMU" for i in range(60)]
    result = write_artifacts(tmp_path, "test", probs, labels, sources)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {f"test_{n}" for n in ("classification_report.txt", "confusion_matrix.csv", "confusion_matrix.png",
                                           "roc.png", "reliability.png", "metrics.json")}
    assert json.loads((tmp_path / "test_metrics.json").read_text()) == json.loads(json.dumps(result))
    pred = probs.argmax(axis=1)
    assert result["summary"]["accuracy"] == pytest.approx((pred == labels).mean())
    assert set(result) == {"summary", "classification_report", "auc", "ece", "reliability_bins", "per_source"}
    assert set(result["auc"]) == set(catalogue.CLASS_IDS) and set(result["per_source"]) == {"PBC", "LMU"}
    rows = (tmp_path / "test_confusion_matrix.csv").read_text().splitlines()
    assert rows[0] == "true\\pred," + ",".join(catalogue.CLASS_IDS) and len(rows) == k + 1
    assert sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 60
