"""`tta`: what would test-time views (flips, quarter turns) buy?"""
from __future__ import annotations

import click

from ..options import model_and_data
from .common import accuracy_line, load_keras, split_data, views


@click.command("tta")
@model_and_data
def command(model_path, data_root, split_csv, size):
    """Validation accuracy with logits summed over flips / quarter turns (what N views would buy)."""
    (x, y, _), = split_data(data_root, split_csv, size, ("val",), model_path).values()
    base, flip, rots = views(load_keras(model_path), x)
    click.echo(f"1 view:              {accuracy_line(base, y)}")
    click.echo(f"2 views (h-flip):    {accuracy_line(base + flip, y)}")
    click.echo(f"4 views (rotations): {accuracy_line(base + sum(rots), y)}")
    click.echo(f"5 views (both):      {accuracy_line(base + sum(rots) + flip, y)}")
