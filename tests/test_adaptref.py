"""`batchwbc adapt` re-derives the OOD and DATA_SHIFT thresholds from the lab's verified cells.

The tiny colour model with an OOD reference (tests/tinymodel.py) has the class colours as its
"training cells"; a lab whose stain shifts every colour is a distribution shift the parent
model flags (DATA_SHIFT, some cells unclassified) and the adapted model, which has seen the
lab's verified cells, must accept, while noise and background crops stay unclassified.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tinymodel
from batchwbc.adaptation import thresholds
from batchwbc.engine import data_shift, ood
from batchwbc.commands.adapt import run_adapt
from batchwbc.engine.embed import embed_files
from batchwbc.engine.model import Classifier
from test_adapt import CLASSES, tiny_with_embedding, write_crop


def shifted(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Another stain: every channel compressed and lifted (as in test_ood's shifted batch)."""
    return tuple(int(round(0.85 * c + 0.1 * 255)) for c in colour)


def lab_folder(root: Path, patients=("P1", "P2", "P3"), per=10, seed0=0) -> Path:
    seed = seed0
    for patient in patients:
        for cls in CLASSES:
            for i in range(per):
                seed += 1
                write_crop(root / cls / patient / f"c{i:02d}.png", shifted(tinymodel.colour_for(cls)), seed)
    return root


