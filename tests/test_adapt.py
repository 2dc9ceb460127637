"""`batchwbc adapt`: the embedding output, the head refit, the written model and its guards.

The tiny colour model (tests/tinymodel.py) predicts a class from a crop's mean colour and its
embedding is that mean colour, so a lab whose stain "swaps" two classes' colours is a known
distribution shift that a refitted last layer can and must undo.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc.adaptation import head_fit
from batchwbc.cli import main
from batchwbc.engine.model import Classifier
from batchwbc.engine.onnx_graph import (KEY_EMBEDDING_DIM, KEY_EMBEDDING_OUTPUT, GraphError, add_embedding_output,
                                find_head, head_parameters, replace_head)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("lymphocyte", "monocyte", "eosinophil", "neutrophil_segmented")


def tiny_with_embedding(tmp_path: Path, sharpness: float = 10.0) -> Path:
    plain = tinymodel.build(tmp_path / "tiny-plain.onnx", sharpness=sharpness)
    path = tmp_path / "tiny.onnx"
    onnx.save(add_embedding_output(onnx.load(str(plain))), str(path))
    return path


def write_crop(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(colour[::-1], float) + rng.normal(0, 6, (40, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def labelled_folder(root: Path, shown_as: dict[str, str], patients=("P1", "P2", "P3"), per=5,
                    patient_shown_as: dict[str, dict[str, str]] | None = None) -> Path:
    """root/<class>/<patient>/cNN.png, each crop painted in the colour of class shown_as[class]."""
    seed = 0
    for patient in patients:
        mapping = (patient_shown_as or {}).get(patient, shown_as)
        for cls, look in mapping.items():
            for i in range(per):
                seed += 1
                write_crop(root / cls / patient / f"c{i:02d}.png", tinymodel.colour_for(look), seed)
    return root


SWAPPED = {"lymphocyte": "monocyte", "monocyte": "lymphocyte", "eosinophil": "eosinophil",
           "neutrophil_segmented": "neutrophil_segmented"}


# ---------------------------------------------------------------------------------------
# Graph surgery
# ---------------------------------------------------------------------------------------

def test_embedding_output_keeps_probabilities_and_returns_the_layer_input(tmp_path):
    plain = tinymodel.build(tmp_path / "plain.onnx")
    path = tiny_with_embedding(tmp_path, sharpness=40.0)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[KEY_EMBEDDING_OUTPUT] == "embedding" and meta[KEY_EMBEDDING_DIM] == "3"
    assert [o.name for o in model.graph.output] == ["probs", "embedding"]
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    before = Classifier(plain).predict(batch)
    clf = Classifier(path)
    probs, emb = clf.predict_with_embedding(batch)
    assert np.array_equal(clf.predict(batch), before) and np.array_equal(probs, before)
    np.testing.assert_allclose(emb, batch.reshape(5, -1, 3).mean(axis=1) / 255.0, rtol=1e-5)
    # idempotent: a second pass changes nothing
    assert add_embedding_output(model).SerializeToString() == model.SerializeToString()


def test_bundled_model_has_an_embedding_output():
    clf = Classifier()
    assert clf.embedding_output == "embedding"
    head = find_head(onnx.load(str(clf.info.path)))
    assert head.dim == int(clf.info.metadata[KEY_EMBEDDING_DIM]) and head.classes == len(clf.info.classes)
    w, b, t = head_parameters(onnx.load(str(clf.info.path)))
    assert t == pytest.approx(clf.info.temperature, rel=1e-5)


def test_replace_head_computes_the_new_layer_with_temperature(tmp_path):
    path = tiny_with_embedding(tmp_path)
    w, b, t = head_parameters(onnx.load(str(path)))
    assert t == 1.0  # the tiny model has no temperature node; replace_head must add one
    rng = np.random.default_rng(1)
    w2, b2 = rng.normal(size=w.shape), rng.normal(size=b.shape)
    new = replace_head(onnx.load(str(path)), w2, b2, 2.5, {"batchwbc.model_version": "x"})
    out = tmp_path / "new.onnx"
    onnx.save(new, str(out))
    batch = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probs, emb = Classifier(out).predict_with_embedding(batch)
    np.testing.assert_allclose(probs, head_fit.softmax((emb @ w2 + b2) / 2.5), atol=1e-5)
    got_w, got_b, got_t = head_parameters(new)
    np.testing.assert_allclose(got_w, w2, rtol=1e-6) and np.testing.assert_allclose(got_b, b2, rtol=1e-6)
    assert got_t == pytest.approx(2.5)
    # again, now through the existing temperature node
    again = replace_head(new, w, b, 0.5)
    assert head_parameters(again)[2] == pytest.approx(0.5) and len(again.graph.node) == len(new.graph.node)


def test_find_head_refuses_a_graph_without_a_dense_last_layer(tmp_path):
    model = onnx.load(str(tinymodel.build(tmp_path / "t.onnx")))
    model.graph.node[3].op_type = "Add"  # MatMul -> Add: no dense layer before the softmax any more
    with pytest.raises(GraphError, match="not a dense"):
        find_head(model)


def test_export_embedding_cli_adds_the_output(tmp_path):
    plain = tinymodel.build(tmp_path / "plain.onnx")
    out = tmp_path / "with.onnx"
    r = subprocess.run([sys.executable, "-m", "export.embedding", str(plain), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Classifier(out).embedding_output == "embedding"


# ---------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------

def test_fit_head_without_data_pressure_is_the_original_and_untouched_columns_stay():
    rng = np.random.default_rng(0)
    v0, c0 = rng.normal(size=(6, 4)), rng.normal(size=4)
    x = rng.normal(size=(40, 6))
    y = rng.integers(0, 2, 40)  # only classes 0 and 1 are labelled
    v, c = head_fit.fit_head(x, y, v0, c0, alpha=1e9)
    np.testing.assert_allclose(v, v0, atol=1e-6)
    v, c = head_fit.fit_head(x, y, v0, c0, alpha=0.1)
    assert np.abs(v[:, :2] - v0[:, :2]).max() > 1e-2
    np.testing.assert_array_equal(v[:, 2:], v0[:, 2:])
    np.testing.assert_array_equal(c[2:], c0[2:])


def test_grouped_folds_keep_a_patient_together_and_fall_back_to_stratified():
    y = np.array([0, 1] * 12)
    groups = [f"P{i % 4}" for i in range(24)]
    folds, scheme = head_fit.fold_ids(y, groups, k=5)
    assert "patient" in scheme and len(set(folds)) == 4
    for g in set(groups):
        assert len({f for f, gg in zip(folds, groups) if gg == g}) == 1
    folds, scheme = head_fit.fold_ids(y, [None] * 24, k=5)
    assert "stratified" in scheme
    for f in set(folds):
        assert set(y[folds == f]) == {0, 1}


def test_review_threshold_rule():
    probs = np.array([[0.99, 0.01], [0.95, 0.05], [0.9, 0.1], [0.6, 0.4]])
    y = np.array([0, 0, 1, 0])  # the 0.9 cell is wrong
    assert head_fit.review_threshold(probs, y, 0.97) == 0.95
    assert head_fit.review_threshold(probs, y, 0.5) == 0.6


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def _adapt(*args):
    return CliRunner().invoke(main, ["adapt", *map(str, args), "--workers", "0"])


def test_adapt_fixes_a_stain_shift_and_the_model_round_trips_through_run_and_info(tmp_path):
    model = tiny_with_embedding(tmp_path)
    lab = labelled_folder(tmp_path / "lab", SWAPPED)
    write_crop(lab / "plasma_cell" / "P1" / "x.png", (10, 10, 10), 99)  # not a class of the model
    (lab / "labels.csv").write_text("patient,file,class\n")  # written by verify --export-labelled; not a crop
    out = tmp_path / "LAB.onnx"
    r = _adapt(lab, "--out", out, "--model", model)
    assert r.exit_code == 0, r.output
    assert "plasma_cell" in r.output and "1 images skipped" in r.output
    assert "grouped by patient (3 patients)" in r.output
    assert "original  accuracy 0.500" in r.output
    # issue 19: the next step, with the command ready to paste
    assert f"batchwbc evaluate OTHER_PATIENTS_LABELLED --model {out} --out" in r.output
    assert "patients it was not fitted on" in r.output

    clf = Classifier(out)
    assert clf.info.model_version.startswith("tiny-test-1+adapted-")
    prov = json.loads(clf.info.metadata["batchwbc.adaptation"])
    assert prov["parent_model_version"] == "tiny-test-1"
    assert prov["counts_per_class"] == {c: 15 for c in sorted(CLASSES)}
    files = sorted(p.relative_to(lab).as_posix() for p in lab.rglob("*.png") if p.parts[-3] != "plasma_cell")
    assert prov["files_sha256"] == hashlib.sha256("\n".join(files).encode()).hexdigest()
    assert prov["cross_validation"]["after"]["accuracy"] > prov["cross_validation"]["before"]["accuracy"]
    assert clf.embedding_output == "embedding"  # an adapted model can be adapted again

    # run: a lymphocyte stained like the model's monocyte is now called lymphocyte
    slides = tmp_path / "slides"
    write_crop(slides / "S1" / "a.png", tinymodel.colour_for("monocyte"), 1001)
    write_crop(slides / "S1" / "b.png", tinymodel.colour_for("eosinophil"), 1002)
    csv = tmp_path / "cells.csv"
    r = CliRunner().invoke(main, ["run", str(slides), "--out", str(tmp_path / "r.xlsx"), "--model", str(out),
                                  "--workers", "0", "--cells-csv", str(csv)])
    assert r.exit_code == 0, r.output
    import csv as csv_mod

    with open(csv) as fh:
        got = {row["file"]: row["class"] for row in csv_mod.DictReader(fh)}
    assert got == {"S1/a.png": "lymphocyte", "S1/b.png": "eosinophil"}

    r = CliRunner().invoke(main, ["info", "--model", str(out)])
    assert r.exit_code == 0 and "Adapted" in r.output and "tiny-test-1+adapted-" in r.output
    assert "parent_model_version" in r.output


def test_adapt_refuses_a_model_worse_than_the_original(tmp_path):
    """P1 (many cells) is labelled as the model sees it; P2 and P3 swap two classes. Whatever a
    fold learns from the other patients is wrong for the held-out one, so the adapted head
    loses on every fold while the original keeps P1 right."""
    model = tiny_with_embedding(tmp_path)
    two = {"lymphocyte": "lymphocyte", "monocyte": "monocyte"}
    swap = {"lymphocyte": "monocyte", "monocyte": "lymphocyte"}
    seed = 0
    lab = tmp_path / "lab"
    for patient, mapping, per in (("P1", two, 10), ("P2", swap, 4), ("P3", swap, 4)):
        for cls, look in mapping.items():
            for i in range(per):
                seed += 1
                write_crop(lab / cls / patient / f"c{i}.png", tinymodel.colour_for(look), seed)
    out = tmp_path / "LAB.onnx"
    r = _adapt(lab, "--out", out, "--model", model)
    assert r.exit_code == 1, r.output
    assert "worse than the original" in r.output and not out.exists()
    r = _adapt(lab, "--out", out, "--model", model, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(Classifier(out).info.metadata["batchwbc.adaptation"])["forced_although_worse"] is True


def test_adapt_without_embedding_output_names_the_fix(tmp_path):
    plain = tinymodel.build(tmp_path / "plain.onnx")
    lab = labelled_folder(tmp_path / "lab", SWAPPED)
    r = _adapt(lab, "--out", tmp_path / "o.onnx", "--model", plain)
    assert r.exit_code == 2
    assert "python -m export.embedding" in r.output and "no embedding output" in r.output


@pytest.mark.parametrize("layout", ["empty", "one-class", "only-unknown"])
def test_adapt_unusable_folder_is_a_usage_error(tmp_path, layout):
    model = tiny_with_embedding(tmp_path)
    lab = tmp_path / "lab"
    lab.mkdir()
    if layout == "one-class":
        labelled_folder(lab, {"lymphocyte": "lymphocyte"})
    if layout == "only-unknown":
        write_crop(lab / "plasma_cell" / "a.png", (1, 2, 3), 1)
    out = tmp_path / "o.onnx"
    r = _adapt(lab, "--out", out, "--model", model)
    assert r.exit_code == 2, r.output
    assert ("one class only (lymphocyte)" if layout == "one-class" else "no readable crops") in r.output
    assert not out.exists()


def test_adapt_skips_unreadable_crops_and_goes_on(tmp_path):
    model = tiny_with_embedding(tmp_path)
    lab = labelled_folder(tmp_path / "lab", SWAPPED)
    (lab / "monocyte" / "P1" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "o.onnx"
    r = _adapt(lab, "--out", out, "--model", model)
    assert r.exit_code == 0, r.output
    assert "broken.png" in r.output and "unreadable skipped: 1" in r.output


def test_embed_files_survives_a_worker_crash_and_keeps_order(tmp_path):
    """A file that kills its decode worker becomes one error; every other crop is embedded, in order."""
    from batchwbc.engine.embed import embed_files
    from test_pipeline import CRASH_MARKER, crash_on_marker

    clf = Classifier(tiny_with_embedding(tmp_path))
    looks = ["lymphocyte", "monocyte", "eosinophil"] * 4
    paths = []
    for i, look in enumerate(looks):
        name = f"{i:02d}-{CRASH_MARKER}.png" if i == 9 else f"{i:02d}.png"
        write_crop(tmp_path / "c" / name, tinymodel.colour_for(look), i)
        paths.append(str(tmp_path / "c" / name))
    got = embed_files(clf, paths, workers=2, decode=crash_on_marker)
    assert [i for i, _ in got.errors] == [9] and "crashed" in got.errors[0][1]
    assert got.ok == [i for i in range(len(paths)) if i != 9]
    pred = [clf.info.classes[k] for k in got.probs.argmax(axis=1)]
    assert pred == [looks[i] for i in got.ok]
