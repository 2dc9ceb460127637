"""The fit stage's CPU levers (issue 18): TensorFlow thread pools, frozen early Lite0 stages,
a linear head on the pooled features, and a run that continues after an interruption."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("tensorflow")


def test_freezing_early_blocks_freezes_exactly_the_stem_and_those_blocks():
    import keras

    from train.fit import frozen_early_layers
    from train.models import build_core

    keras.utils.set_random_seed(0)
    core, backbone = build_core("efficientnet_lite0", 64, 13, "none", dense=0)
    names = frozen_early_layers(backbone, 5)
    assert names and all(n.startswith(("conv_stem", "bn0", "blocks_0_", "blocks_1_", "blocks_2_", "blocks_3_", "blocks_4_"))
                         for n in names)
    assert any(n.startswith("blocks_4_") for n in names) and not any(n.startswith("blocks_5_") for n in names)
    frozen = {layer.name for layer in backbone.layers if not layer.trainable and layer.weights}
    assert frozen == set(names)
    assert backbone.get_layer("blocks_5_depthwise_conv").trainable and backbone.get_layer("conv_head").trainable


def test_freezing_more_blocks_than_the_network_has_is_refused():
    import keras

    from train.config import TrainingError
    from train.fit import frozen_early_layers
    from train.models import build_core

    keras.utils.set_random_seed(0)
    _, backbone = build_core("efficientnet_lite0", 64, 13, "none")
    with pytest.raises(TrainingError, match="too large"):
        frozen_early_layers(backbone, 40)


def test_a_linear_head_puts_the_logits_on_the_pooled_features():
    """dense=0: the last layer's input is the backbone's 1,280 pooled features, the embedding
    `batchwbc adapt` refits on; the default keeps the 256-wide hidden layer."""
    import keras

    from train.models import build_core

    keras.utils.set_random_seed(0)
    linear, _ = build_core("efficientnet_lite0", 64, 13, "none", dense=0)
    hidden, _ = build_core("efficientnet_lite0", 64, 13, "none")
    assert linear.get_layer("logits").input.shape[-1] == 1280
    assert hidden.get_layer("logits").input.shape[-1] == 256
    assert "head_dense" not in {layer.name for layer in linear.layers}


def _train(data, out, epochs: int, extra: tuple[str, ...] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "train", "--data", str(data), "--out", str(out), "--limit-per-class", "3", "--size", "32",
         "--epochs", str(epochs), "--batch-size", "8", "--lr-schedule", "cosine", "--tf-threads", "1,1", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_an_interrupted_run_continues_where_it_stopped(shared_data, tmp_path):
    """A run killed after its 2nd epoch (a lost session) continues from epoch 3 when the same
    command is run again: the backup holds weights, optimizer and epoch; history.csv keeps the
    first epochs; the best model so far is not overwritten by a worse one."""
    out = tmp_path / "run"
    stop = tmp_path / "stop_after_2.py"
    stop.write_text(
        "import runpy, sys, keras\n"
        "class Stop(keras.callbacks.Callback):\n"
        "    def on_epoch_end(self, epoch, logs=None):\n"
        "        if epoch == 1: raise SystemExit(9)\n"
        "orig = keras.Model.fit\n"
        "def fit(self, *a, callbacks=None, **k):\n"
        "    return orig(self, *a, callbacks=list(callbacks or []) + [Stop()], **k)\n"
        "keras.Model.fit = fit\n"
        "sys.argv = ['train'] + sys.argv[1:]\n"
        "runpy.run_module('train', run_name='__main__')\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    args = ["--data", str(shared_data), "--out", str(out), "--limit-per-class", "3", "--size", "32", "--epochs", "4",
            "--batch-size", "8", "--lr-schedule", "cosine", "--tf-threads", "1,1"]
    first = subprocess.run([sys.executable, str(stop), *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 9, first.stdout[-1500:] + first.stderr[-1500:]
    assert (out / "backup" / "fine-tune").is_dir()
    with open(out / "history.csv", newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["0", "1"]
    second = _train(shared_data, out, 4)
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    assert "continuing the interrupted run" in second.stdout
    with open(out / "history.csv", newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["0", "1", "2", "3"]
    assert not any((out / "backup").iterdir())  # a finished run leaves no backup behind
    assert (out / "run.json").is_file()
