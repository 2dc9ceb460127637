"""`soup`: would averaging the weights of sibling runs help (ADRs 0005-0007 bundled such averages)?"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from batchwbc.core import catalogue

from ..options import data_folder, input_size, keras_models, split_csv
from .common import accuracy_line, load_keras, predict, split_data


@click.command("soup")
@keras_models
@data_folder
@split_csv
@input_size
@click.option("--save", "save_path", default=None, type=click.Path(dir_okay=False), help="Also save the averaged model (a .keras file; finish it with `python -m train --resume PATH --epochs 0`).")
def command(model_paths, data_root, split_csv, size, save_path):
    """Validation accuracy of each model and of the average of their weights (same architecture)."""
    (x, y, _), = split_data(data_root, split_csv, size, ("val",), model_paths[0]).values()
    from train.models import build_core

    models = [load_keras(p) for p in model_paths]
    base = models[0]  # rebuilt at --size: the averaged models may have been trained at other sizes
    names = {layer.name for layer in base.layers}
    head_conv = base.get_layer("head_conv").filters if "head_conv" in names else 0
    dense = base.get_layer("head_dense").units if "head_dense" in names else 0  # 0: linear head (ADR 0012)
    core, _ = build_core(base.name.removeprefix("core_"), size, int(base.output_shape[-1]),  # the model's own class count
                         dense=dense, head_conv=head_conv)
    ws = [m.get_weights() for m in models]
    for p, w in zip(model_paths, ws):
        core.set_weights(w)
        click.echo(f"{p}: {accuracy_line(predict(core, x), y)}")
    core.set_weights([np.mean([w[i] for w in ws], axis=0) for i in range(len(ws[0]))])
    click.echo(f"weight average of {len(models)}: {accuracy_line(predict(core, x), y)}")
    if save_path:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        core.save(save_path)
        click.echo(f"saved {save_path}")
