"""`python -m export.ood_reference MODEL.onnx --data DATA --split TEST_SPLIT.csv --out OUT.onnx`

Fit the out-of-distribution reference (batchwbc.ood) and the DATA_SHIFT threshold on the
model's own TRAINING cells and store both in the model file's metadata, so the runtime can
label crops "unclassified" and flag shifted batches with nothing but the .onnx file.
TensorFlow-free (onnx + onnxruntime + the runtime's preprocessing), so it also runs on a lab PC.

What is fitted on what (docs/decisions/0011-out-of-distribution-and-data-shift.md):
  * `ref`: a seeded sample of cells of the training sources that are NOT in the test split:
    class centres, PCA basis and shared covariance of the model's embedding;
  * background corners cut from `ref` crops: the "reject:background" centre;
  * synthetic non-cells (coloured noise, `ref` crops cut into shuffled tiles): the
    "reject:not-a-cell" centre;
  * `ref` cells against both kinds of junk: the not-a-cell rule (batchwbc.engine.junk_rule);
  * `held`: a disjoint sample of those cells: each class's typical (median) distance, which
    scales the score, and the thresholds (a quantile of their scores for each of the three cell
    rules; the highest of the sources' own 80th percentiles for DATA_SHIFT's cell cut; the
    highest batch statistic of pseudo-patients of 20-200 of them for DATA_SHIFT);
  * the stain-colour envelope (batchwbc.engine.stain_colour) from the `ref` cells' mean Lab
    a*/b*, one robust Gaussian per training source, threshold at COLOUR_QUANTILE of their
    distances times COLOUR_MARGIN; the share of `held` cells outside it is measured and stored.
The test split is never read except to leave its cells out.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import click
import numpy as np

from batchwbc.engine.data_shift import PSEUDO_PATIENT_SIZES
from batchwbc.engine import junk_rule
from batchwbc.engine.junk_crops import background_corner, not_a_cell  # noqa: F401 - benchmarks import them from here
from batchwbc.engine.junk_rule import JunkRule
from batchwbc.engine.model_metadata import KEY_TRAINING_DATA
from batchwbc.engine.ood import UNCLASSIFIED_QUANTILE

N_REF = 3000
N_HELD = 1500
N_REJECT = 600
PCA_DIM = 128
#: Each of the three cell rules catches this share of held-out training cells (0.25%, one more
#: where the quantile falls between two cells), so together at most about 0.8% (0.80% of 1,500
#: for the bundled model): held-out cells are mostly cells the model was trained on, whose
#: scores are lower than unseen cells', and the target is <= 1% of unseen test cells.
CELL_QUANTILE = UNCLASSIFIED_QUANTILE  # the runtime's number: adapt re-derives it the same way
SHIFT_CELL_QUANTILE = 0.8
PSEUDO_PATIENTS_PER_SIZE = 400
BACKGROUND = "reject:background"
#: Images made to be nothing like a cell: coloured noise at random grain sizes, and real crops
#: cut into tiles and shuffled (the stain's colours without a cell's shape). A backbone that
#: maps them near a cell class (Lite0 candidate V5 counted every noise crop of
#: tests/test_ood_bundled.py as a cell) learns a centre of its own for them here.
NOT_A_CELL = "reject:not-a-cell"
N_NOT_A_CELL = 600
#: The stain-colour threshold: this quantile of the reference cells' own colour distances, times
#: the margin. Chosen on the Lite0 v6 training sources (ADR 0011, "Stain-colour check"): at most 0.1 %
#: of held-out training cells and none of the test-split cells outside, all 12 re-stained crops of
#: tests/test_ood_bundled.py outside. A margin of 1.1 left twice as many held-out cells
#: outside; the L* mean or the a*/b* spreads as extra features let re-stained crops in.
COLOUR_QUANTILE = UNCLASSIFIED_QUANTILE
COLOUR_MARGIN = 1.2


class ReferenceBuildError(Exception):
    """The reference cannot be built; str is one sentence."""


def read_test_paths(split_csv: Path, data_root: Path) -> set[str]:
    return read_split_paths(split_csv, data_root)[0]


def read_split_paths(split_csv: Path, data_root: Path) -> tuple[set[str], set[str]]:
    """(test paths, train/val paths) of a split CSV, resolved against data_root. A training
    run's split.csv lists all three; the committed test-split.csv lists test rows only."""
    test, fit = set(), set()
    with open(split_csv, newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            (test if r["split"] == "test" else fit).add(str((data_root / r["path"]).resolve()))
    return test, fit


def training_sources(meta: dict[str, str]) -> list[str] | None:
    """The sources the model's metadata says it was trained on ('class|source' count keys)."""
    try:
        counts = json.loads(meta.get(KEY_TRAINING_DATA, "{}")).get("counts_class_source") or {}
        found = sorted({k.split("|", 1)[1] for k in counts if "|" in k})
    except (ValueError, AttributeError):
        return None
    return found or None


def sample_cells(items: Sequence, test_paths: set[str], rng: np.random.Generator, n_ref: int, n_held: int):
    """(ref, held, test) lists of dataset items: ref and held are disjoint seeded samples of the
    cells NOT in the test split."""
    test = [it for it in items if str(Path(it.path).resolve()) in test_paths]
    rest = [it for it in items if str(Path(it.path).resolve()) not in test_paths]
    order = rng.permutation(len(rest))
    return [rest[i] for i in order[:n_ref]], [rest[i] for i in order[n_ref : n_ref + n_held]], test


class Embedded(NamedTuple):
    probs: np.ndarray  # [N, classes]
    emb: np.ndarray  # [N, D]
    kept: list[int]  # indices of the loaders that could be read
    colour: np.ndarray  # [N, 2] stain-colour statistics of the same model inputs (batchwbc.engine.stain_colour)


def embed_loaders(classifier, loaders: Sequence[Callable[[], np.ndarray]], chunk: int = 256) -> Embedded:
    """Probabilities, embeddings, kept indices and colour statistics for decoded-RGB loaders;
    unreadable files are left out. The colour statistic is taken from the very model inputs the
    runtime would compute it from."""
    from batchwbc.engine.preprocess import UnreadableImage, to_model_input
    from batchwbc.engine.stain_colour import colour_statistics

    info = classifier.info
    probs, embs, kept, colour = [], [], [], []
    for i in range(0, len(loaders), chunk):
        arrays = []
        for j, load in enumerate(loaders[i : i + chunk], start=i):
            try:
                arrays.append(to_model_input(load(), info.input_size, info.preprocessing))
            except UnreadableImage:
                continue
            kept.append(j)
        for b in range(0, len(arrays), 32):
            batch = np.stack(arrays[b : b + 32])
            p, e = classifier.predict_with_embedding(batch)
            probs.append(p)
            embs.append(e)
            colour.append(colour_statistics(batch))
    if not kept:
        return Embedded(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), kept, np.zeros((0, 2)))
    return Embedded(np.concatenate(probs), np.concatenate(embs), kept, np.concatenate(colour))


