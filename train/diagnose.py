"""`python -m train.diagnose`: questions about trained runs that no single run answers.

Why it exists: deciding what to try next for accuracy (ADR 0005) needed evidence, not
training curves - is the model under-fitting its own training set in evaluation mode, would
averaging the weights of sibling runs or test-time rotations help, does it depend on the
framing margin it was trained with. Each command decodes the data once through the shared
preprocessing and judges models only by evaluation-mode predictions.
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np

from batchwbc import catalogue
from batchwbc import preprocess as pp

from .calibration import log_softmax


def _split_data(data_root: str, split_csv: str, size: int, splits: tuple[str, ...], model_path: str):
    """{split: (uint8 images, labels, rows)} for those rows of a run's split.csv, decoded with the
    contract the model was trained with (its run.json) by the exporter's own loader."""
    from export.convert import load_images

    from .fit import resolve_preprocessing
    from .split import read_split_csv

    contract = resolve_preprocessing(None, model_path)
    out = {}
    for k in splits:
        rows = [r for r in read_split_csv(Path(split_csv)) if r["split"] == k]
        x, y, _ = load_images(Path(data_root), rows, size, contract)
        out[k] = (x, y, rows)
    return out


def _load(path: str):
    import keras

    import train.layers  # noqa: F401 - custom layers

    return keras.saving.load_model(path, compile=False)


def _acc(logits: np.ndarray, y: np.ndarray) -> str:
    p = logits.argmax(1)
    paper = y < len(catalogue.PAPER_CLASS_IDS)
    return f"accuracy {np.mean(p == y):.4f}, paper-10 {np.mean(p[paper] == y[paper]):.4f}"


def _predict(model, x: np.ndarray) -> np.ndarray:
    return model.predict(x.astype(np.float32), batch_size=128, verbose=0)


