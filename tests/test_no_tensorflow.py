"""The lab PC has no TensorFlow: neither `import batchwbc` nor a full run (main process and
spawned decode workers) may import tensorflow, keras or tf2onnx."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tinymodel

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "tf_keras", "tensorboard")

# Installed for every Python process started with this PYTHONPATH (spawned workers included):
# any attempt to import a forbidden package is written to a log file and refused.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os, sys
    _FORBIDDEN = {forbidden!r}
    _LOG = {log!r}

    class _Guard:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _FORBIDDEN:
                with open(_LOG, "a") as fh:
                    fh.write(f"{{os.getpid()}} {{name}}\\n")
                raise ImportError(f"{{name}} is forbidden in the batchwbc runtime")
            return None

    sys.meta_path.insert(0, _Guard())
    """
)


def guarded_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "forbidden.log"
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(forbidden=FORBIDDEN, log=str(log)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env, log


def test_guard_itself_catches_a_tensorflow_import(tmp_path):
    """Proves the check can fail: the guard sees (and logs) a forbidden import."""
    env, log = guarded_env(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import keras"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "keras" in log.read_text()


def test_import_batchwbc_and_all_runtime_modules(tmp_path):
    env, log = guarded_env(tmp_path)
    code = (
        "import pkgutil, importlib, sys, batchwbc\n"
        "for m in pkgutil.walk_packages(batchwbc.__path__, 'batchwbc.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert not log.exists(), log.read_text()


@pytest.mark.parametrize("module", ["train", "train.experiments", "train.diagnose", "train.robustness", "train.probe", "train.packed"])
def test_training_clis_answer_help_without_tensorflow(tmp_path, module):
    """The TensorFlow side imports it only when it trains or loads a model: --help stays instant."""
    env, log = guarded_env(tmp_path)
    r = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr[-1500:]
    assert not log.exists(), log.read_text()


def test_full_run_with_worker_processes_never_imports_tensorflow(tmp_path):
    env, log = guarded_env(tmp_path)
    model = tinymodel.build(tmp_path / "tiny.onnx")
    out = tmp_path / "r.xlsx"
    r = subprocess.run(
        [sys.executable, "-m", "batchwbc", "run", str(REPO / "samples" / "slides"), "--out", str(out),
         "--model", str(model), "--workers", "2", "--cells-csv", str(tmp_path / "c.csv")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert not log.exists(), f"forbidden imports: {log.read_text()}"


def test_evaluate_with_worker_processes_never_imports_tensorflow(tmp_path):
    """`batchwbc evaluate` runs on the lab PC with the runtime install only (issue 14)."""
    import cv2
    import numpy as np

    env, log = guarded_env(tmp_path)
    model = tinymodel.build(tmp_path / "tiny.onnx")
    for cls in ("lymphocyte", "monocyte"):
        for i in range(3):
            (tmp_path / "LAB" / cls / f"P{i}").mkdir(parents=True)
            cv2.imwrite(str(tmp_path / "LAB" / cls / f"P{i}" / "c.png"),
                        np.full((40, 40, 3), tinymodel.colour_for(cls)[::-1], np.uint8))
    out = tmp_path / "e.xlsx"
    r = subprocess.run(
        [sys.executable, "-m", "batchwbc", "evaluate", str(tmp_path / "LAB"), "--out", str(out),
         "--model", str(model), "--workers", "2", "--json", str(tmp_path / "e.json")],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    assert not log.exists(), f"forbidden imports: {log.read_text()}"


def test_verify_and_labelled_export_never_import_tensorflow(tmp_path):
    """`batchwbc verify` reads a report, recounts and exports crops: no model, no TensorFlow."""
    env, log = guarded_env(tmp_path)
    model = tinymodel.build(tmp_path / "tiny.onnx")
    report, verified = tmp_path / "r.xlsx", tmp_path / "v.xlsx"
    for args in (["run", str(REPO / "samples" / "slides"), "--out", str(report), "--model", str(model), "--workers", "0"],
                 ["verify", str(report), "--out", str(verified), "--model", str(model),
                  "--export-labelled", str(tmp_path / "labelled")]):
        r = subprocess.run([sys.executable, "-m", "batchwbc", *args], env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=180)
        assert r.returncode == 0, r.stderr
    assert verified.is_file() and (tmp_path / "labelled" / "labels.csv").is_file()
    assert not log.exists(), f"forbidden imports: {log.read_text()}"


@pytest.mark.parametrize("module", ["batchwbc.cli", "batchwbc.engine.pipeline", "batchwbc.simulate", "batchwbc.outputs.workbook",
                                    "batchwbc.commands.verify", "batchwbc.outputs.workbook_reader", "batchwbc.core.verification",
                                    "batchwbc.outputs.labelled_export", "batchwbc.outputs.row_checks",
                                    "batchwbc.core.agreement", "batchwbc.commands.evaluate", "batchwbc.outputs.evaluation_workbook",
                                    "batchwbc.inputs.labelled_folders", "batchwbc.commands.adapt", "batchwbc.engine.onnx_graph", "batchwbc.engine.embed",
                                    "batchwbc.adaptation.head_fit", "export.embedding"])
def test_sources_do_not_name_tensorflow_imports(module):
    """A cheap static check that also covers code paths the run above did not take."""
    import importlib

    src = Path(importlib.import_module(module).__file__).read_text(encoding="utf-8")
    for name in FORBIDDEN:
        assert f"import {name}" not in src and f"from {name}" not in src


def test_adapt_info_and_export_embedding_never_import_tensorflow(tmp_path):
    """The lab PC adapts with the runtime install only: export.embedding, adapt and info."""
    import cv2
    import numpy as np

    env, log = guarded_env(tmp_path)
    plain = tinymodel.build(tmp_path / "plain.onnx", sharpness=10.0)
    model = tmp_path / "tiny.onnx"
    lab = tmp_path / "lab"
    for k, cls in enumerate(("lymphocyte", "monocyte")):
        for p in ("P1", "P2", "P3"):
            for i in range(4):
                (lab / cls / p).mkdir(parents=True, exist_ok=True)
                img = np.full((40, 40, 3), tinymodel.colour_for(cls)[::-1], np.uint8)
                img[i, i] = 128  # distinct files
                cv2.imwrite(str(lab / cls / p / f"{i}.png"), img)
    out = tmp_path / "lab.onnx"
    for args in (["-m", "export.embedding", str(plain), "--out", str(model)],
                 ["-m", "batchwbc", "adapt", str(lab), "--out", str(out), "--model", str(model), "--workers", "1", "--force"],
                 ["-m", "batchwbc", "info", "--model", str(out)]):
        r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, (args, r.stderr[-1500:])
    assert "Adapted" in r.stdout
    assert not log.exists(), f"forbidden imports: {log.read_text()}"
