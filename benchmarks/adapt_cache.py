"""Decode a labelled dataset once and cache the bundled model's embeddings (for adapt_curve.py).

    python -m benchmarks.adapt_cache --data ../shared/data/DeepAPL --out /tmp/deepapl-emb.npz

The .npz also holds `colour`, each cell's stain-colour statistic ([N, 2], the same model inputs,
batchwbc.engine.stain_colour), which adapt uses to widen the colour envelope. An array added, none
changed: a cache written before it lacks `colour` and every reader of the other arrays reads
it as before; a reader that needs `colour` checks `"colour" in npz.files`.
"""
from __future__ import annotations

import sys
import time

import click


@click.command()
@click.option("--data", required=True, help="Dataset folder in a layout batchwbc.inputs.public_datasets.read_any reads.")
@click.option("--out", required=True, help=".npz to write: embeddings, probs, colour, labels, patients, paths.")
@click.option("--model", default=None, help="Model with an embedding output (default: the bundled one).")
@click.option("--workers", type=int, default=1)
def main(data: str, out: str, model: str | None, workers: int) -> None:
    import numpy as np

    from batchwbc.inputs.public_datasets import read_any
    from batchwbc.engine.embed import embed_files
    from batchwbc.engine.model import Classifier

    clf = Classifier(model, threads=1)
    classes = list(clf.info.classes)
    scan = read_any(data)
    items = [it for it in scan.items if it.class_id in classes]
    dropped = len(scan.items) - len(items)
    print(f"{len(items)} cells of the model's classes ({dropped} of other classes dropped)", file=sys.stderr)
    t = time.perf_counter()
    got = embed_files(clf, [str(it.path) for it in items], workers=workers, batch_size=32)
    print(f"embedded {len(got.ok)} cells in {time.perf_counter() - t:.0f} s; {len(got.errors)} unreadable", file=sys.stderr)
    kept = [items[i] for i in got.ok]
    np.savez_compressed(
        out, embeddings=got.embeddings, probs=got.probs, colour=got.colour, classes=np.array(classes),
        labels=np.array([classes.index(it.class_id) for it in kept]),
        patients=np.array([it.patient or "" for it in kept]), paths=np.array([str(it.path) for it in kept]),
        model_sha256=np.array(clf.info.sha256),
    )


if __name__ == "__main__":
    main()
