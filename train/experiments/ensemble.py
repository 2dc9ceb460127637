"""`ensemble`: would averaging several models' probabilities help, across input sizes?"""
from __future__ import annotations

import click
import numpy as np

from ..calibration import log_softmax
from ..options import data_folder, keras_models, split_csv
from .common import accuracy_line, dihedral_logits, load_keras, split_data


@click.command("ensemble")
@keras_models
@data_folder
@split_csv
@click.option("--views", type=click.Choice(["1", "8"]), default="1", show_default=True, help="8 = each model's logits averaged over flips and quarter turns.")
def command(model_paths, data_root, split_csv, views):
    """Validation accuracy of each model and of their averaged log-probabilities; each model sees
    the crops at its own input size and contract, so models of different resolutions combine."""
    total, y = None, None
    for p in model_paths:
        m = load_keras(p)
        (x, y_, _), = split_data(data_root, split_csv, int(m.input_shape[1]), ("val",), p).values()
        if y is not None and not np.array_equal(y, y_):
            raise click.ClickException("the models' validation crops differ")
        y = y_
        lp = log_softmax(dihedral_logits(m, x, int(views)))
        click.echo(f"{p} ({m.input_shape[1]} px, {views} view(s)): {accuracy_line(lp, y)}")
        total = lp if total is None else total + lp
    click.echo(f"average of {len(model_paths)}: {accuracy_line(total, y)}")