def colour_envelope(ref_colour: np.ndarray, ref_sources: Sequence[str], held_colour: np.ndarray,
                    held_sources: Sequence[str], quantile: float = COLOUR_QUANTILE, margin: float = COLOUR_MARGIN):
    """The stain-colour envelope fitted on the reference cells' statistics (one group per
    training source), with the share of held-out cells outside it, overall and per source,
    recorded in its info for audit (pure)."""
    from dataclasses import replace as _replace

    from batchwbc.engine import stain_colour

    env = stain_colour.fit_envelope(ref_colour, ref_sources, quantile, margin)
    out = stain_colour.outside(env, held_colour)
    src = np.asarray(held_sources)
    per_source = {s: round(float(out[src == s].mean()), 5) for s in sorted(set(src.tolist()))}
    return _replace(env, info={**env.info, "held_out_cells": int(len(out)),
                               "held_out_outside": round(float(out.mean()), 5) if len(out) else None,
                               "held_out_outside_by_source": per_source})


def pseudo_patient_statistics(ref, held_scores: np.ndarray, held_sources: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """DATA_SHIFT statistic of pseudo-patients drawn from held-out cells, one source each
    (a patient's crops come from one analyser), PSEUDO_PATIENTS_PER_SIZE of every size."""
    from batchwbc.engine import data_shift

    src = np.asarray(held_sources)
    groups = [np.flatnonzero(src == s) for s in sorted(set(src))]
    stats = []
    for n in PSEUDO_PATIENT_SIZES:
        for j in range(PSEUDO_PATIENTS_PER_SIZE):
            g = groups[j % len(groups)]
            stats.append(data_shift.batch_statistic(ref, held_scores[rng.choice(g, size=min(n, len(g)), replace=False)]))
    return np.asarray(stats)


def shift_cell_cut(held_scores: np.ndarray, held_sources: Sequence[str], quantile: float = SHIFT_CELL_QUANTILE) -> float:
    """DATA_SHIFT's cell cut: the highest of the training sources' own `quantile`s of their
    held-out cells' scores (pure).

    Why per source: the sources' score distributions differ (DeepAPL's CellaVision cells sit
    further from the class centres than PBC's). A cut at the pooled quantile put 93 % of some
    source's pseudo-patients above it, so the highest pseudo-patient statistic, the DATA_SHIFT
    threshold, became 0.93 for the three-source model and almost nothing could exceed it (the
    synthetic sample drawings did not). With each source's own quantile at most ~20 % of any
    source's cells are above the cut, and a batch unlike all of them stands out."""
    scores = np.asarray(held_scores, dtype=np.float64)
    src = np.asarray([str(s) for s in held_sources])
    if len(scores) != len(src) or len(scores) == 0:
        raise ValueError("need one source per held-out score")
    return float(max(np.quantile(scores[src == s], quantile) for s in sorted(set(src.tolist()))))


def fit_junk_rule(cells: np.ndarray, junk: np.ndarray, held: np.ndarray, quantile: float, seed: int = 0) -> JunkRule:
    """The rule fitted on cells against junk (rows of z), thresholded on held-out cells (pure).

    The fit is batchwbc's own class-balanced, L2-penalised logistic regression (the head fit
    `adapt` uses, here with two classes and no prior model), its penalty chosen by
    cross-validation on the fitting crops only; held-out cells are used for the threshold alone."""
    from batchwbc.adaptation.head_fit import choose_alpha, fit_head

    cells, junk, held = (np.asarray(a, dtype=np.float64) for a in (cells, junk, held))
    if cells.ndim != 2 or junk.ndim != 2 or held.ndim != 2 or not (cells.shape[1] == junk.shape[1] == held.shape[1]):
        raise ValueError("cells, junk and held must be [N, k] arrays of the same k")
    if len(cells) < 2 or len(junk) < 2 or len(held) < 1:
        raise ValueError(f"need at least 2 cells, 2 junk crops and 1 held-out cell ({len(cells)}, {len(junk)}, {len(held)})")
    x = np.concatenate([cells, junk])
    y = np.r_[np.zeros(len(cells), dtype=int), np.ones(len(junk), dtype=int)]
    v0, c0 = np.zeros((x.shape[1], 2)), np.zeros(2)
    alpha = choose_alpha(x, y, None, v0, c0, seed=seed)
    v, c = fit_head(x, y, v0, c0, alpha)
    rule = JunkRule((v[:, 1] - v[:, 0]).astype(np.float32), float(c[1] - c[0]), float("inf"))
    held_logits = junk_rule.logits(rule, held)
    threshold = float(np.quantile(held_logits, quantile))
    return JunkRule(rule.weights, rule.bias, threshold, info={
        "fit": "class-balanced L2 logistic regression, penalty by 3-fold CV (Brier)", "penalty": alpha,
        "cells": int(len(cells)), "junk": int(len(junk)), "held_out_cells": int(len(held)), "quantile": quantile,
        "held_out_set_apart": round(float((held_logits > threshold).mean()), 5),
        "fitting_junk_caught": round(float((junk_rule.logits(rule, junk) > threshold).mean()), 5),
    })


def fit_with_thresholds(ref_emb, ref_labels, bg_emb, held_emb, held_labels, held_sources, rng, k: int = PCA_DIM,
                        quantile: float = CELL_QUANTILE, embedding_output: str = "embedding", info: dict | None = None,
                        junk_emb: np.ndarray | None = None):
    """The complete reference: centres and covariance from ref (+ the background centre and,
    given junk_emb, the not-a-cell centre), the not-a-cell rule from ref against background
    corners and junk, every threshold from held (pure apart from the seeded generator)."""
    from batchwbc.engine import data_shift, ood

    junk_emb = np.zeros((0, ref_emb.shape[1]), ref_emb.dtype) if junk_emb is None else junk_emb
    labels = list(ref_labels) + [BACKGROUND] * len(bg_emb) + [NOT_A_CELL] * len(junk_emb)
    r = ood.fit_reference(np.concatenate([ref_emb, bg_emb, junk_emb]), labels, k=k, embedding_output=embedding_output)
    # each class's typical distance: the median over held-out cells of that class
    z_held = ood.whiten(r, held_emb)
    d = ((z_held[:, None, :] - r.centres[None]) ** 2).sum(axis=2)
    hl = np.asarray(held_labels)
    scales = np.array([float(np.median(d[hl == c, i])) if (hl == c).any() else float(np.median(d[:, i]))
                       for i, c in enumerate(r.classes)])
    scales[[c.startswith(ood.REJECT_PREFIX) for c in r.classes]] = 1.0
    r = replace(r, scales=np.maximum(scales, 1e-6).astype(np.float32))
    held_score, known, rejected = ood.distances(r, held_emb)
    threshold = float(np.quantile(held_score, quantile))
    margin = float(np.quantile(known - rejected, quantile))
    r = replace(r, threshold=threshold, reject_margin=margin)
    rejects = np.concatenate([bg_emb, junk_emb])
    if len(rejects) >= 2:  # the not-a-cell rule, from the same crops as the reject centres
        r = replace(r, junk=fit_junk_rule(ood.whiten(r, ref_emb), ood.whiten(r, rejects), z_held, quantile))
    _, flagged = ood.score_and_flag(r, held_emb)
    cut = shift_cell_cut(held_score, held_sources)
    r = replace(r, shift=ood.ShiftReference(threshold=1.0, cell_quantile=SHIFT_CELL_QUANTILE, cell_cut=cut,
                                            min_cells=data_shift.MIN_CELLS, counts_set_apart=True))
    # the threshold under the runtime's rule: held-out cells the embedding sets apart count as unusual
    # (the colour envelope is fitted to leave the held-out training cells inside it)
    counted = np.asarray(data_shift.shift_scores(r, held_score, flagged), dtype=np.float64)
    stats = pseudo_patient_statistics(r, counted, held_sources, rng)
    shift = replace(r.shift, threshold=float(stats.max()), info={
        "pseudo_patients": int(len(stats)), "sizes": list(PSEUDO_PATIENT_SIZES),
        "rule": "raise when the batch's statistic exceeds the highest of any held-out pseudo-patient",
        "statistic": data_shift.STATISTIC_WITH_SET_APART,
    })
    full_info = dict(info or {})
    full_info.update({
        "pca_dim": int(r.projection.shape[0]), "cell_quantile": quantile,
        "held_out_cells": int(len(held_emb)), "held_out_unclassified": round(float(flagged.mean()), 5),
        "reference_cells": int(len(ref_emb)), "background_corners": int(len(bg_emb)),
        "not_a_cell_images": int(len(junk_emb)),
    })
    return replace(r, shift=shift, basis=None, info=full_info)


def build(model_path: Path, data_root: Path, split_csv: Path, sources: Sequence[str] | None = None, seed: int = 0,
          n_ref: int = N_REF, n_held: int = N_HELD, n_reject: int = N_REJECT, k: int = PCA_DIM, n_not_a_cell: int = N_NOT_A_CELL,
          log: Callable[[str], None] = print):
    """Fit the reference for the model at model_path (which must have an embedding output)."""
    from batchwbc.inputs import public_datasets
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.preprocess import decode_rgb, read_bytes

    clf = Classifier(model_path, threads=max(1, (os.cpu_count() or 1)))
    if clf.embedding_output is None:
        raise ReferenceBuildError(f"{model_path.name} has no embedding output; add it first with `python -m export.embedding`.")
    sources = list(sources or training_sources(clf.info.metadata) or [])
    scan = public_datasets.read_any(data_root)
    items = [it for it in scan.items if not sources or it.source in sources]
    items = [it for it in items if it.class_id in clf.info.classes]
    test_paths, fit_paths = read_split_paths(split_csv, data_root)
    if fit_paths:  # a run's split.csv names its training cells: use only those (and its test rows)
        items = [it for it in items if str(Path(it.path).resolve()) in fit_paths | test_paths]
    if not items:
        raise ReferenceBuildError(f"no labelled cells of sources {', '.join(sources) or '(any)'} found in {data_root}.")
    rng = np.random.default_rng(seed)
    ref, held, test = sample_cells(items, test_paths, rng, n_ref, n_held)
    need_ref = 5 * len(clf.info.classes)
    if len(held) < 200 or len(ref) < need_ref:
        raise ReferenceBuildError(f"only {len(ref) + len(held)} training cells outside the test split; the reference "
                                  f"needs {need_ref} and its thresholds 200 more (--n-ref {len(ref)}, --n-held {len(held)} drawn).")
    log(f"reference: {len(ref)} training cells, {len(held)} held-out training cells ({', '.join(sources) or 'all sources'}); "
        f"{len(test)} test-split cells left out")

    def load(path):
        return lambda: decode_rgb(read_bytes(path))

    _, ref_emb, kept_ref, ref_colour = embed_loaders(clf, [load(it.path) for it in ref])
    _, held_emb, kept_held, held_colour = embed_loaders(clf, [load(it.path) for it in held])
    rng_bg = np.random.default_rng(seed + 7)
    bg_donors = [ref[i] for i in rng_bg.permutation(len(ref))[:n_reject]]
    _, bg_emb, _, _ = embed_loaders(clf, [(lambda p=it.path: background_corner(decode_rgb(read_bytes(p)), rng_bg)) for it in bg_donors])
    rng_junk = np.random.default_rng(seed + 11)
    junk_donors = [ref[i] for i in rng_junk.permutation(len(ref))[:n_not_a_cell]]
    _, junk_emb, _, _ = embed_loaders(clf, [(lambda p=it.path: not_a_cell(decode_rgb(read_bytes(p)), rng_junk)) for it in junk_donors])
    info = {"fitted_on": f"{len(kept_ref)} training cells of {', '.join(sources) or 'all sources'} outside "
                         f"{split_csv.name}, seed {seed}", "model_sha256_before": clf.info.sha256}
    r = fit_with_thresholds(ref_emb, [ref[i].class_id for i in kept_ref], bg_emb, held_emb,
                            [held[i].class_id for i in kept_held], [held[i].source for i in kept_held], np.random.default_rng(seed + 1), k=k,
                            embedding_output=clf.embedding_output, info=info, junk_emb=junk_emb if len(junk_emb) else None)
    colour = colour_envelope(ref_colour, [ref[i].source for i in kept_ref], held_colour, [held[i].source for i in kept_held])
    return replace(r, colour=colour)


def write(model_in: Path, reference, out: Path) -> int:
    """Store the reference in the model's metadata (atomically); returns the metadata's size in bytes."""
    import onnx

    from batchwbc.engine import ood

    model = onnx.load(str(model_in))
    text = ood.to_metadata(reference)
    meta = {p.key: p.value for p in model.metadata_props}
    meta[ood.KEY_OOD] = text
    onnx.helper.set_model_props(model, meta)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return len(text.encode())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model_in", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled data root the model was trained on.")
