"""Shortcut probe: does the model recognise a myeloblast by its morphology, or by the Munich
scanner's magnification and colour?

All myeloblasts in the training data come from one scanner. On held-out test crops this
re-renders each source in the other's style and reports how predictions move:
  * scale: Munich crops zoomed out to the Barcelona magnification (cells ~0.62x as large),
    padded with their background colour or by reflection (see train.rescale.zoom_out);
  * colour: Reinhard colour transfer (per-channel mean/std in Lab) of each crop to the other
    source's average colour statistics.
A model that learned "Munich look = blast" loses its blasts when they are made to look like
Barcelona crops, and calls Barcelona cells blasts when they are made to look like Munich ones.

    python -m train.experiments probe --model batchwbc/models/batchwbc-wbc13.onnx --data ../shared/data --split runs/NAME/split.csv
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import evalkit
from ..degrade import lab_stats, recolour
from ..options import data_folder, onnx_model, split_csv
from ..rescale import zoom_out

ZOOM_OUT = 0.62  # Munich (M8, 100x) cells appear ~1.6x larger than CellaVision DM96 ones in the crops


@click.command("probe")
@onnx_model(required=True)
@data_folder
@split_csv
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def command(model_path, data_root, split_csv, json_out):
    """Test crops of each source re-rendered in the other's style: do blasts stay blasts?"""
    from batchwbc.engine.model import Classifier

    clf = Classifier(model_path)
    size = clf.info.input_size
    rows = evalkit.split_rows(split_csv, "test")
    by_src: dict[str, list[tuple[np.ndarray, str]]] = {}
    for r, im in zip(rows, evalkit.decode_raw(data_root, rows)):
        by_src.setdefault(r["source"], []).append((im, r["class_id"]))
    stats = {s: lab_stats([im for im, _ in v]) for s, v in by_src.items()}
    blast = clf.info.classes.index("myeloblast")

    def predict(images):
        return evalkit.predict(clf, evalkit.frame(images, size, clf.info.preprocessing), 64).argmax(1)

    result = {}
    for src, items in sorted(by_src.items()):
        other = [s for s in by_src if s != src]
        ims = [im for im, _ in items]
        labels = np.array([clf.info.classes.index(c) for _, c in items])
        variants = {"original": ims}
        for o in other:  # every other source's stain, DeepAPL's included
            variants[f"colour of {o}"] = [recolour(im, *stats[o]) for im in ims]
        if src == "AML-LMU":
            for mode in ("background", "reflect"):
                variants[f"at PBC scale ({mode} pad)"] = [zoom_out(im, ZOOM_OUT, mode) for im in ims]
                if other:
                    variants[f"at PBC scale ({mode} pad) + colour"] = [recolour(zoom_out(im, ZOOM_OUT, mode), *stats[other[0]]) for im in ims]
        for name, v in variants.items():
            pred = predict(v)
            is_blast = labels == blast
            row = {
                "n": int(len(labels)),
                "accuracy": round(float((pred == labels).mean()), 4),
                "blast_recall": round(float((pred[is_blast] == blast).mean()), 4) if is_blast.any() else None,
                "non_blasts_called_blast": int((pred[~is_blast] == blast).sum()),
                "n_non_blasts": int((~is_blast).sum()),
            }
            result[f"{src}: {name}"] = row
            click.echo(f"{src:8s} {name:40s} acc {row['accuracy']:.3f}  blast recall {row['blast_recall']}  "
                       f"non-blasts called blast {row['non_blasts_called_blast']}/{row['n_non_blasts']}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
