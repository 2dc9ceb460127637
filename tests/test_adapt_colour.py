"""`batchwbc adapt` widens the stain-colour envelope by the lab's verified cells (batchwbc.adaptation.colour).

The parent is the tiny OOD model (tests/tinymodel.py) with an envelope fitted, as export fits it,
on made-up May-Gruenwald-Giemsa crops of two "training sources". The lab stains differently: its
crops are the same crops with the hue turned 120 degrees, which the parent sets apart by colour.
After adapting on them, crops of that lab must no longer be set apart by colour, while the
training sources' crops stay inside and a third stain (hue turned 240 degrees) stays outside.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import tinymodel
from batchwbc.adaptation import colour as adapt_colour
from batchwbc.commands.adapt import run_adapt
from batchwbc.engine import ood, stain_colour
from batchwbc.engine.embed import embed_files
from batchwbc.engine.model import Classifier
from batchwbc.engine.pipeline import decode_one
from test_adapt import CLASSES, _adapt
from test_stain_colour import restain, stained_crop

SOURCES = {"PBC": 0.0, "AML-LMU": 25.0}


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def crops(root: Path, n: int, seed: int, turns: int = 0, tint: float = 0.0) -> list[Path]:
    """n stained crops under root, their hue turned 120 degrees `turns` times."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rgb = stained_crop(rng, tint=tint)
        for _ in range(turns):
            rgb = restain(rgb)
        out.append(write_rgb(root / f"c{i:03d}.png", rgb))
    return out


def lab_folder(root: Path, patients=("P1", "P2", "P3"), per=5, classes=CLASSES, turns: int = 1) -> Path:
    """LABELLED/<class>/<patient>/ of the lab's (hue-turned) stain."""
    seed = 100
    for patient in patients:
        for cls in classes:
            seed += 1
            crops(root / cls / patient, per, seed, turns=turns)
    return root


def model_inputs(clf: Classifier, paths: list[Path]) -> np.ndarray:
    return np.stack([decode_one(str(p), clf.info.input_size, clf.info.preprocessing).array for p in paths])


def colour_bits(clf: Classifier, paths: list[Path]) -> np.ndarray:
    _, _, verdicts = clf.predict_scored(model_inputs(clf, paths))
    return (verdicts & ood.BY_COLOUR) != 0


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """The tiny OOD model with an envelope fitted on the training sources' model inputs (as export does)."""
    from export.ood_reference import colour_envelope, write

    tmp = tmp_path_factory.mktemp("adapt-colour")
    path = tinymodel.build_with_ood(tmp / "plain-ood.onnx")
    clf = Classifier(path, threads=1)
    ref_paths, held_paths, ref_src, held_src = [], [], [], []
    for k, (source, tint) in enumerate(SOURCES.items()):
        ref_paths += crops(tmp / "ref" / source, 40, 10 + k, tint=tint)
        held_paths += crops(tmp / "held" / source, 10, 20 + k, tint=tint)
        ref_src += [source] * 40
        held_src += [source] * 10
    ref, held = (embed_files(clf, [str(p) for p in ps]) for ps in (ref_paths, held_paths))
    env = colour_envelope(ref.colour, ref_src, held.colour, held_src)
    out = tmp / "parent.onnx"
    write(path, replace(clf.ood, colour=env), out)
    return out


