"""model_metadata: the metadata contract is validated by real checks, under python -O as well."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchwbc.core import catalogue
from batchwbc.engine import model_metadata
from batchwbc.engine.model_metadata import ModelError, parse_metadata

PRE = "some-preprocessing-v1"


def _meta(**overrides: str) -> dict[str, str]:
    meta = {
        model_metadata.KEY_FORMAT: model_metadata.FORMAT_VERSION,
        model_metadata.KEY_CLASSES: json.dumps(list(catalogue.CLASS_IDS[:3])),
        model_metadata.KEY_INPUT_SIZE: "64",
        model_metadata.KEY_PREPROCESSING: PRE,
        model_metadata.KEY_MODEL_VERSION: "t-1",
        model_metadata.KEY_REVIEW_THRESHOLD: "0.6",
    }
    meta.update(overrides)
    return meta


def _parse(meta: dict[str, str]) -> model_metadata.ModelInfo:
    return parse_metadata(meta, Path("m.onnx"), "0" * 64, {PRE})


def test_valid_metadata_parses():
    info = _parse(_meta())
    assert info.classes == tuple(catalogue.CLASS_IDS[:3]) and info.input_size == 64
    assert info.review_threshold == 0.6 and info.temperature is None


@pytest.mark.parametrize("size", ["4", "15", "1025", "-1", "abc", "64.5", ""])
def test_invalid_input_size_is_refused(size):
    with pytest.raises(ModelError, match="invalid input size"):
        _parse(_meta(**{model_metadata.KEY_INPUT_SIZE: size}))


@pytest.mark.parametrize("size", ["16", "1024"])
def test_input_size_bounds_are_inclusive(size):
    assert _parse(_meta(**{model_metadata.KEY_INPUT_SIZE: size})).input_size == int(size)


@pytest.mark.parametrize("classes", [
    json.dumps({"lymphocyte": 0}), "[]", json.dumps(["lymphocyte", 3]), "not json", json.dumps("lymphocyte"), "null",
])
def test_unreadable_class_list_is_refused(classes):
    with pytest.raises(ModelError, match="unreadable class list"):
        _parse(_meta(**{model_metadata.KEY_CLASSES: classes}))


def test_unknown_preprocessing_names_the_provided_ones():
    with pytest.raises(ModelError, match=f"provides {PRE}"):
        _parse(_meta(**{model_metadata.KEY_PREPROCESSING: "other-v9"}))


def test_checks_hold_under_python_O():
    """The same refusals in an optimised interpreter, where an assert would have vanished."""
    code = (
        "import json; from pathlib import Path; from batchwbc.engine import model_metadata as m\n"
        "base = {m.KEY_FORMAT: m.FORMAT_VERSION, m.KEY_CLASSES: json.dumps(['lymphocyte']),\n"
        "        m.KEY_INPUT_SIZE: '64', m.KEY_PREPROCESSING: 'p', m.KEY_MODEL_VERSION: 'v'}\n"
        "for key, bad in ((m.KEY_INPUT_SIZE, '4'), (m.KEY_CLASSES, json.dumps({'lymphocyte': 0}))):\n"
        "    try:\n"
        "        m.parse_metadata({**base, key: bad}, Path('x.onnx'), '', {'p'})\n"
        "    except m.ModelError:\n"
        "        print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["refused", "refused"]


def test_model_module_re_exports_the_contract():
    from batchwbc.engine import model

    for name in ("FORMAT_VERSION", "KEY_CLASSES", "KEY_INPUT_SIZE", "REQUIRED_KEYS", "ModelInfo", "ModelError"):
        assert getattr(model, name) is getattr(model_metadata, name)
