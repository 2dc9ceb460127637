"""The OOD reference's stain-colour check (batchwbc.engine.stain_colour; ADR 0011, "Stain-colour check").

A model that standardises colour inside its graph has an embedding blind to stain colour, so a
re-stained crop must be set apart by its colour alone, with a reason of its own; a model whose
reference has no colour envelope (the bundled v4) must behave exactly as before; a damaged
envelope refuses the model in one sentence.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import tinymodel
from batchwbc.engine import ood, stain_colour
from batchwbc.engine.model import DEFAULT_MODEL_PATH, Classifier, ModelError
from batchwbc.engine.pipeline import Pipeline
from batchwbc.inputs.slide_folders import discover


def stained_crop(rng: np.random.Generator, size: int = 64, tint: float = 0.0) -> np.ndarray:
    """A made-up May-Gruenwald-Giemsa crop: pale pink background, a purple nucleus in the middle
    (RGB uint8); `tint` shifts the stain towards blue, as one analyser's stain differs from another's."""
    bg = np.array([228, 196, 206]) + rng.normal(0, 4, 3) + np.array([-tint, 0, tint])
    nucleus = np.array([118, 62, 160]) + rng.normal(0, 6, 3) + np.array([-tint, 0, tint])
    img = np.empty((size, size, 3))
    img[:] = bg
    yy, xx = np.mgrid[:size, :size]
    r = size * rng.uniform(0.2, 0.3)
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = nucleus
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def restain(rgb: np.ndarray) -> np.ndarray:
    """Hue turned 120 degrees, as tests/test_ood_bundled.py re-stains crops."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + 60) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


@pytest.fixture(scope="module")
def envelope() -> stain_colour.ColourEnvelope:
    rng = np.random.default_rng(3)
    crops = [stained_crop(rng, tint=t) for t in (0.0, 25.0) for _ in range(150)]
    groups = ["PBC"] * 150 + ["AML-LMU"] * 150
    return stain_colour.fit_envelope(stain_colour.colour_statistics(np.stack(crops)), groups, 0.9975, 1.2)


# ----------------------------------------------------------------------------- the statistic

def test_statistic_is_the_mean_lab_a_b_of_the_model_input():
    grey = np.full((1, 32, 32, 3), 128, np.uint8)
    np.testing.assert_allclose(stain_colour.colour_statistics(grey), [[128.0, 128.0]], atol=0.5)
    crop = stained_crop(np.random.default_rng(0), size=128)
    full = cv2.cvtColor(crop, cv2.COLOR_RGB2LAB).reshape(-1, 3)[:, 1:].mean(axis=0)  # every pixel
    got = stain_colour.colour_statistics(crop[None])[0]
    np.testing.assert_allclose(got, full, atol=0.5)  # every second pixel: the same colour
    assert got[0] > 135  # purple and pink: a* well above neutral
    batch = np.stack([crop, restain(crop)])
    np.testing.assert_array_equal(stain_colour.colour_statistics(batch)[0], got)


def test_statistic_refuses_what_is_not_a_uint8_batch():
    with pytest.raises(ValueError, match="uint8"):
        stain_colour.colour_statistics(np.zeros((1, 8, 8, 3), np.float32))


# ----------------------------------------------------------------------------- the envelope decision

def test_a_stained_crop_is_inside_and_a_restained_one_outside(envelope):
    rng = np.random.default_rng(11)
    crops = [stained_crop(rng, tint=t) for t in (0.0, 25.0) for _ in range(30)]  # both sources
    stats = stain_colour.colour_statistics(np.stack(crops))
    assert not stain_colour.outside(envelope, stats).any()
    restained = stain_colour.colour_statistics(np.stack([restain(c) for c in crops]))
    assert stain_colour.outside(envelope, restained).all()
    assert stain_colour.outside(envelope, np.array([[np.nan, 128.0]])).all()  # never mistaken for a cell
    assert envelope.groups == ("AML-LMU", "PBC") and envelope.info["fit_cells"] == 300


