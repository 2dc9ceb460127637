"""The training and export CLIs end to end on a few real images, and their bad-input errors."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_WEIGHTS

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.slow


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_tiny_training_run_exports_with_parity(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    r = _run("train", "--data", str(shared_data), "--out", str(run_dir), "--limit-per-class", "4", "--size", "32",
             "--epochs", "1", "--batch-size", "8", "--preprocessing", "batchwbc-rgb-uint8-area-v1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("split.csv", "history.csv", "training_curves.png", "test_classification_report.txt", "test_metrics.json",
                 "test_confusion_matrix.png", "test_confusion_matrix.csv", "test_roc.png", "test_reliability.png",
                 "model.keras", "run.json", "dropped.csv"):
        assert (run_dir / name).is_file(), name
    assert "basophil" in r.stdout and "AML-LMU" in r.stdout  # the count table per class and source
    out = tmp_path / "m.onnx"
    r = _run("export", str(run_dir), "--out", str(out), "--parity-images", "8", "--data", str(shared_data))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "parity on 8 real test images" in r.stdout
    from batchwbc.core.catalogue import CLASS_IDS
    from batchwbc.engine.model import Classifier

    info = Classifier(out).info
    assert info.classes == CLASS_IDS and info.input_size == 32
    assert info.temperature is not None and info.review_threshold is not None
    assert "accuracy" in info.json_field("batchwbc.test_metrics")
    # the run's preprocessing (not the current default) travels into the model it exports
    assert info.preprocessing == "batchwbc-rgb-uint8-area-v1"
    assert '"preprocessing": "batchwbc-rgb-uint8-area-v1"' in (run_dir / "run.json").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data"], "does not exist"),
        (["--data", "{empty}"], "is empty"),
        (["--data", "{shared}", "--backbone", "vgg99"], "Invalid value for '--backbone'"),
        (["--data", "{shared}", "--weights", "/nonexistent.h5"], "does not exist"),
        (["--data", "{shared}", "--degrade-defocus", "2"], "needs --degrade"),
        (["--data", "{shared}", "--degrade", "0.5", "--degrade-recolour", "1.5"], "between 0 and 1"),
        (["--data", "{shared}", "--weights", "{weights}", "--backbone", "mobilenetv3small", "--limit-per-class", "2", "--size", "32"], "does not match backbone"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, message, tmp_path, shared_data):
    (tmp_path / "empty").mkdir()
    weights = SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5"
    if "{weights}" in args and not weights.is_file():
        pytest.skip("../shared/weights not present")
    args = [a.format(empty=tmp_path / "empty", shared=shared_data, weights=weights) for a in args]
    r = _run("train", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    assert message in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_offline_imagenet_weights_file_is_loaded():
    weights = SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5"
    if not weights.is_file():
        pytest.skip("../shared/weights not present")
    import h5py
    import numpy as np

    from train.models import build_core

    _, backbone = build_core("mobilenet_025", 128, 12, weights=str(weights))
    kernel = backbone.get_layer("conv1").kernel.numpy()
    with h5py.File(weights, "r") as fh:
        stored = []
        fh.visititems(lambda name, obj: stored.append(obj[()]) if name.startswith("conv1/") and "kernel" in name else None)
    assert stored and np.array_equal(kernel, stored[0])


def test_distillation_from_teacher_logits_end_to_end(shared_data, tmp_path):
    """A teacher's logits (train.experiments teacher) become a student's targets (train --teacher-logits)."""
    common = ["--data", str(shared_data), "--limit-per-class", "4", "--size", "32", "--batch-size", "8",
              "--backbone", "mobilenet_025"]
    r = _run("train", *common, "--out", str(tmp_path / "t"), "--epochs", "1", "--train-only", "--degrade", "0.5",
             "--degrade-mode", "add", "--degrade-defocus", "2", "--degrade-recolour", "0.5")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"degraded (\d+) of (\d+) training crops", r.stdout)
    assert m and 0 < int(m.group(1)) < int(m.group(2)), r.stdout[-2000:]
    assert "defocus up to 2 px" in r.stdout
    assert re.search(r"[1-9]\d* recoloured like other crops", r.stdout), r.stdout[-2000:]
    assert '"train_only": true' in (tmp_path / "t" / "run.json").read_text()
    r = _run("train.experiments", "teacher", str(tmp_path / "t" / "model.keras"), "--data", str(shared_data),
             "--split", str(tmp_path / "t" / "split.csv"), "--size", "32", "--views", "5", "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "teacher on train" in r.stdout and "teacher on val" in r.stdout
    r = _run("train", *common, "--out", str(tmp_path / "s"), "--epochs", "1", "--teacher-logits", str(tmp_path / "t.npz"),
             "--init-from", str(tmp_path / "t" / "model.keras"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "distilling from" in r.stdout
    import json

    record = json.loads((tmp_path / "s" / "run.json").read_text())
    assert 0 <= record["test_summary"]["accuracy"] <= 1 and record["temperature"] > 0
