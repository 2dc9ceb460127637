"""`teacher`: a model's logits per training/validation crop, the targets of a distilled run
(`python -m train --teacher-logits`)."""
from __future__ import annotations

import click
import numpy as np

from ..options import model_and_data
from .common import accuracy_line, load_keras, predict, split_data, views


@click.command("teacher")
@model_and_data
@click.option("--views", "n_views", type=click.Choice(["1", "5"]), default="1", show_default=True, help="5 = logits averaged over the crop, its h-flip and three quarter turns.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Where to write the .npz for `python -m train --teacher-logits`.")
def command(model_path, data_root, split_csv, size, n_views, out_path):
    """Teacher logits for the training and validation crops of a split, keyed by crop path."""
    d = split_data(data_root, split_csv, size, ("train", "val"), model_path)
    m = load_keras(model_path)
    paths, logits = [], []
    for k, (x, y, rows) in d.items():
        if n_views == "5":
            base, flip, rots = views(m, x)
            lg = (base + flip + sum(rots)) / 5
        else:
            lg = predict(m, x)
        click.echo(f"teacher on {k}: {accuracy_line(lg, y)}")
        paths += [r["path"] for r in rows]
        logits.append(lg)
    np.savez_compressed(out_path, paths=np.array(paths), logits=np.concatenate(logits).astype(np.float32))
