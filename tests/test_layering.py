"""The runtime's layering, held by tests: packages import only the packages below them, light
modules stay light, flags come from one table."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from batchwbc.core import config, flags
from batchwbc.core.config import ConfigError
from batchwbc.core.differential import summarize
from batchwbc.core.flags import FLAG_RULES, PERCENT, WARNING, FlagRule
from batchwbc.core.records import CellResult

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("numpy", "onnxruntime", "cv2", "batchwbc.engine.preprocess")
RUNTIME = REPO / "batchwbc"

#: The packages each package may import at run time (imports under `if TYPE_CHECKING:` do not run
#: and are not counted). The folder tree is the architecture: ops knows nothing about cells, core
#: is arithmetic on records, engine and inputs produce records, outputs format them, commands
#: compose everything and cli.py is the click layer over commands.
ALLOWED_PACKAGES: dict[str, set[str]] = {
    "ops": set(),
    "core": {"engine"},  # only the light engine modules below
    "engine": {"core", "inputs", "ops"},
    "inputs": {"core", "engine"},
    "adaptation": {"core", "engine"},
    "outputs": {"core", "engine", "inputs"},
    "commands": {"core", "engine", "inputs", "adaptation", "outputs", "ops"},
}
#: What core takes from engine: metadata keys, the UNCLASSIFIED label and the data-shift decision
#: record; none of them loads numpy or onnxruntime at import (the probe below holds that).
CORE_FROM_ENGINE = {"batchwbc.engine.model_metadata", "batchwbc.engine.ood", "batchwbc.engine.data_shift"}
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "cli.py", "simulate.py"}


def _runtime_imports(path: Path) -> set[str]:
    """The batchwbc modules a file imports when it runs (lazy imports included, TYPE_CHECKING not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "batchwbc":
            if node.level:
                raise AssertionError(f"{path}: relative import; the runtime uses absolute batchwbc.pkg.mod imports")
            found.update(f"{node.module}.{a.name}" if node.module.count(".") < 2 else node.module for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the runtime uses absolute batchwbc.pkg.mod imports")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "batchwbc")
    return found


def test_the_runtime_is_packages_by_role():
    """No new flat modules: everything but the entry points lives in a package named for its role."""
    flat = {p.name for p in RUNTIME.glob("*.py")}
    assert flat == TOP_LEVEL_MODULES, sorted(flat - TOP_LEVEL_MODULES)
    packages = {p.name for p in RUNTIME.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED_PACKAGES) | {"models"}
    for name in ALLOWED_PACKAGES:
        doc = ast.get_docstring(ast.parse((RUNTIME / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc, f"batchwbc/{name}/__init__.py says what the package is for"


@pytest.mark.parametrize("package", sorted(ALLOWED_PACKAGES))
def test_packages_import_only_the_packages_below_them(package):
    bad = []
    for path in sorted((RUNTIME / package).rglob("*.py")):
        for name in _runtime_imports(path):
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target in (package, "__version__"):
                continue
            if target not in ALLOWED_PACKAGES[package]:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
            elif package == "core" and target == "engine" and ".".join(parts[:3]) not in CORE_FROM_ENGINE:
                bad.append(f"{path.relative_to(REPO)} imports {name} (core takes only {sorted(CORE_FROM_ENGINE)})")
    assert not bad, "\n".join(bad)


def test_only_the_click_layer_imports_commands():
    importers = sorted(str(p.relative_to(REPO)) for p in RUNTIME.rglob("*.py")
                       if "commands" not in p.parts and any(n.startswith("batchwbc.commands") for n in _runtime_imports(p)))
    assert importers == ["batchwbc/cli.py"]


@pytest.mark.parametrize("modules", [
    ("batchwbc.core.differential", "batchwbc.core.flags", "batchwbc.outputs.workbook"),
    ("batchwbc.core.summary", "batchwbc.engine.model_metadata", "batchwbc.core.records", "batchwbc.core.config"),
    ("batchwbc.cli", "batchwbc.commands.run"),
    ("batchwbc.commands.verify", "batchwbc.outputs.workbook_reader", "batchwbc.core.verification", "batchwbc.outputs.row_checks",
     "batchwbc.outputs.labelled_export"),
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
    code = f"import sys, batchwbc.engine.model\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "numpy" in out.stdout and "batchwbc.engine.preprocess" in out.stdout


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