def test_fit_envelope_refuses_too_few_cells_and_pools_small_sources():
    with pytest.raises(ValueError, match="at least 20 cells"):
        stain_colour.fit_envelope(np.full((5, 2), 130.0), ["A"] * 5, 0.99, 1.2)
    rng = np.random.default_rng(1)
    stats = stain_colour.colour_statistics(np.stack([stained_crop(rng) for _ in range(45)]))
    env = stain_colour.fit_envelope(stats, ["A"] * 40 + ["B"] * 5, 0.99, 1.2)
    assert env.groups == ("A",)  # 5 cells are no Gaussian of their own


def test_verdicts_carry_the_colour_reason_only_when_the_envelope_says_so(envelope):
    ref = Classifier(tinymodel_with_ood(), threads=1).ood
    rng = np.random.default_rng(5)
    crops = np.stack([stained_crop(rng, size=32), restain(stained_crop(rng, size=32))])
    emb = ref.mean[None].repeat(2, axis=0)
    _, flagged = ood.score_and_flag(ref, emb)
    _, without = ood.verdicts(ref, emb, crops)
    np.testing.assert_array_equal(without, np.where(flagged, ood.BY_EMBEDDING, 0))  # no envelope: as before
    _, with_env = ood.verdicts(replace(ref, colour=envelope), emb, crops)
    assert with_env[0] & ood.BY_COLOUR == 0 and with_env[1] & ood.BY_COLOUR
    assert ood.reasons(ood.BY_COLOUR) == [ood.COLOUR_REASON]
    assert ood.reasons(True) == [ood.UNCLASSIFIED_REASON]  # a cache row written before the colour check
    # the same verdicts from statistics already at hand (embed_files returns them)
    stats = stain_colour.colour_statistics(crops)
    _, from_stats = ood.verdicts_from_colour(replace(ref, colour=envelope), emb, stats)
    np.testing.assert_array_equal(from_stats, with_env)
    with pytest.raises(ValueError):
        ood.verdicts_from_colour(replace(ref, colour=envelope), emb, None)
    # the nearest group's distance is what `distances` reports
    per_group = stain_colour.group_distances(envelope, stats)
    assert per_group.shape == (2, len(envelope.groups))
    np.testing.assert_allclose(per_group.min(axis=1), stain_colour.distances(envelope, stats))


# ----------------------------------------------------------------------------- metadata

_TINY: dict[str, Path] = {}


def tinymodel_with_ood() -> Path:
    if "path" not in _TINY:
        import tempfile

        _TINY["path"] = tinymodel.build_with_ood(Path(tempfile.mkdtemp()) / "tiny-ood.onnx")
    return _TINY["path"]


def test_a_model_without_an_envelope_keeps_its_reference_byte_for_byte():
    """v4, still shipped for labs that validated it, predates the colour check."""
    clf = Classifier(DEFAULT_MODEL_PATH.parent / "batchwbc-wbc12-v4.onnx", threads=1)
    assert clf.ood.colour is None
    assert ood.to_metadata(clf.ood) == clf.info.metadata[ood.KEY_OOD]
    assert json.loads(clf.info.metadata[ood.KEY_OOD])["format"] == ood.FORMAT


def test_the_bundled_model_carries_an_envelope_that_holds_its_held_out_cells():
    clf = Classifier(DEFAULT_MODEL_PATH, threads=1)
    if clf.ood is None or clf.ood.colour is None:
        raise AssertionError("the bundled model has no stain-colour envelope")
    assert clf.ood.colour.info["held_out_outside"] <= 0.01
    body = json.loads(clf.info.metadata[ood.KEY_OOD])
    assert "stain_colour" in body and body["format"] in (ood.FORMAT_WITH_COLOUR, ood.FORMAT_WITH_JUNK_RULE)


