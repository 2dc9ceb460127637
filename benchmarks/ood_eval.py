"""Measure out-of-distribution scores and the DATA_SHIFT rule for a batchwbc model (no TensorFlow).

    python benchmarks/ood_eval.py --model batchwbc/models/batchwbc-wbc13.onnx --data ../shared/data \
        --split docs/model/test-split.csv --cache /tmp/ood/cache [--candidates] [--json out.json]

Part 1 (per crop): each candidate score is fitted on the `ref` sample of the model's own
training cells (PBC + Munich files not in the test split), its threshold is set so that 1% of
a disjoint `held` sample of those cells is caught, and then it is reported on the test split
(the share of normal test cells wrongly caught) and on crops that are not usable leukocyte
images (noise, background corners, heavy defocus, greyscale, another stain, DeepAPL smudge and
plasma cells - classes the model lacks). The thresholds never see the test split.
With `--candidates` every score is compared; without it only the shipped one (batchwbc.ood).

Part 2 (per batch): pseudo-patients of N cells drawn from `held` set the DATA_SHIFT threshold
(batchwbc.engine.data_shift); then test-split pseudo-patients (must not raise it) and every DeepAPL
patient (an unseen source, must raise it) are counted.

Features are cached per set by benchmarks/ood_features.py (first run: ~10 min on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ood_features  # noqa: E402

OOD_KINDS = ("noise_uniform", "noise_gaussian", "noise_blobs", "background", "defocus", "greyscale", "restain",
             "deepapl_smudge", "plasma")
TARGET_KINDS = ("noise_uniform", "noise_gaussian", "noise_blobs", "background")


# ----------------------------------------------------------------------------- candidate scores
# Each candidate: fit(ref FeatureSet, head) -> score(FeatureSet) -> higher = less like the training cells.

def _logits(fs, head):
    w, b, _ = head
    return fs.emb.astype(np.float64) @ w + b


def cand_msp(ref, head):
    return lambda fs: -fs.probs.max(axis=1)


def cand_energy(ref, head):
    def score(fs):
        z = _logits(fs, head)
        m = z.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return score


def cand_maha(k: int | None, residual: bool = False):
    """Mahalanobis to the nearest class centre (shared covariance) in a PCA-k subspace; with
    `residual`, plus the squared distance to that subspace (what PCA throws away), scaled to
    the training cells' mean residual per dimension."""
    def fit(ref, head):
        from batchwbc.engine import ood

        r = ood.fit_reference(ref.emb, ref.labels, k=k or ref.emb.shape[1])

        def residual_sq(e):
            x = e.astype(np.float64) - r.mean
            return ((x - x @ r.basis.T @ r.basis) ** 2).sum(axis=1)

        scale = float(residual_sq(ref.emb).mean()) / r.projection.shape[0] if residual else 1.0

        def score(fs):
            s = ood.mahalanobis(r, fs.emb)
            return s + residual_sq(fs.emb) / scale if residual else s
        return score
    return fit


def cand_knn(kn: int = 10):
    def fit(ref, head):
        e = ref.emb / np.maximum(np.linalg.norm(ref.emb, axis=1, keepdims=True), 1e-9)

        def score(fs):
            q = fs.emb / np.maximum(np.linalg.norm(fs.emb, axis=1, keepdims=True), 1e-9)
            sims = q @ e.T
            return -np.sort(sims, axis=1)[:, -kn]
        return score
    return fit


def cand_reject(k: int, quantile: float):
    """The shipped kind of rule: Mahalanobis to the class centres in PCA k, scaled per class by
    the held cells' median distance, plus a background reject centre fitted on corners of `ref`
    crops; each rule at `quantile` of held cells."""
    def fit(ref, head, feats=None):
        from export.ood_reference import fit_with_thresholds
        from batchwbc.engine import ood

        r = fit_with_thresholds(ref.emb, ref.labels, _FEATS["ref_background"].emb, _FEATS["held"].emb,
                                _FEATS["held"].labels, _FEATS["held"].sources, np.random.default_rng(1), k=k, quantile=quantile)

        def caught(fs):
            return ood.score_and_flag(r, fs.emb)[1]
        caught.is_flag = True
        return caught
    return fit


_FEATS: dict = {}


