"""The bundled model meets its promised accuracy on its own held-out test split, measured
through the runtime (onnxruntime + the shared preprocessing), and its metadata tells the truth."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from batchwbc.core import catalogue
from batchwbc.engine.model import DEFAULT_MODEL_PATH, Classifier
from batchwbc.engine.preprocess import prepare_file
from conftest import REPO

TEST_SPLIT = REPO / "docs" / "model" / "test-split.csv"  # the home test cells (PBC + Munich), v4's split
TEST_SPLIT_OWN = REPO / "docs" / "model" / "test-split-wbc13.csv"  # the bundled model's own test rows (home + 14 DeepAPL patients)


@pytest.fixture(scope="module")
def predictions(shared_data):
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.fail("the bundled model batchwbc/models/batchwbc-wbc13.onnx is missing")
    with open(TEST_SPLIT, newline="") as fh:
        rows = list(csv.DictReader(fh))
    clf = Classifier(DEFAULT_MODEL_PATH)
    s = clf.info.input_size
    x = np.stack([prepare_file(shared_data / r["path"], s, preprocessing=clf.info.preprocessing) for r in rows])
    probs = np.concatenate([clf.predict(x[i : i + 64]) for i in range(0, len(x), 64)])
    y = np.array([clf.info.classes.index(r["class_id"]) for r in rows])
    return clf, probs, y, rows


def _paper_metrics(clf, probs, y) -> tuple[float, float, int]:
    from sklearn.metrics import f1_score

    pred = probs.argmax(1)
    paper = [clf.info.classes.index(c) for c in catalogue.PAPER_CLASS_IDS]
    m = np.isin(y, paper)
    return float((pred[m] == y[m]).mean()), float(f1_score(y[m], pred[m], labels=paper, average="macro")), int(m.sum())


def test_beats_the_paper_on_its_ten_classes(predictions):
    """The paper (ResNet50): accuracy 0.9027, macro-F1 0.88; the project's F1 target is 0.90."""
    acc, f1, n = _paper_metrics(*predictions[:3])
    assert n > 500
    assert acc > 0.9027, acc
    assert f1 >= 0.90, f1


@pytest.mark.xfail(
    strict=True,
    reason="model v4 (MobileNet 0.25, cell-centred 144 px, trained on this 2-core CPU) measures 0.909 "
    "accuracy on the paper's ten classes: the 0.93 accuracy target is not met yet - see "
    "docs/decisions/0004 to 0007. Strict: a model that meets it makes this fail until the marker is removed.",
)
def test_meets_the_accuracy_target_on_the_ten_classes(predictions):
    acc, _, _ = _paper_metrics(*predictions[:3])
    assert acc >= 0.93, acc


def test_no_regression_below_the_bundled_level(predictions):
    """Guard the measured level (v4 0.909 / 0.904, v3 0.908 / 0.903, v2 0.913 / 0.909) so a worse model can never be
    bundled silently."""
    acc, f1, _ = _paper_metrics(*predictions[:3])
    assert acc >= 0.905, acc
    assert f1 >= 0.90, f1


def _robustness(shared_data, *conditions) -> dict[str, dict]:
    """The bundled model's train.robustness results on the committed test rows, by condition."""
    from train.robustness import evaluate

    with open(TEST_SPLIT, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["condition"]: r for r in evaluate(None, shared_data, rows, conditions=conditions)}


def test_robust_to_a_lower_quality_analyzer(shared_data):
    """Another hospital's analyzer may export smaller, more compressed JPEGs. Model v2 fell to
    0.80 / 0.64 on the paper's classes at 1/2 size + JPEG q75 / 1/3 size + q50; v3 measures
    0.878 / 0.811, v4 0.888 / 0.872 (train.robustness, ADR 0006 and 0007)."""
    res = _robustness(shared_data, ("1/2 size + JPEG q75", 0.5, 75, 0.0), ("1/3 size + JPEG q50", 0.35, 50, 0.0))
    assert res["1/2 size + JPEG q75"]["paper10_accuracy"] >= 0.86, res
    assert res["1/3 size + JPEG q50"]["paper10_accuracy"] >= 0.78, res