@click.option("--split", "split_csv", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with a 'path' and a 'split' column: rows with split 'test' are never used; when it also "
                   "lists train/val rows (a run's split.csv), only those cells are used.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="ONNX file to write (may be MODEL_IN).")
@click.option("--source", "sources", multiple=True, help="Training source(s) to use (default: those in the model's metadata).")
@click.option("--seed", type=int, default=0)
@click.option("--n-ref", type=click.IntRange(min=20), default=N_REF, help="Training cells the centres and covariance are fitted on.")
@click.option("--n-held", type=click.IntRange(min=200), default=N_HELD, help="Other training cells the thresholds are set on.")
def main(model_in: Path, data_root: Path, split_csv: Path, out: Path, sources: tuple[str, ...], seed: int,
         n_ref: int, n_held: int) -> None:
    """Fit the OOD / DATA_SHIFT reference of MODEL_IN on its training cells and store it in --out."""
    from batchwbc.engine.model import ModelError

    try:
        ref = build(model_in, data_root, split_csv, sources, seed, n_ref=n_ref, n_held=n_held,
                    n_reject=min(N_REJECT, n_ref), n_not_a_cell=min(N_NOT_A_CELL, n_ref))
    except (ReferenceBuildError, ModelError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    size = write(model_in, ref, out)
    i = ref.info
    junk = f", not-a-cell threshold {ref.junk.threshold:.4g}" if ref.junk is not None else ""
    click.echo(f"wrote {out}: {ref.describe()}; cell threshold {ref.threshold:.4g}, reject margin {ref.reject_margin:.4g}{junk} "
               f"({100 * i['held_out_unclassified']:.2f}% of {i['held_out_cells']} held-out training cells unclassified); "
               f"DATA_SHIFT cell cut {ref.shift.cell_cut:.4g}, threshold {ref.shift.threshold:.4f}; "
               f"stain colour {ref.colour.threshold:.3g} ({100 * ref.colour.info['held_out_outside']:.2f}% of held-out "
               f"training cells outside); metadata {size / 1000:.0f} kB")


if __name__ == "__main__":
    main()