def candidates():
    return {
        "max softmax (MSP)": cand_msp,
        "energy (logits)": cand_energy,
        "Mahalanobis, full 256-d": cand_maha(None),
        "Mahalanobis, PCA 16": cand_maha(16),
        "Mahalanobis, PCA 32": cand_maha(32),
        "Mahalanobis, PCA 64": cand_maha(64),
        "Mahalanobis, PCA 32 + residual": cand_maha(32, residual=True),
        "kNN cosine (k=10)": cand_knn(10),
        "scaled Mahalanobis PCA 32 + background reject centre (2 rules at 0.5% each)": cand_reject(32, 0.995),
        "scaled Mahalanobis PCA 128 + background reject centre (2 rules at 0.5% each)": cand_reject(128, 0.995),
        "scaled Mahalanobis full 256 + background reject centre (2 rules at 0.5% each)": cand_reject(256, 0.995),
        "scaled Mahalanobis PCA 64 + background reject centre (2 rules at 0.25% each)": cand_reject(64, 0.9975),
        "scaled Mahalanobis PCA 128 + background reject centre (2 rules at 0.25% each, shipped)": cand_reject(128, 0.9975),
        "scaled Mahalanobis full 256 + background reject centre (2 rules at 0.25% each)": cand_reject(256, 0.9975),
    }


# ----------------------------------------------------------------------------- reporting

def kinds(feats) -> dict:
    """kind -> FeatureSet subset; DeepAPL smudge cells come out of the deepapl set."""
    out = {k: feats[k] for k in OOD_KINDS if k in feats}
    d = feats["deepapl"]
    idx = [i for i, c in enumerate(d.labels) if c == "smudge"]
    out["deepapl_smudge"] = _subset(d, idx)
    return out


def _subset(fs, idx):
    idx = np.asarray(idx, dtype=int)
    return ood_features.FeatureSet(fs.probs[idx], fs.emb[idx], [fs.labels[i] for i in idx], [fs.sources[i] for i in idx],
                                   [fs.patients[i] for i in idx], fs.colour[idx])


def cell_table(feats, score_fns: dict, quantile: float = 0.99) -> dict:
    """name -> {threshold, held, test, per kind caught share, deepapl known-class cells caught}."""
    results = {}
    ks = kinds(feats)
    d = feats["deepapl"]
    known = _subset(d, [i for i, c in enumerate(d.labels) if c != "smudge"])
    for name, fn in score_fns.items():
        if getattr(fn, "is_flag", False):  # a rule with its own thresholds (fitted on held cells)
            row = {"threshold": float("nan"), "held": float(fn(feats["held"]).mean()), "test": float(fn(feats["test"]).mean())}
            row.update({k: float(fn(fs).mean()) for k, fs in ks.items()})
            row["deepapl_known_classes"] = float(fn(known).mean())
            results[name] = row
            continue
        thr = float(np.quantile(fn(feats["held"]), quantile))
        row = {"threshold": thr, "held": float((fn(feats["held"]) > thr).mean()), "test": float((fn(feats["test"]) > thr).mean())}
        for k, fs in ks.items():
            row[k] = float((fn(fs) > thr).mean())
        row["deepapl_known_classes"] = float((fn(known) > thr).mean())
        results[name] = row
    return results