def test_robust_to_a_slightly_defocused_or_low_resolution_scan(shared_data):
    """A slide scanned slightly out of focus, or an analyzer with a quarter of the pixels: v3 fell
    to 0.838 / 0.839 on the paper's classes at defocus sigma 2 px / 1/4 size; v4 measures 0.890 /
    0.894 (train.robustness, ADR 0007)."""
    res = _robustness(shared_data, ("defocus 2 px", 1.0, None, 2.0), ("1/4 size", 0.25, None, 0.0))
    assert res["defocus 2 px"]["paper10_accuracy"] >= 0.87, res
    assert res["1/4 size"]["paper10_accuracy"] >= 0.87, res


def test_blasts_are_recognised_at_another_scanners_magnification(predictions, shared_data):
    """Every training blast came from the Munich scanner. Shown at the Barcelona magnification
    (the probe of train/probe.py), v1 lost 25-56 % of them; the model must not rely on scale."""
    from batchwbc.engine.preprocess import decode_rgb, read_bytes, to_model_input
    from train.rescale import zoom_out

    clf, _, _, rows = predictions
    blasts = [r for r in rows if r["class_id"] == "myeloblast"]
    assert len(blasts) > 50
    k = clf.info.classes.index("myeloblast")
    s = clf.info.input_size
    for mode in ("background", "reflect"):
        x = np.stack([to_model_input(zoom_out(decode_rgb(read_bytes(shared_data / r["path"])), 0.62, mode), s,
                                     clf.info.preprocessing) for r in blasts])
        recall = float((clf.predict(x).argmax(1) == k).mean())
        assert recall >= 0.9, (mode, recall)


def test_few_non_blasts_are_called_blasts(predictions):
    clf, probs, y, _ = predictions
    k = clf.info.classes.index("myeloblast")
    assert ((probs.argmax(1) == k) & (y != k)).sum() <= 0.005 * (y != k).sum()


def test_metadata_metrics_match_a_fresh_measurement(shared_data):
    """The metadata's test metrics are the export's measurement on the model's own held-out test
    split (the three-source split, home and DeepAPL test patients); measured again here."""
    clf = Classifier(DEFAULT_MODEL_PATH)
    with open(TEST_SPLIT_OWN, newline="") as fh:
        rows = list(csv.DictReader(fh))
    s = clf.info.input_size
    x = np.stack([prepare_file(shared_data / r["path"], s, preprocessing=clf.info.preprocessing) for r in rows])
    probs = np.concatenate([clf.predict(x[i : i + 64]) for i in range(0, len(x), 64)])
    y = np.array([clf.info.classes.index(r["class_id"]) for r in rows])
    claimed = clf.info.json_field("batchwbc.test_metrics")
    assert claimed["n"] == len(y)
    assert abs(claimed["accuracy"] - float((probs.argmax(1) == y).mean())) < 1e-3


def test_probabilities_are_calibrated_enough(predictions):
    _, probs, y, _ = predictions
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    bins = np.linspace(0, 1, 11)
    ece = sum(abs(correct[(conf > lo) & (conf <= hi)].mean() - conf[(conf > lo) & (conf <= hi)].mean())
              * ((conf > lo) & (conf <= hi)).mean() for lo, hi in zip(bins[:-1], bins[1:]) if ((conf > lo) & (conf <= hi)).any())
    assert ece < 0.05, ece


def test_review_threshold_keeps_accepted_cells_accurate(predictions):
    clf, probs, y, _ = predictions
    t = clf.info.review_threshold
    accepted = probs.max(1) >= t
    assert accepted.mean() > 0.5  # most cells are not sent to review
    assert (probs.argmax(1) == y)[accepted].mean() >= 0.95


def test_colour_of_the_other_source_costs_a_bounded_amount(shared_data):
    """Each test crop recoloured to the other source's Lab statistics (another stain): v4 keeps
    0.856 on the paper's classes (v3 0.881; ADR 0007). A floor, so a model that leans harder on
    colour cannot be bundled silently."""
    res = _robustness(shared_data, ("colour of the other source", 1.0, None, 0.0, True))["colour of the other source"]
    assert res["recoloured"] and res["paper10_accuracy"] >= 0.83, res
