"""`fit`: evaluation-mode accuracy on the training split next to validation - is the model
under-fitting (both low) or over-fitting (train far above val)?"""
from __future__ import annotations

import click

from ..options import model_and_data
from .common import accuracy_line, load_keras, predict, split_data


@click.command("fit")
@model_and_data
def command(model_path, data_root, split_csv, size):
    """Evaluation-mode accuracy on the training split next to validation: under-fitting or over-fitting?"""
    d = split_data(data_root, split_csv, size, ("train", "val"), model_path)
    m = load_keras(model_path)
    for k, (x, y, _) in d.items():
        click.echo(f"{k:5s} {accuracy_line(predict(m, x), y)}")