def _views(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Logits of the crop, of its horizontal flip and of its three quarter turns."""
    return _predict(model, x), _predict(model, x[:, :, ::-1]), [_predict(model, np.rot90(x, k, axes=(1, 2))) for k in (1, 2, 3)]


def dihedral_logits(model, x: np.ndarray, views: int) -> np.ndarray:
    """Mean logits over the crop (views=1) or its eight flips and quarter turns (views=8)."""
    if views == 1:
        return _predict(model, x)
    out = [_predict(model, np.ascontiguousarray(np.rot90(xf, k, axes=(1, 2))))
           for xf in (x, x[:, :, ::-1]) for k in range(4)]
    return np.mean(out, axis=0)


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


@click.group()
def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_data = click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False))
_split = click.option("--split", "split_csv", required=True, type=click.Path(exists=True, dir_okay=False))
_size = click.option("--size", type=int, required=True)


def _model_and_data(command):
    """The arguments every single-model question takes: MODEL_PATH --data --split --size."""
    for option in (_size, _split, _data, click.argument("model_path", type=click.Path(exists=True))):
        command = option(command)
    return command


@main.command("fit")
@_model_and_data
def fit_cmd(model_path, data_root, split_csv, size):
    """Evaluation-mode accuracy on the training split next to validation: under-fitting or over-fitting?"""
    d = _split_data(data_root, split_csv, size, ("train", "val"), model_path)
    m = _load(model_path)
    for k, (x, y, _) in d.items():
        click.echo(f"{k:5s} {_acc(_predict(m, x), y)}")


@main.command("soup")
@click.argument("model_paths", nargs=-1, required=True, type=click.Path(exists=True))
@_data
@_split
@_size
@click.option("--save", "save_path", default=None, type=click.Path(dir_okay=False), help="Also save the averaged model (a .keras file; finish it with `python -m train --resume PATH --epochs 0`).")
def soup_cmd(model_paths, data_root, split_csv, size, save_path):
    """Validation accuracy of each model and of the average of their weights (same architecture)."""
    (x, y, _), = _split_data(data_root, split_csv, size, ("val",), model_paths[0]).values()
    from train.models import build_core

    models = [_load(p) for p in model_paths]
    base = models[0]  # rebuilt at --size: the averaged models may have been trained at other sizes
    head_conv = base.get_layer("head_conv").filters if any(layer.name == "head_conv" for layer in base.layers) else 0
    core, _ = build_core(base.name.removeprefix("core_"), size, len(catalogue.CLASS_IDS), head_conv=head_conv)
    ws = [m.get_weights() for m in models]
    for p, w in zip(model_paths, ws):
        core.set_weights(w)
        click.echo(f"{p}: {_acc(_predict(core, x), y)}")
    core.set_weights([np.mean([w[i] for w in ws], axis=0) for i in range(len(ws[0]))])
    click.echo(f"weight average of {len(models)}: {_acc(_predict(core, x), y)}")
    if save_path:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        core.save(save_path)
        click.echo(f"saved {save_path}")


@main.command("tta")
@_model_and_data
def tta_cmd(model_path, data_root, split_csv, size):
    """Validation accuracy with logits summed over flips / quarter turns (what N views would buy)."""
    (x, y, _), = _split_data(data_root, split_csv, size, ("val",), model_path).values()
    base, flip, rots = _views(_load(model_path), x)
    click.echo(f"1 view:              {_acc(base, y)}")
    click.echo(f"2 views (h-flip):    {_acc(base + flip, y)}")
    click.echo(f"4 views (rotations): {_acc(base + sum(rots), y)}")
    click.echo(f"5 views (both):      {_acc(base + sum(rots) + flip, y)}")


@main.command("ensemble")
@click.argument("model_paths", nargs=-1, required=True, type=click.Path(exists=True))
@_data
@_split
@click.option("--views", type=click.Choice(["1", "8"]), default="1", show_default=True, help="8 = each model's logits averaged over flips and quarter turns.")
def ensemble_cmd(model_paths, data_root, split_csv, views):
    """Validation accuracy of each model and of their averaged log-probabilities; each model sees
    the crops at its own input size and contract, so models of different resolutions combine."""
    total, y = None, None
    for p in model_paths:
        m = _load(p)
        (x, y_, _), = _split_data(data_root, split_csv, int(m.input_shape[1]), ("val",), p).values()
        if y is not None and not np.array_equal(y, y_):
            raise click.ClickException("the models' validation crops differ")
        y = y_
        lp = log_softmax(dihedral_logits(m, x, int(views)))
        click.echo(f"{p} ({m.input_shape[1]} px, {views} view(s)): {_acc(lp, y)}")
        total = lp if total is None else total + lp
    click.echo(f"average of {len(model_paths)}: {_acc(total, y)}")


@main.command("bias")
@_model_and_data
@click.option("--folds", type=int, default=5, show_default=True)
def bias_cmd(model_path, data_root, split_csv, size, folds):
    """Validation accuracy with a temperature and per-class biases fitted on the other folds."""
    (x, y, _), = _split_data(data_root, split_csv, size, ("val",), model_path).values()
    lg = _predict(_load(model_path), x)
    click.echo(f"as trained:            {_acc(lg, y)}")
    pred = cross_validated_bias_predictions(lg, y, folds)
    click.echo(f"{folds}-fold fitted biases: {_acc(np.eye(lg.shape[1])[pred], y)}")


@main.command("teacher")
@_model_and_data
@click.option("--views", type=click.Choice(["1", "5"]), default="1", show_default=True, help="5 = logits averaged over the crop, its h-flip and three quarter turns.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Where to write the .npz for `python -m train --teacher-logits`.")
def teacher_cmd(model_path, data_root, split_csv, size, views, out_path):
    """Teacher logits for the training and validation crops of a split, keyed by crop path."""
    d = _split_data(data_root, split_csv, size, ("train", "val"), model_path)
    m = _load(model_path)
    paths, logits = [], []
    for k, (x, y, rows) in d.items():
        if views == "5":
            base, flip, rots = _views(m, x)
            lg = (base + flip + sum(rots)) / 5
        else:
            lg = _predict(m, x)
        click.echo(f"teacher on {k}: {_acc(lg, y)}")
        paths += [r["path"] for r in rows]
        logits.append(lg)
    np.savez_compressed(out_path, paths=np.array(paths), logits=np.concatenate(logits).astype(np.float32))


@main.command("margin")
@_model_and_data
@click.option("--margins", default="1.4,1.5,1.6,1.7,1.8,2.0", show_default=True)
def margin_cmd(model_path, data_root, split_csv, size, margins):
    """Validation accuracy when the cell square's margin differs from the contract's (1.8)."""
    m = _load(model_path)
    default = pp.CELL_MARGIN
    try:
        for mg in (float(v) for v in margins.split(",")):
            pp.CELL_MARGIN = mg  # the contract's constant, patched for this question only
            (x, y, _), = _split_data(data_root, split_csv, size, ("val",), model_path).values()
            click.echo(f"margin {mg:.2f}: {_acc(_predict(m, x), y)}")
    finally:
        pp.CELL_MARGIN = default


if __name__ == "__main__":
    main()
