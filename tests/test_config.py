"""Config loading: defaults, partial overrides, and one-sentence errors for every kind of mistake."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchwbc.core import catalogue, config
from batchwbc.core.config import DEFAULT_SETTINGS, ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "config-example.toml"


def write(tmp_path: Path, text: str, name: str = "lab.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_none_gives_defaults():
    s = load_settings(None)
    assert s == DEFAULT_SETTINGS
    assert (s.blasts_high_pct, s.ig_high_pct, s.min_wbc, s.review_threshold) == (20.0, 2.0, 100, None)


def test_example_file_loads_and_documents_exactly_the_defaults():
    s = load_settings(EXAMPLE)
    assert s == DEFAULT_SETTINGS
    text = EXAMPLE.read_text(encoding="utf-8")
    for table in config._SCHEMA.values():
        for key in table:
            assert f"{key} =" in text, f"{key} is not documented in the example config"
    for cid in catalogue.WBC_CLASS_IDS:
        assert f"{cid} =" in text


def test_schema_covers_every_setting():
    in_schema = {attr for table in config._SCHEMA.values() for attr, _, _ in table.values()}
    assert in_schema | {"reference_ranges", "set_by_config", "lis"} == {f.name for f in dataclasses.fields(Settings)}


def test_partial_file_overrides_only_what_it_names(tmp_path):
    p = write(tmp_path, """
[flags]
blasts_high_pct = 10
[review]
threshold = 0.75
[reference_ranges]
lymphocyte = [18, 45.5]
basophil = []
""")
    s = load_settings(p)
    assert s.blasts_high_pct == 10.0 and isinstance(s.blasts_high_pct, float)
    assert s.review_threshold == 0.75
    assert s.reference_range("lymphocyte") == (18.0, 45.5)
    assert s.reference_range("basophil") is None
    assert s.reference_range("monocyte") == DEFAULT_SETTINGS.reference_range("monocyte")
    assert s.ig_high_pct == DEFAULT_SETTINGS.ig_high_pct and s.min_wbc == DEFAULT_SETTINGS.min_wbc


def test_settings_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SETTINGS.blasts_high_pct = 5.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        DEFAULT_SETTINGS.reference_ranges["lymphocyte"] = (0, 1)  # type: ignore[index]


@pytest.mark.parametrize(
    "text,words",
    [
        ("[flags]\nblast_high_pct = 20\n", ["lab.toml", "flags.blast_high_pct", "unknown"]),
        ("[flag]\nblasts_high_pct = 20\n", ["lab.toml", "flag", "unknown"]),
        ("[flags]\nblasts_high_pct = 'twenty'\n", ["lab.toml", "flags.blasts_high_pct", "number"]),
        ("[flags]\nblasts_high_pct = 120\n", ["flags.blasts_high_pct", "0 to 100"]),
        ("[flags]\nig_high_pct = -1\n", ["flags.ig_high_pct"]),
        ("[flags]\nmin_wbc = 99.5\n", ["flags.min_wbc", "whole number"]),
        ("[flags]\nmin_wbc = true\n", ["flags.min_wbc", "whole number"]),
        ("[flags]\nblasts_present_min_count = 0\n", ["flags.blasts_present_min_count", ">= 1"]),
        ("[review]\nthreshold = 1.5\n", ["review.threshold", "probability"]),
        ("[review]\nthreshold = 0\n", ["review.threshold"]),
        ("[review]\nmax_images = -3\n", ["review.max_images"]),
        ("flags = 3\n", ["flags", "table"]),
        ("[reference_ranges]\nlymphocyte = [40, 20]\n", ["reference_ranges.lymphocyte", "low <= high"]),
        ("[reference_ranges]\nlymphocyte = [20]\n", ["reference_ranges.lymphocyte"]),
        ("[reference_ranges]\nlymphocyte = '20-40'\n", ["reference_ranges.lymphocyte"]),
        ("[reference_ranges]\nplasma_cell = [0, 1]\n", ["reference_ranges.plasma_cell", "unknown"]),
        ("[reference_ranges]\nerythroblast = [0, 1]\n", ["reference_ranges.erythroblast", "leukocyte"]),
        ("[flags\nmin_wbc = 1\n", ["lab.toml", "not valid TOML"]),
    ],
)
def test_mistakes_are_one_sentence_errors_naming_file_and_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text))
    msg = str(exc.value)
    for w in words:
        assert w in msg
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="does not exist or is not a file"):
        load_settings(tmp_path)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.toml"):
        load_settings(bad)


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.toml"
    p.write_bytes("\ufeff[flags]\nmin_wbc = 200\n".encode("utf-8"))
    assert load_settings(p).min_wbc == 200


def test_describe_reports_every_threshold_as_configured(tmp_path):
    s = load_settings(write(tmp_path, "[flags]\nig_high_pct = 3.5\nmin_wbc = 200\n[review]\nthreshold = 0.55\n"))
    rows = dict(s.describe())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in s.describe())
    values = list(rows.values())
    assert "3.5" in values and "200" in values and "0.55" in values
    assert any("ig_high_pct" in k for k in rows)
    assert "model default" in dict(DEFAULT_SETTINGS.describe()).values()
    assert sum(1 for k in rows if k.startswith("Reference range")) == len(catalogue.WBC_CLASS_IDS)
