"""`margin`: does the model depend on the framing margin it was trained with (ADR 0005)?

The margin is passed to the decoding as an argument (`batchwbc.engine.preprocess.to_model_input`),
never patched into the contract's constant, so the answer holds however decoding is run."""
from __future__ import annotations

import click

from ..options import model_and_data
from .common import accuracy_line, load_keras, predict, split_data


@click.command("margin")
@model_and_data
@click.option("--margins", default="1.4,1.5,1.6,1.7,1.8,2.0", show_default=True)
def command(model_path, data_root, split_csv, size, margins):
    """Validation accuracy when the cell square's margin differs from the contract's (1.8)."""
    try:
        chosen = [float(v) for v in margins.split(",")]
    except ValueError:
        raise click.BadParameter("must be numbers separated by commas, e.g. 1.4,1.8.", param_hint="--margins") from None
    m = load_keras(model_path)
    for mg in chosen:
        (x, y, _), = split_data(data_root, split_csv, size, ("val",), model_path, margin=mg).values()
        click.echo(f"margin {mg:.2f}: {accuracy_line(predict(m, x), y)}")
