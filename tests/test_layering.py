"""The runtime's layering, held by tests: light modules stay light, flags come from one table."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from batchwbc import config, flags
from batchwbc.config import ConfigError
from batchwbc.differential import summarize
from batchwbc.flags import FLAG_RULES, PERCENT, WARNING, FlagRule
from batchwbc.results import CellResult

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "onnxruntime", "cv2", "batchwbc.preprocess")


@pytest.mark.parametrize("modules", [
    ("batchwbc.differential", "batchwbc.flags", "batchwbc.report"),
    ("batchwbc.summary", "batchwbc.modelmeta", "batchwbc.results", "batchwbc.config"),
    ("batchwbc.cli", "batchwbc.job"),
    ("batchwbc.verifyjob", "batchwbc.reportread", "batchwbc.verification", "batchwbc.rowcheck",
     "batchwbc.labelexport"),
])
def test_reporting_modules_import_no_inference_stack(modules):
    """Reading a differential, flagging it and formatting a report need no numpy, no OpenCV,
    no onnxruntime and no preprocessing; the CLI and job layer load them only when running."""
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", f"{modules} loaded {out.stdout.strip()}"


def test_the_probe_can_fail():
    """The same probe sees numpy when a module that needs it is imported (the test is not vacuous)."""
    code = f"import sys, batchwbc.model\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "numpy" in out.stdout and "batchwbc.preprocess" in out.stdout


# ------------------------------------------------------------------- one flag-rule table

def _platelets_many(diff, threshold):
    """A made-up rule for the test: many platelets (any count would do)."""
    if diff.platelets * 100 > threshold * max(diff.n_cells, 1):
        return f"Platelets {diff.platelets} > {threshold:g}%"
    return None


NEW_RULE = FlagRule("PLATELETS_MANY", WARNING, "platelets_high_pct", 30.0, PERCENT, "platelets > (% of cells)",
                    _platelets_many, "test rule")


def test_a_rule_added_to_the_table_is_a_setting_a_config_key_and_a_documented_row():
    rules = (*FLAG_RULES, NEW_RULE)
    cls = config.make_settings_class(rules)
    assert "platelets_high_pct" in {f.name for f in dataclasses.fields(cls)}
    s = cls()
    assert s.platelets_high_pct == 30.0

    schema = config.make_schema(rules)
    attr, parse, expected = schema["flags"]["platelets_high_pct"]
    assert attr == "platelets_high_pct" and parse(12) == 12.0 and parse(101) is None and "0 to 100" in expected

    rows = dict(s.describe())
    assert rows["Flag PLATELETS_MANY: platelets > (% of cells) [flags.platelets_high_pct]"] == "30"

    cells = [CellResult("P", f"P/{i}.jpg", "platelet" if i < 40 else "lymphocyte", 0.9, "monocyte", 0.05, False)
             for i in range(100)]
    raised = [f.code for f in flags.evaluate(summarize(cells), s)]
    assert "PLATELETS_MANY" in raised
    assert "PLATELETS_MANY" not in [f.code for f in flags.evaluate(summarize(cells), dataclasses.replace(s, platelets_high_pct=50.0))]


def test_every_rule_is_in_the_live_schema_settings_and_run_sheet_rows():
    described = dict(config.DEFAULT_SETTINGS.describe())
    for rule in FLAG_RULES:
        assert rule.setting in config._SCHEMA["flags"]
        assert getattr(config.DEFAULT_SETTINGS, rule.setting) == rule.default
        assert f"Flag {rule.code}: {rule.meaning} [flags.{rule.setting}]" in described


def test_a_config_value_is_checked_by_its_rule():
    with pytest.raises(ConfigError, match="flags.min_wbc must be a whole number >= 0"):
        config.settings_from_dict({"flags": {"min_wbc": -1}})
    with pytest.raises(ConfigError, match="flags.blasts_present_min_count must be a whole number >= 1"):
        config.settings_from_dict({"flags": {"blasts_present_min_count": 0}})
    with pytest.raises(ConfigError, match="flags.ig_high_pct must be a number from 0 to 100"):
        config.settings_from_dict({"flags": {"ig_high_pct": float("nan")}})
    assert config.settings_from_dict({"flags": {"ig_high_pct": 5}}).ig_high_pct == 5.0
