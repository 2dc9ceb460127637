"""Training on a lent GPU machine (docs/training.md): the run's training set packed as it
would be fitted, the leave-one-source-out twin cut from the same split, and a model.keras small
enough for the trip back. The machine itself is never needed here."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import REPO
from train.config import TrainingError
from train.fit import leave_out


def test_leaving_a_source_out_drops_its_training_and_validation_rows_only():
    sources = ["A", "B", "A", "B", "A", "B"]
    idx = {"train": np.array([0, 1]), "val": np.array([2, 3]), "test": np.array([4, 5])}
    kept = leave_out(idx, sources, "B")
    assert kept["train"].tolist() == [0] and kept["val"].tolist() == [2]
    assert kept["test"].tolist() == [4, 5]  # the twin is still tested on the left-out source


def test_leaving_out_a_source_the_data_does_not_hold_is_refused():
    with pytest.raises(TrainingError, match="no crop comes from source 'C'"):
        leave_out({"train": np.array([0]), "val": np.array([], int), "test": np.array([], int)}, ["A"], "C")


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "train", "--size", "32", "--batch-size", "8", "--tf-threads", "1,1", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_a_packed_training_set_trains_the_model_and_its_twin_on_the_same_split(shared_data, tmp_path):
    """--pack-to writes the training crops as fitted (degraded ones in place) and the validation
    crops, never the test crops; a --train-only run on the pack with --leave-out-source trains
    the twin on the other sources' rows of that split, and saves its model without the
    optimizer's state."""
    pytest.importorskip("tensorflow")
    from train import packed

    pack = tmp_path / "pack.npz"
    prep = _train("--data", str(shared_data), "--out", str(tmp_path / "prep"), "--limit-per-class", "4", "--degrade", "0.5",
                  "--pack-to", str(pack))
    assert prep.returncode == 0, prep.stdout[-1500:] + prep.stderr[-1500:]
    images, labels, sources, paths, split, _ = packed.unpack(pack)
    full = _rows(tmp_path / "prep" / "split.csv")
    expected = {r["path"]: r["split"] for r in full if r["split"] != "test"}
    assert dict(zip(paths, split)) == expected and "test" not in split
    assert "degraded" in prep.stdout and images.shape[1:] == (32, 32, 3)

    leave = sorted(set(sources))[0]
    twin = _train("--data", str(pack), "--out", str(tmp_path / "twin"), "--epochs", "1", "--train-only",
                  "--leave-out-source", leave, "--augment-workers", "2")
    assert twin.returncode == 0, twin.stdout[-1500:] + twin.stderr[-1500:]
    used = _rows(tmp_path / "twin" / "split.csv")
    assert used and all(r["source"] != leave for r in used if r["split"] in ("train", "val"))
    with zipfile.ZipFile(tmp_path / "twin" / "model.keras") as z:
        config = json.loads(z.read("config.json"))
    assert not config.get("compile_config")  # a compiled model would carry its optimizer's state too


def test_a_model_trained_with_keras_on_jax_loads_in_tensorflow_with_the_same_outputs(tmp_path):
    """What makes the lent machine usable: it has JAX, not TensorFlow. The project's layers are
    keras.ops only, so a core saved under JAX must give TensorFlow's runtime the same logits."""
    jax_ok = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True).returncode == 0
    if not jax_ok:
        pytest.skip("JAX is not installed here (it is on the lent GPU machine).")
    pytest.importorskip("tensorflow")
    script = (
        "import sys, numpy as np, keras\n"
        "import train.layers\n"
        "from train.models import build_core\n"
        "x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype('float32')\n"
        "if sys.argv[1] == 'save':\n"
        "    keras.utils.set_random_seed(0)\n"
        "    core, _ = build_core('efficientnet_lite0', 32, 13, 'none', dense=0)\n"
        "    core.save(sys.argv[2])\n"
        "else:\n"
        "    core = keras.saving.load_model(sys.argv[2], compile=False)\n"
        "np.save(sys.argv[3], np.asarray(core.predict(x, verbose=0)))\n")
    path, a, b = tmp_path / "m.keras", tmp_path / "jax.npy", tmp_path / "tf.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for backend, mode, out in (("jax", "save", a), ("tensorflow", "load", b)):
        r = subprocess.run([sys.executable, "-c", script, mode, str(path), str(out)], env={**env, "KERAS_BACKEND": backend},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-1500:]
    np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-4)
