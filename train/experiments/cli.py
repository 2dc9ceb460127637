"""The experiments' click group: one command per module of this package."""
from __future__ import annotations

import os

import click

from . import bias, ensemble, margin, probe, soup, teacher, tta, underfit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Questions about trained runs (train/experiments/); each judges models on a split's held-out rows."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


for _module in (underfit, soup, tta, ensemble, bias, teacher, margin, probe):
    main.add_command(_module.command)
