"""`python -m train --data DIR --out runs/NAME [options]`: train, calibrate and evaluate.

Exit codes: 0 the run finished; 2 a bad option, combination of options, data folder or
weights file (one sentence on stderr, nothing trained); anything else is a crash and exits 1.
"""
from __future__ import annotations

import os
import sys

import click

from batchwbc.ops.exit_codes import USAGE

from .options import train_options


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(USAGE)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@train_options
def main(**opt) -> None:
    """Train a batchwbc classifier and write model, split, metrics and plots to --out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchwbc.inputs.public_datasets import DatasetError

    from .config import TrainConfig, TrainingError

    try:
        config = TrainConfig.from_options(opt)
    except TrainingError as exc:
        _fail(str(exc))
    from . import fit

    try:
        fit.run(config)
    except (DatasetError, TrainingError) as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
