"""MANY_LOW_CONFIDENCE is judged against the share of cells the model itself sends to review on
its validation data (model metadata batchwbc.review_share_pct), unless the config sets it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc.core import config
from batchwbc.engine import model_metadata
from batchwbc.cli import main
from batchwbc.outputs.workbook_reader import read_report, settings_from_run

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "slides"


def test_the_model_share_replaces_the_default_but_never_a_configured_value():
    default = config.DEFAULT_SETTINGS
    assert config.with_model_defaults(default, 34.56).low_confidence_high_pct == 34.6
    assert config.with_model_defaults(default, None) is default
    configured = config.settings_from_dict({"flags": {"low_confidence_high_pct": 20.0}})
    assert "low_confidence_high_pct" in configured.set_by_config
    assert config.with_model_defaults(configured, 34.56).low_confidence_high_pct == 20.0
    other = config.settings_from_dict({"flags": {"min_wbc": 50}})
    assert config.with_model_defaults(other, 34.56).low_confidence_high_pct == 34.6


def test_model_metadata_carries_the_share(tmp_path):
    m = tinymodel.build(tmp_path / "m.onnx", metadata={model_metadata.KEY_REVIEW_SHARE: "31.5"})
    from batchwbc.engine.model import Classifier

    info = Classifier(str(m)).info
    assert info.review_share_pct == pytest.approx(31.5)
    assert Classifier(str(tinymodel.build(tmp_path / "plain.onnx"))).info.review_share_pct is None
    shown = CliRunner().invoke(main, ["info", "--model", str(m)], catch_exceptions=False)
    assert "31.5% (MANY_LOW_CONFIDENCE" in shown.output


@pytest.mark.parametrize("configured", [False, True])
def test_the_run_sheet_records_the_threshold_in_force(tmp_path, configured):
    m = tinymodel.build(tmp_path / "m.onnx", metadata={model_metadata.KEY_REVIEW_SHARE: "37.0"})
    out = tmp_path / "r.xlsx"
    args = ["run", str(SAMPLES), "--out", str(out), "--model", str(m), "--quiet"]
    if configured:
        cfg = tmp_path / "c.toml"
        cfg.write_text("[flags]\nlow_confidence_high_pct = 25\n")
        args += ["--config", str(cfg)]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code in (0, 1), r.output
    settings, _ = settings_from_run(read_report(out).run_rows)
    assert settings.low_confidence_high_pct == (25.0 if configured else 37.0)


def test_the_share_is_measured_at_the_stored_threshold():
    """export and adapt store the threshold with 2 decimals; the share is the one at that value."""
    from batchwbc.core.calibration import review_share_pct

    probs = np.array([[0.5, 0.5], [0.79, 0.21], [0.8, 0.2], [0.95, 0.05]])
    assert review_share_pct(probs, 0.8) == 50.0
    assert review_share_pct(probs, 0.8049) == 50.0  # stored as 0.80: the 0.80 cell is accepted
    assert review_share_pct(probs, 0.81) == 75.0
