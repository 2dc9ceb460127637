"""The training side's layering: `export` imports `train`, never the reverse (ADR 0008).

Why: the exporter turns a finished run into the runtime's model; if `train` needed `export`
(as `train.diagnose` once borrowed its image loader), the two could not change apart and an
experiment would drag tf2onnx in. Checked twice: every train module imported in a fresh
interpreter leaves no `export` module behind, and no source file under train/ names it in an
import statement (which also covers imports inside functions that importing does not run).
"""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

TRAIN = REPO / "train"


def _export_imports(source: str) -> list[str]:
    """The `import export...` / `from export... import` statements in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "export"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "export":
            found.append(node.module)
    return found


def test_the_scan_finds_an_export_import():
    """The scan can fail: it sees an import inside a function, in both spellings."""
    src = "def f():\n    from export.convert import to_onnx\n    import export.convert as c\n"
    assert _export_imports(src) == ["export.convert", "export.convert"]
    assert _export_imports("from .export import x\nimport exporter\n") == []


def test_no_train_source_imports_export():
    files = sorted(TRAIN.rglob("*.py"))
    assert len(files) > 15 and any(p.parent.name == "experiments" for p in files)
    offenders = {str(p.relative_to(REPO)): _export_imports(p.read_text(encoding="utf-8")) for p in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_importing_every_train_module_loads_no_export_module():
    pytest.importorskip("tensorflow")
    code = (
        "import importlib, pkgutil, sys, train\n"
        "names = [m.name for m in pkgutil.walk_packages(train.__path__, 'train.') if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'export' or m.startswith('export.'))\n"
        "print(len(names), 'train.experiments.cli' in names, bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    n, has_experiments, bad = r.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(n) > 15 and has_experiments == "True"
    assert bad == "[]", bad
