"""`python -m train.robustness`: accuracy when the same test cells come from a worse analyzer.

Why: the model will be scored on another hospital's crops. Its stain and magnification are
handled (in-graph colour standardisation, ADR 0003; cell framing, ADR 0005); what remains is
image quality - fewer pixels per cell, harder JPEG compression and defocus - and, as a check
on the colour standardisation, each crop recoloured to the other source's statistics. This
re-exports every test crop as such an analyzer would (train.degrade), runs it through the
runtime's own preprocessing and ONNX model, and reports accuracy and the share sent to review
per condition.

    python -m train.robustness --model batchwbc/models/batchwbc-wbc13.onnx --data ../shared/data --split docs/model/test-split.csv
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .options import data_folder, onnx_model, split_csv

# (label, linear scale, JPEG quality or None = no re-encoding, defocus sigma in original pixels[, recolour])
CONDITIONS: tuple[tuple, ...] = (
    ("as exported", 1.0, None, 0.0),
    ("JPEG q60", 1.0, 60, 0.0),
    ("1/2 size", 0.5, None, 0.0),
    ("1/2 size + JPEG q75", 0.5, 75, 0.0),
    ("1/3 size", 0.35, None, 0.0),
    ("1/3 size + JPEG q50", 0.35, 50, 0.0),
    ("1/4 size", 0.25, None, 0.0),
    ("defocus 1 px", 1.0, None, 1.0),
    ("defocus 2 px", 1.0, None, 2.0),
    ("defocus 3 px", 1.0, None, 3.0),
    # optional 5th element: recoloured (Lab colour transfer) to the other source's statistics
    ("colour of the other source", 1.0, None, 0.0, True),
)


def _next_source(sources: list[str], source: str) -> str:
    """The source whose stain a crop of `source` is given: the next one in sorted order, so
    with three sources each one's crops are shown in another's colours, none left out."""
    return sources[(sources.index(source) + 1) % len(sources)]


def evaluate(model_path: str | None, data_root: Path, rows: list[dict], conditions=CONDITIONS, batch: int = 64) -> list[dict]:
    """One dict per condition: accuracy (12 classes), paper-10 accuracy, share below the review threshold."""
    from batchwbc.core import catalogue
    from batchwbc.engine.model import Classifier

    from . import evalkit
    from .degrade import degrade, lab_stats, recolour

    clf = Classifier(model_path, threads=0)
    size, contract = clf.info.input_size, clf.info.preprocessing
    y = evalkit.labels(rows)
    paper = y < len(catalogue.PAPER_CLASS_IDS)
    raw = evalkit.decode_raw(data_root, rows)
    src = [r.get("source", "") for r in rows]
    sources = sorted(set(src))
    # each source's paper-10 cells, for the per-source accuracy of every condition
    src_of_row = np.array(src)
    paper_of = {s: m for s in sources if (m := paper & (src_of_row == s)).any()}
    stats = {}
    if len(sources) > 1 and any(len(c) > 4 and c[4] for c in conditions):
        stats = {s: lab_stats([im for im, rs in zip(raw, src) if rs == s]) for s in sources}
    out = []
    for label, scale, quality, sigma, *rest in conditions:
        recoloured = bool(rest and rest[0] and stats)
        ims = raw
        if recoloured:  # each crop in the colours of the next other source (sorted, cyclic)
            ims = [recolour(im, *stats[_next_source(sources, rs)]) for im, rs in zip(raw, src)]
        x = evalkit.frame((degrade(im, scale, quality, sigma) for im in ims), size, contract)
        probs = evalkit.predict(clf, x, batch)
        pred = probs.argmax(axis=1)
        out.append({
            "condition": label, "scale": scale, "jpeg_quality": quality, "defocus_sigma": sigma,
            "recoloured": recoloured, "n": int(len(y)),
            "accuracy": float(np.mean(pred == y)),
            "paper10_accuracy": float(np.mean(pred[paper] == y[paper])),
            "to_review": float(np.mean(probs.max(axis=1) < (clf.info.review_threshold or 0.0))),
            "paper10_accuracy_by_source": {s: float(np.mean(pred[m] == y[m])) for s, m in paper_of.items()},
        })
    return out


@click.command()
@onnx_model(required=False, help="ONNX model (default: the bundled one).")
@data_folder
@split_csv
@click.option("--rows", "which", type=click.Choice(["test", "val"]), default="test", show_default=True, help="Which rows of the split; choose models on val, report on test.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False))
def main(model_path, data_root, split_csv, which, json_out):
    """Accuracy of a model on its test crops re-exported defocused, at lower resolution or JPEG quality."""
    from .evalkit import split_rows

    rows = split_rows(split_csv, which)
    res = evaluate(model_path, Path(data_root), rows)
    sources = sorted(res[0]["paper10_accuracy_by_source"]) if res else []
    click.echo(f"{'condition':28s} {'acc':>6s} {'paper10':>8s} {'review':>7s} " + " ".join(f"{s[:10]:>10s}" for s in sources) + f"   (n={len(rows)}; per-source columns: paper-10)")
    for r in res:
        by = r["paper10_accuracy_by_source"]
        click.echo(f"{r['condition']:28s} {r['accuracy']:6.3f} {r['paper10_accuracy']:8.3f} {r['to_review']:7.3f} "
                   + " ".join(f"{by.get(s, float('nan')):10.3f}" for s in sources))
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