def test_envelope_round_trips_as_format_2(envelope):
    ref = replace(Classifier(tinymodel_with_ood(), threads=1).ood, colour=envelope, junk=None)
    text = ood.to_metadata(ref)
    body = json.loads(text)
    assert body["format"] == ood.FORMAT_WITH_COLOUR and len(json.dumps(body["stain_colour"])) < 2000
    again = ood.from_metadata({ood.KEY_OOD: text}).colour
    assert again.groups == envelope.groups and again.threshold == envelope.threshold
    np.testing.assert_allclose(again.whitening, envelope.whitening, rtol=1e-6)


def _mutations():
    def set_(key, value):
        def f(body):
            body["stain_colour"][key] = value
        return f

    def drop_envelope(body):
        del body["stain_colour"]

    def envelope_in_format_1(body):
        body["format"] = ood.FORMAT

    return [
        (set_("centres", {"dtype": "float32", "shape": [5, 2], "base64": "AAAA"}), "unreadable 'stain_colour centres'"),
        (set_("whitening", {"dtype": "float32", "shape": [1, 2], "base64": "AAAAAAAAAAA="}), "unreadable stain_colour envelope"),
        (set_("threshold", "far"), "unreadable stain_colour envelope"),
        (set_("threshold", -1.0), "unreadable stain_colour envelope"),
        (set_("statistic", "rgb-mean-v9"), "of a kind this batchwbc does not read"),
        (drop_envelope, "format 2 without a stain_colour envelope"),
        (envelope_in_format_1, "format 1 with a stain_colour envelope"),
    ]


@pytest.mark.parametrize("mutate, message", _mutations())
def test_a_malformed_envelope_refuses_the_model_in_one_sentence(envelope, tmp_path, mutate, message):
    import onnx

    from export.ood_reference import write

    path = tmp_path / "m.onnx"
    write(tinymodel_with_ood(), replace(Classifier(tinymodel_with_ood(), threads=1).ood, colour=envelope, junk=None), path)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == ood.KEY_OOD:
            body = json.loads(p.value)
            mutate(body)
            p.value = json.dumps(body)
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match=message) as err:
        Classifier(path)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0, text


# ----------------------------------------------------------------------------- a run

def test_colour_outlier_is_unclassified_with_its_own_reason_also_from_the_cache(tmp_path):
    """The tiny model's embedding is the mean colour, so a crop of a class colour is a known cell
    to it; an envelope fitted on the monocyte colour alone sets the basophil-coloured crop apart
    by colour only."""
    import onnx

    from batchwbc.engine.result_cache import ResultCache
    from export.ood_reference import write

    rng = np.random.default_rng(2)
    mono = np.array(tinymodel.colour_for("monocyte"))
    crops = np.clip(mono + rng.normal(0, 3, (60, 1, 1, 3)) + np.zeros((60, 32, 32, 3)), 0, 255).astype(np.uint8)
    env = stain_colour.fit_envelope(stain_colour.colour_statistics(crops), ["tiny"] * 60, 0.9975, 1.2)
    path = tmp_path / "m.onnx"
    write(tinymodel_with_ood(), replace(Classifier(tinymodel_with_ood(), threads=1).ood, colour=env), path)
    clf = Classifier(path, threads=1)
    for name, class_id in (("mono.png", "monocyte"), ("baso.png", "basophil")):
        img = np.zeros((40, 40, 3), np.uint8)
        img[:] = tinymodel.colour_for(class_id)[::-1]
        (tmp_path / "s" / "P").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "s" / "P" / name), img)
    outs = []
    for _ in range(2):
        with ResultCache(tmp_path / "c.sqlite", clf.info.sha256) as cache:
            outs.append(Pipeline(clf.info.input_size, clf, clf.info.review_threshold, workers=0, cache=cache).run(
                discover(tmp_path / "s").crops))
    assert outs[1].cached == 2
    for out in outs:
        cells = {c.file: c for c in out.cells}
        baso, mono_cell = cells["P/baso.png"], cells["P/mono.png"]
        assert baso.class_id == ood.UNCLASSIFIED and baso.review and baso.review_reason == ood.COLOUR_REASON
        assert baso.second_class == "basophil"  # the embedding knew it: only the colour set it apart
        assert mono_cell.class_id == "monocyte"