def print_cell_table(results: dict, n: dict) -> None:
    cols = ["held", "test", *OOD_KINDS, "deepapl_known_classes"]
    print("\nShare of crops caught (candidates: threshold at the 99th percentile of held-out training cells; "
          "shipped: the model's stored rule)")
    print("| score | " + " | ".join(f"{c} (n={n.get(c.replace('_classes', ''), '?')})" for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}%" for c in cols) + " |")


# ----------------------------------------------------------------------------- DATA_SHIFT

def pseudo_patients(fs, n_cells: int, count: int, rng, by_source: bool = True) -> list[np.ndarray]:
    """Index arrays of `count` pseudo-patients of n_cells each; one source per patient, as a
    real patient's crops come from one analyser (where a source has fewer cells, all of them)."""
    src = np.array(fs.sources)
    groups = [np.flatnonzero(src == s) for s in sorted(set(src))] if by_source else [np.arange(len(src))]
    out = []
    for j in range(count):
        g = groups[j % len(groups)]
        out.append(rng.choice(g, size=min(n_cells, len(g)), replace=False))
    return out


def shift_eval(feats, ref_obj, seed: int = 0) -> dict:
    from batchwbc.engine import data_shift, ood

    rng = np.random.default_rng(seed + 1)
    cell_scores = {name: ood.score(ref_obj, feats[name].emb) for name in ("held", "test", "deepapl")}
    shift = ref_obj.shift
    res = {"threshold": shift.threshold, "statistic": data_shift.STATISTIC}
    for n in (20, 50, 100, 200):
        for name in ("held", "test"):
            pts = pseudo_patients(feats[name], n, 400, rng)
            stats = np.array([data_shift.batch_statistic(ref_obj, cell_scores[name][i]) for i in pts])
            res[f"{name}_n{n}_raised"] = float((stats > shift.threshold).mean())
            res[f"{name}_n{n}_p99"] = float(np.quantile(stats, 0.99))
    pats = np.array(feats["deepapl"].patients)
    per_patient = {}
    for p in sorted(set(pats)):
        idx = np.flatnonzero(pats == p)
        s = cell_scores["deepapl"][idx]
        per_patient[p] = {"cells": len(idx), "statistic": data_shift.batch_statistic(ref_obj, s),
                          "decision": data_shift.decide(ref_obj, s).raised}
    decided = [v for v in per_patient.values() if v["cells"] >= data_shift.MIN_CELLS]
    res["deepapl_patients"] = len(per_patient)
    res["deepapl_patients_decided"] = len(decided)
    res["deepapl_raised"] = float(np.mean([v["decision"] for v in decided])) if decided else float("nan")
    res["deepapl_stat_min"] = float(min(v["statistic"] for v in decided))
    # DeepAPL patients cut down to N cells: does the flag survive a small patient?
    for n in (20, 50, 100):
        raised = []
        for p in per_patient:
            idx = np.flatnonzero(pats == p)
            if len(idx) >= n:
                raised.append(data_shift.decide(ref_obj, cell_scores["deepapl"][rng.choice(idx, n, replace=False)]).raised)
        res[f"deepapl_n{n}_raised"] = float(np.mean(raised)) if raised else float("nan")
        res[f"deepapl_n{n}_patients"] = len(raised)
    # A patient's class mix must not raise it: test pseudo-patients of 100 cells, 70 of one class.
    labs = np.array(feats["test"].labels)
    skew = {}
    for c in sorted(set(labs)):
        ic, io = np.flatnonzero(labs == c), np.flatnonzero(labs != c)
        if len(ic) < 40:
            continue
        raised = [data_shift.decide(ref_obj, cell_scores["test"][np.concatenate([
            rng.choice(ic, min(70, len(ic)), replace=False), rng.choice(io, 30, replace=False)])]).raised for _ in range(200)]
        skew[c] = float(np.mean(raised))
    res["test_skewed_70pct_raised"] = skew
    # Is it the source or the disease? Share of cells beyond the cell cut, per class.
    by_class = {}
    for name in ("test", "deepapl"):
        labs = np.array(feats[name].labels)
        for c in sorted(set(labs)):
            s = cell_scores[name][labs == c]
            by_class.setdefault(c, {})[name] = (float((s > shift.cell_cut).mean()), int(len(s)))
    res["beyond_cut_by_class"] = by_class
    res["per_patient"] = per_patient
    return res


def safety_table(feats, ref_obj, review_threshold: float) -> dict:
    """Per kind: share unclassified, share only sent to review (confidence below the review
    threshold), and share counted without review - the number that matters to a lab."""
    from batchwbc.engine import ood

    rows = {}
    d = feats["deepapl"]
    sets = {"test": feats["test"], **kinds(feats),
            "deepapl_known_classes": _subset(d, [i for i, c in enumerate(d.labels) if c != "smudge"])}
    for k, fs in sets.items():
        flagged = ood.score_and_flag(ref_obj, fs.emb)[1]
        low = fs.probs.max(axis=1) < review_threshold
        rows[k] = {"unclassified": float(flagged.mean()), "review_only": float((~flagged & low).mean()),
                   "counted_unreviewed": float((~flagged & ~low).mean()), "n": len(fs.labels)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--split", type=Path, default=Path("docs/model/test-split.csv"))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/batchwbc-ood-cache"))
    ap.add_argument("--candidates", action="store_true", help="compare every candidate score, not just the shipped one")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from batchwbc.engine import ood
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.onnx_graph import head_parameters

    feats = ood_features.compute(args.model, args.data, args.split, args.cache)
    n = {k: len(v.labels) for k, v in {**feats, **kinds(feats)}.items()}
    n["deepapl_known"] = sum(1 for c in feats["deepapl"].labels if c != "smudge")
    out: dict = {"n": n}
    if args.candidates:
        import onnx

        clf = Classifier(args.model, threads=1)
        head = head_parameters(onnx.load(str(clf.info.path)))
        _FEATS.update(feats)
        fns = {name: fit(feats["ref"], head) for name, fit in candidates().items()}
        out["candidates"] = cell_table(feats, fns)
        print_cell_table(out["candidates"], n)
    clf = Classifier(args.model, threads=1)
    ref_obj = ood.from_metadata(clf.info.metadata)
    if ref_obj is None:
        print("\nthe model carries no batchwbc.ood reference: run `python -m export.ood_reference` first.")
    else:
        d = feats["deepapl"]
        known = _subset(d, [i for i, c in enumerate(d.labels) if c != "smudge"])
        row = {"threshold": ref_obj.threshold, "reject_margin": ref_obj.reject_margin}
        for k, fs in {"held": feats["held"], "test": feats["test"], **kinds(feats), "deepapl_known_classes": known}.items():
            row[k] = float(ood.score_and_flag(ref_obj, fs.emb)[1].mean())  # the stored thresholds, both rules
        table = {f"shipped: {ref_obj.describe()}": row}
        out["shipped"] = table
        print_cell_table(table, n)
        sh = shift_eval(feats, ref_obj)
        out["data_shift"] = sh
        print(f"\nDATA_SHIFT ({sh['statistic']}; threshold {sh['threshold']:.4g}, no decision under {ood_min_cells()} cells)")
        for n_cells in (20, 50, 100, 200):
            print(f"  pseudo-patients of {n_cells} cells raising it: held-out training cells "
                  f"{100 * sh[f'held_n{n_cells}_raised']:.1f}%, test split {100 * sh[f'test_n{n_cells}_raised']:.1f}% (400 each)")
        print(f"  DeepAPL patients raising it: {100 * sh['deepapl_raised']:.1f}% of {sh['deepapl_patients_decided']} "
              f"with >= {ood_min_cells()} cells ({sh['deepapl_patients']} patients); lowest statistic {sh['deepapl_stat_min']:.4g}")
        for n_cells in (20, 50, 100):
            print(f"  DeepAPL patients cut to {n_cells} random cells: {100 * sh[f'deepapl_n{n_cells}_raised']:.1f}% "
                  f"of {sh[f'deepapl_n{n_cells}_patients']}")
        skew = sh["test_skewed_70pct_raised"]
        print("  test pseudo-patients of 100 cells, 70 of one class, raising it (200 per class): "
              + ", ".join(f"{c} {100 * v:.0f}%" for c, v in skew.items()))
        print("\nShare of cells beyond the DATA_SHIFT cell cut, per class (test split vs DeepAPL)")
        print("| class | test | DeepAPL |\n|---|---:|---:|")
        for c, v in sh["beyond_cut_by_class"].items():
            cell = lambda k: f"{100 * v[k][0]:.0f}% of {v[k][1]}" if k in v else ""  # noqa: E731
            print(f"| {c} | {cell('test')} | {cell('deepapl')} |")
        rt = clf.info.review_threshold or 0.5
        safety = safety_table(feats, ref_obj, rt)
        out["safety"] = safety
        print(f"\nWhat happens to each kind of crop (review threshold {rt:g})")
        print("| crops | n | unclassified | reviewed (low confidence) | counted without review |\n|---|---:|---:|---:|---:|")
        for k, v in safety.items():
            print(f"| {k} | {v['n']} | {100 * v['unclassified']:.1f}% | {100 * v['review_only']:.1f}% | "
                  f"{100 * v['counted_unreviewed']:.1f}% |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def ood_min_cells() -> int:
    from batchwbc.engine import data_shift

    return data_shift.MIN_CELLS


if __name__ == "__main__":
    main()
