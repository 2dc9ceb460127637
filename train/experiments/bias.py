"""`bias`: the most a model can gain by re-weighting its classes after training, estimated
honestly (biases fitted on the other folds)."""
from __future__ import annotations

import click
import numpy as np

from ..calibration import log_softmax
from ..options import model_and_data
from .common import accuracy_line, load_keras, predict, split_data


def fit_temperature_and_bias(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Temperature and per-class logit offsets (last class fixed at 0) minimising the NLL: the
    most a model can gain by re-weighting its classes after training."""
    from scipy.optimize import minimize

    k = logits.shape[1]

    def nll(p):
        q = log_softmax(logits / p[0] + np.r_[p[1:], 0.0])
        return -q[np.arange(len(y)), y].mean()

    r = minimize(nll, np.r_[1.0, np.zeros(k - 1)], method="L-BFGS-B", bounds=[(0.05, 20)] + [(None, None)] * (k - 1))
    return float(r.x[0]), np.r_[r.x[1:], 0.0]


def cross_validated_bias_predictions(logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Class predictions with biases fitted on the other folds: an honest estimate of the gain."""
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    pred = np.empty(len(y), dtype=int)
    for f in range(folds):
        t, b = fit_temperature_and_bias(logits[fold != f], y[fold != f])
        pred[fold == f] = (logits[fold == f] / t + b).argmax(axis=1)
    return pred


@click.command("bias")
@model_and_data
@click.option("--folds", type=int, default=5, show_default=True)
def command(model_path, data_root, split_csv, size, folds):
    """Validation accuracy with a temperature and per-class biases fitted on the other folds."""
    (x, y, _), = split_data(data_root, split_csv, size, ("val",), model_path).values()
    lg = predict(load_keras(model_path), x)
    click.echo(f"as trained:            {accuracy_line(lg, y)}")
    pred = cross_validated_bias_predictions(lg, y, folds)
    click.echo(f"{folds}-fold fitted biases: {accuracy_line(np.eye(lg.shape[1])[pred], y)}")
