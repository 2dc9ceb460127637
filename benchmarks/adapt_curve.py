"""Learning curve of `batchwbc adapt` on a source the model never saw (leave-one-source-out).

The bundled model v4 was trained on PBC + Munich only, so DeepAPL is unseen. Per seed, the
DeepAPL patients are split in two halves: N labelled cells are drawn at random from the
first half (the lab's adaptation pool) and the adapted head is tested on every cell of the
other half, so no test patient ever contributes a training cell. The fit is exactly the
command's (batchwbc.commands.adapt.adapt_head) on cached embeddings (benchmarks/adapt_cache.py):

    python -m benchmarks.adapt_cache --data ../shared/data/DeepAPL --out /tmp/deepapl-emb.npz
    python -m benchmarks.adapt_curve /tmp/deepapl-emb.npz --seeds 0 1 2

`--unlabelled` also reports embedding-statistics alignment without labels (see docs/adaptation.md).
"""
from __future__ import annotations

import os
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as `batchwbc adapt` does
    os.environ.setdefault(_var, "1")

import click
import numpy as np


def _metrics(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    from batchwbc.core import catalogue
    from batchwbc.adaptation.head_fit import scores

    paper = [classes.index(c) for c in catalogue.PAPER_CLASS_IDS]
    m = np.isin(y, paper)
    every = scores(y, pred)
    p10 = scores(y[m], pred[m], paper)
    return {"acc": every.accuracy, "f1": every.macro_f1, "acc10": p10.accuracy, "f1_10": p10.macro_f1}


def _align(ref: np.ndarray, x_lab: np.ndarray, x: np.ndarray, scale: bool) -> np.ndarray:
    """Unlabelled alignment: move the lab's embedding mean (and, with scale, each dimension's
    spread: diagonal CORAL) onto the training sources', clipped at 0 as after the ReLU."""
    mu_l, mu_r = x_lab.mean(axis=0), ref.mean(axis=0)
    if not scale:
        return np.maximum(x - mu_l + mu_r, 0.0)
    sd_l, sd_r = x_lab.std(axis=0) + 1e-6, ref.std(axis=0) + 1e-6
    return np.maximum((x - mu_l) / sd_l * sd_r + mu_r, 0.0)


@click.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--seeds", type=int, multiple=True, default=(0, 1, 2))
@click.option("--sizes", type=int, multiple=True, default=(50, 100, 200, 500))
@click.option("--model", default=None, help="Model the cache was made with (default: the bundled one).")
@click.option("--unlabelled", "reference", multiple=True,
              help="Also try alignment without labels; reference embeddings (.npz, repeatable) of the training sources.")
def main(cache: str, seeds: tuple[int, ...], sizes: tuple[int, ...], model: str | None, reference: tuple[str, ...]) -> None:
    import onnx

    from batchwbc.commands.adapt import adapt_head
    from batchwbc.engine.model import DEFAULT_MODEL_PATH
    from batchwbc.engine.onnx_graph import head_parameters

    d = np.load(cache)
    x, probs, y, patients = d["embeddings"].astype(np.float64), d["probs"], d["labels"], d["patients"]
    classes = [str(c) for c in d["classes"]]
    w0, b0, t0 = head_parameters(onnx.load(str(model or DEFAULT_MODEL_PATH)))
    names = np.unique(patients)
    print(f"{len(y)} cells, {len(names)} patients; model head {w0.shape}, T={t0:.3f}")
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pool_p = set(rng.permutation(names)[: len(names) // 2].tolist())
        pool = np.flatnonzero(np.isin(patients, list(pool_p)))
        test = np.flatnonzero(~np.isin(patients, list(pool_p)))
        before = _metrics(y[test], probs[test].argmax(1), classes)
        rows.append((seed, 0, len(test), before, None, 0.0))
        if reference:
            ref = np.concatenate([np.load(r)["embeddings"] for r in reference]).astype(np.float64)
            for code, scale in ((-1, False), (-2, True)):  # the pool's cells, unlabelled, stand in for the lab's slides
                xa = _align(ref, x[pool], x[test], scale)
                rows.append((seed, code, len(test), _metrics(y[test], (xa @ w0 + b0).argmax(1), classes), None, 0.0))
        for n in sizes:
            pick = rng.choice(pool, size=min(n, len(pool)), replace=False)
            t = time.perf_counter()
            fit = adapt_head(x[pick], y[pick], list(patients[pick]), probs[pick], w0, b0, t0, seed=seed)
            secs = time.perf_counter() - t
            logits = x[test] @ fit.weight + fit.bias
            after = _metrics(y[test], logits.argmax(1), classes)
            z = logits / fit.temperature
            p = np.exp(z - z.max(axis=1, keepdims=True))
            after["review"] = float(((p / p.sum(axis=1, keepdims=True)).max(axis=1) < fit.review_threshold).mean())
            rows.append((seed, n, len(test), after, fit, secs))
    print("| seed | labelled cells | test cells | accuracy | macro-F1 | paper-10 acc | paper-10 macro-F1 | CV acc before->after | refused | alpha | T | threshold | test cells to review | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, n, nt, m, fit, secs in rows:
        label = {0: "0 (original)", -1: "0 (mean-aligned, no labels)", -2: "0 (mean+sd aligned, no labels)"}.get(n, str(n))
        extra = (f"{fit.before['accuracy']:.3f}->{fit.after['accuracy']:.3f} | {'yes' if fit.worse else 'no'} | "
                 f"{fit.alpha:g} | {fit.temperature:.2f} | {fit.review_threshold:.2f} | {100 * m['review']:.1f} % | {secs:.1f}"
                 ) if fit else "| | | | | |"
        print(f"| {seed} | {label} | {nt} | {m['acc']:.3f} | {m['f1']:.3f} | {m['acc10']:.3f} | {m['f1_10']:.3f} | {extra} |")
    print("\nmean over seeds:")
    for n in sorted({r[1] for r in rows}):
        ms = [r[3] for r in rows if r[1] == n]
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        sd = {k: float(np.std([m[k] for m in ms])) for k in ms[0]}
        review = f", to review {100 * mean['review']:.1f} %" if "review" in mean else ""
        print(f"n={n}: accuracy {mean['acc']:.3f} (sd {sd['acc']:.3f}), macro-F1 {mean['f1']:.3f}, "
              f"paper-10 accuracy {mean['acc10']:.3f} (sd {sd['acc10']:.3f}), paper-10 macro-F1 {mean['f1_10']:.3f}{review}")


if __name__ == "__main__":
    main()