@pytest.fixture(scope="module")
def adapted(parent, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("adapted")
    lab = lab_folder(tmp / "LAB")
    out = tmp / "lab.onnx"
    res = run_adapt(lab, out, parent, force=True, workers=0)
    assert res.written
    return {"parent": Classifier(parent, threads=1), "adapted": Classifier(out, threads=1), "result": res,
            "lab": lab, "path": out,
            "lab_like": crops(tmp / "new-patient", 12, 5000, turns=1),  # the lab's stain, never seen by adapt
            "training_like": [p for k, (s, t) in enumerate(SOURCES.items())
                              for p in crops(tmp / "train" / s, 8, 6000 + k, tint=t)],
            "third": crops(tmp / "third", 12, 7000, turns=2)}


def test_lab_cells_are_no_longer_set_apart_by_colour_but_a_third_stain_still_is(adapted):
    parent, new = adapted["parent"], adapted["adapted"]
    assert colour_bits(parent, adapted["lab_like"]).all()  # the problem: the parent sets the lab's stain apart
    assert not colour_bits(new, adapted["lab_like"]).any()
    assert not colour_bits(new, adapted["training_like"]).any()  # the training sources stay inside
    assert colour_bits(new, adapted["third"]).all()
    env, before = new.ood.colour, parent.ood.colour
    assert env.groups == (*before.groups, "adapted: LAB") and env.threshold >= before.threshold
    np.testing.assert_allclose(env.centres[:-1], before.centres, rtol=1e-6)  # the parent's groups as they were
    assert new.ood.describe().endswith("stain-colour envelope of 2 training sources and 1 adapted lab")


def test_the_lab_group_follows_the_exports_rule(adapted):
    """The threshold is the export's rule (the parent's recorded quantile and margin) on the lab
    cells' distances, or the parent's where higher: the same functions, not a copy of the maths."""
    parent = adapted["parent"].ood.colour
    lab = sorted(adapted["lab"].rglob("*.png"))
    stats = embed_files(adapted["parent"], [str(p) for p in lab]).colour
    again = stain_colour.with_group(parent, stats, "adapted: LAB")
    new = adapted["adapted"].ood.colour
    assert new.threshold == pytest.approx(again.threshold, rel=1e-6)
    q, m = stain_colour.threshold_rule(parent)
    wider = replace(again, threshold=float("inf"))
    assert again.threshold == pytest.approx(max(parent.threshold, float(np.quantile(stain_colour.distances(wider, stats), q)) * m))
    assert new.info["added_groups"][-1]["group"] == "adapted: LAB" and new.info["added_groups"][-1]["cells"] == 60
    assert new.info["quantile"] == parent.info["quantile"] and new.info["margin"] == parent.info["margin"]


def test_provenance_records_the_widened_envelope(adapted):
    prov = json.loads(adapted["adapted"].info.metadata["batchwbc.adaptation"])[adapt_colour.PROVENANCE_KEY]
    assert prov == adapted["result"].colour_rederived
    assert prov["lab_cells"] == 60 and prov["parent_outside_lab_cells"] == 60 and prov["new_outside_lab_cells"] == 0
    assert prov["added_group"] == "adapted: LAB" and "kept_parent_because" not in prov
    assert prov["threshold"]["new"] == pytest.approx(adapted["adapted"].ood.colour.threshold)


def test_adapting_again_on_a_folder_of_the_same_name_adds_a_second_group(adapted, tmp_path):
    lab = lab_folder(tmp_path / "LAB", per=4, classes=CLASSES[:2], turns=2)
    out = tmp_path / "again.onnx"
    res = run_adapt(lab, out, adapted["path"], force=True, workers=0)
    env = Classifier(out, threads=1).ood.colour
    assert env.groups[-2:] == ("adapted: LAB", "adapted: LAB (2)") and res.colour_rederived["lab_cells"] == 24
    assert [g["group"] for g in env.info["added_groups"]] == ["adapted: LAB", "adapted: LAB (2)"]


def test_too_few_lab_cells_keep_the_parents_envelope_and_say_so(parent, tmp_path):
    lab = lab_folder(tmp_path / "LAB", patients=("P1",), per=6, classes=CLASSES[:2])  # 12 cells < MIN_GROUP
    out = tmp_path / "o.onnx"
    r = _adapt(lab, "--out", out, "--model", parent, "--force")
    assert r.exit_code == 0, r.output
    assert r.output.count("12 lab cells are too few for a colour group of their own") == 2  # the log line, the summary line
    assert "stain-colour envelope: the original set 12 of 12 lab cells apart by colour; kept unchanged" in r.output
    before, after = Classifier(parent, threads=1).ood.colour, Classifier(out, threads=1).ood.colour
    assert after.groups == before.groups and after.threshold == before.threshold
    np.testing.assert_array_equal(after.whitening, before.whitening)
    prov = json.loads(Classifier(out, threads=1).info.metadata["batchwbc.adaptation"])[adapt_colour.PROVENANCE_KEY]
    assert prov["lab_cells"] == 12 and f"at least {stain_colour.MIN_GROUP} needed" in prov["kept_parent_because"]
    assert prov["threshold"]["new"] == prov["threshold"]["parent"] and prov["new_outside_lab_cells"] == 12


def test_command_line_names_the_added_group(parent, tmp_path):
    lab = lab_folder(tmp_path / "MYLAB", per=2)  # 24 cells
    r = _adapt(lab, "--out", tmp_path / "o.onnx", "--model", parent, "--force")
    assert r.exit_code == 0, r.output
    assert "stain-colour envelope: the original set 24 of 24 lab cells apart by colour; group 'adapted: MYLAB' added" in r.output
    assert "0 of these cells still outside" in r.output and "kept unchanged" not in r.output


def test_no_envelope_in_no_envelope_out(tmp_path):
    parent = tinymodel.build_with_ood(tmp_path / "parent.onnx")
    assert Classifier(parent, threads=1).ood.colour is None
    lab = lab_folder(tmp_path / "LAB", per=2)
    out = tmp_path / "o.onnx"
    res = run_adapt(lab, out, parent, force=True, workers=0)
    clf = Classifier(out, threads=1)
    assert res.written and res.colour_rederived is None and clf.ood.colour is None
    assert "stain_colour" not in json.loads(clf.info.metadata[ood.KEY_OOD])
    assert adapt_colour.PROVENANCE_KEY not in json.loads(clf.info.metadata["batchwbc.adaptation"])
    assert adapt_colour.rederive_colour(None, np.full((50, 2), 130.0), "LAB") == adapt_colour.ColourRederived(None, None)


# ----------------------------------------------------------------------------- the pure parts

def _envelope() -> stain_colour.ColourEnvelope:
    rng = np.random.default_rng(0)
    return stain_colour.fit_envelope(np.array([140.0, 120.0]) + rng.normal(0, 1, (100, 2)), ["A"] * 100, 0.9975, 1.2)


def test_with_group_never_lowers_the_threshold_and_refuses_what_it_cannot_fit():
    env = _envelope()
    rng = np.random.default_rng(1)
    tight = np.array([100.0, 160.0]) + rng.normal(0, 0.01, (40, 2))  # a tighter group than env's: its own rule is lower
    wider = stain_colour.with_group(env, tight, "lab")
    assert wider.threshold == env.threshold and wider.groups == ("A", "lab")
    assert not stain_colour.outside(wider, tight).any()
    with pytest.raises(ValueError, match="at least 20 cells"):
        stain_colour.with_group(env, tight[:19], "lab")
    with pytest.raises(ValueError, match="already has a group 'A'"):
        stain_colour.with_group(env, tight, "A")
    with pytest.raises(ValueError, match="does not record the quantile and margin"):
        stain_colour.with_group(replace(env, info={}), tight, "lab")


def test_an_envelope_without_its_rule_is_kept_with_the_reason():
    env = replace(_envelope(), info={"statistic": stain_colour.STATISTIC})
    got = adapt_colour.rederive_colour(env, np.full((30, 2), 100.0), "LAB")
    assert got.envelope is env and "does not record the quantile and margin" in got.kept_because
    assert got.provenance["kept_parent_because"] == got.kept_because


def test_embed_files_returns_the_colour_of_the_very_model_inputs(tmp_path):
    clf = Classifier(tinymodel.build_with_ood(tmp_path / "m.onnx"), threads=1)
    paths = crops(tmp_path / "c", 5, 1) + crops(tmp_path / "d", 3, 2, turns=1)
    got = embed_files(clf, [str(p) for p in paths], batch_size=3)
    np.testing.assert_array_equal(got.colour, stain_colour.colour_statistics(model_inputs(clf, paths)))
