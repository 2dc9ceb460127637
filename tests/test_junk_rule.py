"""The not-a-cell rule (batchwbc.engine.junk_rule): fitted at export (export.ood_reference), stored in the model file,
applied by the runtime beside the reject centres, carried unchanged by adapt."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import tinymodel
from batchwbc.engine import junk_rule, ood
from batchwbc.engine.model import Classifier
from export.ood_reference import fit_junk_rule


def _cells_and_junk(seed: int = 0, k: int = 8):
    """Cells: a tight cloud at the origin. Junk: a wide cloud shifted along the first axis, the
    direction a linear rule must find (no centre-distance rule is told it)."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(0.0, 1.0, (600, k))
    held = rng.normal(0.0, 1.0, (400, k))
    junk = rng.normal(0.0, 3.0, (300, k))
    junk[:, 0] += 8.0
    return cells, junk, held


def test_fit_separates_junk_and_sets_apart_about_the_quantile_of_held_out_cells():
    cells, junk, held = _cells_and_junk()
    rule = fit_junk_rule(cells, junk, held, quantile=0.99)
    assert rule.info["held_out_set_apart"] <= 0.0125
    _, new_junk, new_cells = _cells_and_junk(seed=1)
    assert junk_rule.flags(rule, new_junk).mean() >= 0.9
    assert junk_rule.flags(rule, new_cells).mean() <= 0.03
    assert abs(rule.weights[0]) > 3 * np.abs(rule.weights[1:]).max()  # it found the direction


def test_fit_refuses_arrays_it_cannot_use():
    cells, junk, held = _cells_and_junk()
    with pytest.raises(ValueError):
        fit_junk_rule(cells, junk[:, :3], held, quantile=0.99)
    with pytest.raises(ValueError):
        fit_junk_rule(cells, junk[:1], held, quantile=0.99)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> ood.OodReference:
    return Classifier(tinymodel.build_with_ood(tmp_path_factory.mktemp("j") / "tiny.onnx"), threads=1).ood


def test_export_fits_the_rule_and_the_runtime_applies_it(ref):
    assert ref.junk is not None and ref.junk.info["junk"] == 60  # the tiny model's background crops
    k = ref.projection.shape[0]
    # a reference whose other rules never fire: only the not-a-cell rule can set a crop apart
    open_ref = replace(ref, threshold=float("inf"), reject_margin=float("inf"))
    z_target = np.zeros((2, k), np.float32)
    w = ref.junk.weights / np.linalg.norm(ref.junk.weights)
    z_target[0] = w * 1e3  # far on the junk side
    z_target[1] = -w * 1e3  # far on the cell side
    emb = ref.mean + np.linalg.lstsq(ref.projection, z_target.T, rcond=None)[0].T
    _, flagged = ood.score_and_flag(open_ref, emb)
    assert flagged.tolist() == [True, False]
    _, without = ood.score_and_flag(replace(open_ref, junk=None), emb)
    assert without.tolist() == [False, False]


def test_rule_round_trips_as_format_3_and_older_formats_stay(ref):
    text = ood.to_metadata(ref)
    body = json.loads(text)
    assert body["format"] == ood.FORMAT_WITH_JUNK_RULE and "junk_rule" in body
    again = ood.from_metadata({ood.KEY_OOD: text}).junk
    np.testing.assert_array_equal(again.weights, ref.junk.weights)
    assert (again.bias, again.threshold) == (ref.junk.bias, ref.junk.threshold)
    assert json.loads(ood.to_metadata(replace(ref, junk=None)))["format"] == ood.FORMAT
    assert ood.from_metadata({ood.KEY_OOD: ood.to_metadata(replace(ref, junk=None))}).junk is None


def _mutations():
    def set_(key, value):
        def f(body):
            body["junk_rule"][key] = value
        return f

    def drop(body):
        del body["junk_rule"]

    def in_format_1(body):
        body["format"] = ood.FORMAT

    return [
        (set_("weights", {"dtype": "float32", "shape": [2], "base64": "AAAAAAAAAAA="}), "unreadable junk_rule"),
        (set_("threshold", "high"), "unreadable junk_rule"),
        (set_("bias", float("nan")), "unreadable junk_rule"),
        (drop, "format 3 without a junk_rule"),
        (in_format_1, "format 1 with a junk_rule"),
    ]


@pytest.mark.parametrize("mutate, message", _mutations())
def test_a_damaged_rule_refuses_the_model_in_one_sentence(ref, mutate, message):
    body = json.loads(ood.to_metadata(ref))
    mutate(body)
    with pytest.raises(ood.OodReferenceError, match=message) as err:
        ood.from_metadata({ood.KEY_OOD: json.dumps(body)})
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text