def embed(clf: Classifier, paths: list[Path]) -> np.ndarray:
    got = embed_files(clf, [str(p) for p in paths], workers=0)
    assert not got.errors
    return got.embeddings


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptref")
    parent = tinymodel.build_with_ood(tmp / "parent.onnx")
    lab = lab_folder(tmp / "lab")
    out = tmp / "LAB.onnx"
    res = run_adapt(lab, out, parent, force=True, workers=0)
    assert res.written
    # a new patient of the same lab, never seen by adapt
    new_patient = lab_folder(tmp / "new", patients=("P9",), per=8, seed0=5000)
    cells = sorted(new_patient.rglob("*.png"))
    rng = np.random.default_rng(7)
    noise = []
    for i in range(5):
        p = tmp / "noise" / f"n{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        import cv2

        cv2.imwrite(str(p), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        noise.append(p)
    background = []
    for i in range(3):
        p = tmp / "bg" / f"b{i}.png"
        write_crop(p, tinymodel.BACKGROUND_COLOUR, 900 + i)
        background.append(p)
    return {"parent": Classifier(parent, threads=1), "adapted": Classifier(out, threads=1), "result": res,
            "cells": cells, "noise": noise, "background": background}


def test_shifted_lab_raises_data_shift_with_the_parent_not_with_the_adapted_model(adapted):
    parent, new = adapted["parent"], adapted["adapted"]
    before = data_shift.decide(parent.ood, ood.score(parent.ood, embed(parent, adapted["cells"])))
    after = data_shift.decide(new.ood, ood.score(new.ood, embed(new, adapted["cells"])))
    assert before.decided and before.raised, before.text()
    assert after.decided and not after.raised, after.text()
    # and the new patient's verified-like cells are within the new threshold (the parent left
    # them all out). The shifted monocyte colour (242, 242, 26) lies nearer the tiny model's pale
    # background centre; the margin would rise to cover it, but a tiny crop is one colour, so the
    # junk adapt cuts from the lab's monocyte crops is monocyte-coloured too, and the junk check
    # keeps the margin (test_provenance_records_what_was_rederived): the monocytes stay set apart.
    score_before, flagged_before = ood.score_and_flag(parent.ood, embed(parent, adapted["cells"]))
    score_after, flagged_after = ood.score_and_flag(new.ood, embed(new, adapted["cells"]))
    assert flagged_before.all() and (score_before > parent.ood.threshold).all()
    assert (score_after <= new.ood.threshold).all()
    _, known, rejected = ood.distances(new.ood, embed(new, adapted["cells"]))
    np.testing.assert_array_equal(flagged_after, (known - rejected) > new.ood.reject_margin)


def test_noise_and_background_are_still_unclassified_with_the_adapted_model(adapted):
    new = adapted["adapted"]
    _, noise = ood.score_and_flag(new.ood, embed(new, adapted["noise"]))
    _, bg = ood.score_and_flag(new.ood, embed(new, adapted["background"]))
    assert noise.all() and bg.all()
    # the reject-centre margin may move up (the parent carries the not-a-cell rule), never down
    assert new.ood.reject_margin >= adapted["parent"].ood.reject_margin
    parent_junk = adapted["parent"].ood.junk
    assert parent_junk is not None and new.ood.junk is not None  # and the not-a-cell rule too
    np.testing.assert_array_equal(new.ood.junk.weights, parent_junk.weights)
    assert (new.ood.junk.bias, new.ood.junk.threshold) == (parent_junk.bias, parent_junk.threshold)
    np.testing.assert_array_equal(new.ood.centres, adapted["parent"].ood.centres)


def test_the_adapted_version_is_recognised_by_the_reports(adapted):
    from batchwbc.engine.model_metadata import is_adapted_version

    assert is_adapted_version(adapted["adapted"].info.model_version)
    assert is_adapted_version(adapted["result"].model_version)
    assert not is_adapted_version(adapted["parent"].info.model_version)


def test_provenance_records_what_was_rederived(adapted):
    parent, new = adapted["parent"].ood, adapted["adapted"].ood
    prov = json.loads(adapted["adapted"].info.metadata["batchwbc.adaptation"])[thresholds.PROVENANCE_KEY]
    assert prov == adapted["result"].ood_rederived
    assert prov["lab_cells_scored"] == 120
    assert prov["parent_unclassified_lab_cells"] == 120
    # the 30 monocytes (background rule, kept by the junk check) plus at most the 0.25% tail
    assert 30 <= prov["new_unclassified_lab_cells"] <= 30 + 1
    j = prov["junk_check"]
    assert j["junk_crops"] == 2 * 100 and j["counted_with_margin_moved"] > j["allowed"] >= j["counted_with_margin_kept"]
    assert "would count" in j["margin_kept_because"]
    assert prov["background_rule"]["new"] == prov["background_rule"]["parent"] == pytest.approx(parent.reject_margin)
    assert new.reject_margin == parent.reject_margin
    assert prov["unclassified_threshold"] == {**prov["unclassified_threshold"], "parent": pytest.approx(parent.threshold),
                                              "new": pytest.approx(new.threshold)}
    assert new.threshold > parent.threshold
    d = prov["data_shift"]
    assert d["batches"] == "patient folders" and d["batches_checked"] == 3
    assert d["parent_raised_data_shift"] == 3 and d["new_raised_data_shift"] == 0
    assert d["threshold"]["new"] == pytest.approx(new.shift.threshold) and new.shift.threshold >= parent.shift.threshold
    assert d["cell_cut"]["new"] == pytest.approx(new.shift.cell_cut) and new.shift.cell_cut > parent.shift.cell_cut
    assert new.shift.min_cells == parent.shift.min_cells
    assert d["pseudo_patients"] > 0


def test_lab_like_the_training_cells_keeps_the_parent_thresholds(adapted):
    """Cells like the parent's own never make the reference stricter or looser than it was."""
    parent = adapted["parent"].ood
    cols = np.array([tinymodel.COLOURS[i] for i in range(len(parent.classes) - 1)], np.float32) / 255.0
    rng = np.random.default_rng(11)
    emb = (cols[rng.integers(0, len(cols), 200)] + rng.normal(0, 0.005, (200, 3))).astype(np.float32)
    got = thresholds.rederive(parent, emb, [f"P{i % 4}" for i in range(200)])
    assert got.reference.threshold == parent.threshold
    assert got.reference.shift.cell_cut == parent.shift.cell_cut
    assert got.reference.shift.threshold == parent.shift.threshold
    assert got.provenance["parent_unclassified_lab_cells"] == 0
    assert got.provenance["data_shift"]["parent_raised_data_shift"] == 0


def test_rederive_without_patients_draws_from_all_cells_and_is_seeded(adapted):
    parent = adapted["parent"].ood
    cols = np.array([tinymodel.COLOURS[i] for i in range(4)], np.float32) / 255.0
    rng = np.random.default_rng(12)
    emb = (cols[rng.integers(0, 4, 150)] * 0.85 + 0.1 + rng.normal(0, 0.003, (150, 3))).astype(np.float32)
    a = thresholds.rederive(parent, emb, None, seed=3)
    b = thresholds.rederive(parent, emb, None, seed=3)
    assert a.provenance == b.provenance
    assert a.provenance["data_shift"]["batches"] == "all lab cells as one batch"
    assert a.provenance["data_shift"]["parent_raised_data_shift"] == 1
    assert not data_shift.decide(a.reference, ood.score(a.reference, emb)).raised
    json.dumps(a.provenance)  # JSON-ready


def test_lab_cells_set_apart_by_the_reject_rule_count_before_and_after(adapted):
    """A lab whose verified cells partly fall nearer the reject (background) centre: the parent
    counts them as unusual (DATA_SHIFT for every patient), and the adapted reference, derived
    under the same rule from those cells, no longer raises it for the lab's own patients."""
    from dataclasses import replace

    parent = adapted["parent"].ood
    assert parent.shift.counts_set_apart
    # a cut no score reaches: only the set-apart rule can make a cell unusual here (as for the
    # new hospital of ADR 0011, whose cells scored inside the cut)
    parent = replace(parent, shift=replace(parent.shift, cell_cut=1e9))
    cols = np.array([tinymodel.COLOURS[i] for i in range(4)], np.float32) / 255.0
    rng = np.random.default_rng(13)
    cells = cols[rng.integers(0, 4, 400)] + rng.normal(0, 0.003, (400, 3))
    cells[::2] = np.array(tinymodel.BACKGROUND_COLOUR, np.float32) / 255.0 + rng.normal(0, 0.003, (200, 3))
    emb = cells.astype(np.float32)
    groups = [f"P{i // 100}" for i in range(400)]  # 100 cells a patient, half of them set apart
    score, flagged = ood.score_and_flag(parent, emb)
    assert flagged[::2].all() and not flagged[1::2].any()
    got = thresholds.rederive(parent, emb, groups)
    assert got.provenance["data_shift"]["parent_raised_data_shift"] == 4
    assert got.provenance["data_shift"]["new_raised_data_shift"] == 0
    assert got.reference.shift.threshold > parent.shift.threshold
    _, still = ood.score_and_flag(got.reference, emb)
    counted = np.asarray(data_shift.shift_scores(got.reference, score, still))
    for p in ("P0", "P1", "P2", "P3"):
        assert not data_shift.decide(got.reference, counted[[g == p for g in groups]]).raised


def test_parent_without_reference_adapts_as_before(tmp_path):
    from test_adapt import SWAPPED, labelled_folder

    model = tiny_with_embedding(tmp_path)
    lab = labelled_folder(tmp_path / "lab", SWAPPED)
    res = run_adapt(lab, tmp_path / "o.onnx", model, workers=0)
    assert res.written and res.ood_rederived is None
    clf = Classifier(tmp_path / "o.onnx", threads=1)
    assert ood.KEY_OOD not in clf.info.metadata and clf.ood is None
    assert thresholds.PROVENANCE_KEY not in json.loads(clf.info.metadata["batchwbc.adaptation"])


def test_adapt_command_reports_the_rederived_thresholds(tmp_path):
    from test_adapt import _adapt

    parent = tinymodel.build_with_ood(tmp_path / "parent.onnx")
    lab = lab_folder(tmp_path / "lab")
    r = _adapt(lab, "--out", tmp_path / "o.onnx", "--model", parent, "--force")
    assert r.exit_code == 0, r.output
    assert "OOD reference re-derived from 120 lab cells" in r.output
    assert "the original left 120 of these cells unclassified" in r.output
    assert "raised it for 3 of 3 batches checked" in r.output


def _far_from_the_classes(parent, n: int = 300, seed: int = 5) -> np.ndarray:
    """Lab cells (class colours, shifted towards the background colour) whose gap to the reject
    centres is above the parent's margin, as a new analyser's cells were (ADR 0011)."""
    cols = np.array([tinymodel.COLOURS[i] for i in range(4)], np.float32) / 255.0
    bg = np.array(tinymodel.BACKGROUND_COLOUR, np.float32) / 255.0
    rng = np.random.default_rng(seed)
    return (0.6 * cols[rng.integers(0, 4, n)] + 0.4 * bg + rng.normal(0, 0.003, (n, 3))).astype(np.float32)


def test_reject_margin_covers_the_lab_cells_only_beside_a_not_a_cell_rule(adapted):
    """With the not-a-cell rule, the margin rises to the lab cells' gap at the unclassified quantile
    (the rule keeps junk out); without it the margin is the only background guard and stays."""
    from dataclasses import replace

    parent = adapted["parent"].ood
    emb = _far_from_the_classes(parent)
    _, known, rejected = ood.distances(parent, emb)
    gaps = known - rejected
    assert (gaps > parent.reject_margin).mean() > 0.5  # most of the lab's cells were set apart
    got = thresholds.rederive(parent, emb)
    assert got.reference.reject_margin == pytest.approx(max(parent.reject_margin, float(np.quantile(gaps, ood.UNCLASSIFIED_QUANTILE))))
    assert got.provenance["background_rule"]["new"] == got.reference.reject_margin
    assert got.provenance["background_rule"]["parent"] == parent.reject_margin
    without = thresholds.rederive(replace(parent, junk=None), emb)
    assert without.reference.reject_margin == parent.reject_margin
    assert without.provenance["background_rule"]["new"] == parent.reject_margin
    assert without.provenance["not_a_cell_rule"] == "none"


def test_the_margin_moves_only_if_the_lab_junk_stays_out(adapted):
    """margin_move (pure): junk the moved margin would let in keeps the parent's margin; junk it
    does not, or within the tolerance, lets it move."""
    from dataclasses import replace

    parent = adapted["parent"].ood
    cells = _far_from_the_classes(parent)
    # as rederive calls it: with the unclassified threshold already raised to cover the lab's cells
    parent = replace(parent, threshold=float(ood.score(parent, cells).max()) + 1.0)
    _, known, rejected = ood.distances(parent, cells)
    moved = float(np.quantile(known - rejected, ood.UNCLASSIFIED_QUANTILE))
    assert moved > parent.reject_margin
    # junk just like those cells: the moved margin counts it, the kept one does not
    margin, check = thresholds.margin_move(parent, moved, cells[:100])
    assert margin == parent.reject_margin and check["counted_with_margin_moved"] > check["allowed"]
    assert "would count" in check["margin_kept_because"]
    # junk the guard catches either way (the background colour itself)
    bg = np.array(tinymodel.BACKGROUND_COLOUR, np.float32) / 255.0
    rng = np.random.default_rng(3)
    pale = (bg + rng.normal(0, 0.003, (100, 3))).astype(np.float32)
    margin, check = thresholds.margin_move(parent, moved, pale)
    assert margin == moved and "margin_kept_because" not in check
    assert check["counted_with_margin_moved"] <= check["allowed"]
    # one lab-like crop among 100 pale ones: within the 1 % tolerance, the margin moves
    margin, check = thresholds.margin_move(parent, moved, np.concatenate([pale[:99], cells[:1]]))
    assert margin == moved and check["counted_with_margin_moved"] == 1 and check["allowed"] == 1
    # and rederive applies it
    got = thresholds.rederive(parent, cells, junk=cells[:100])
    assert got.reference.reject_margin == parent.reject_margin and "junk_check" in got.provenance
