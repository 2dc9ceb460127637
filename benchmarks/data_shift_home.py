"""How often would DATA_SHIFT fire on the model's own kind of data? Pseudo-patients of held-out test cells.

Why: a DATA_SHIFT rule that sees a new hospital is only worth having if it stays quiet for the
sources the model was validated on. Cells of a test split (never used for any threshold) are
embedded with the runtime's decoder, set apart as a run would (embedding rules and stain
colour), and drawn into 100 pseudo-patients of each of 20, 50, 100 and 200 cells per source
(as many sizes as the source holds); DeepAPL's test patients are also checked as they are.

    python benchmarks/data_shift_home.py MODEL.onnx docs/model/test-split-3src.csv [--scores-only]

--scores-only applies the older rule (scores alone) to the same reference, for comparison.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from batchwbc.engine import data_shift, ood
    from batchwbc.engine.embed import embed_files
    from batchwbc.engine.model import Classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("split", type=Path, help="a split CSV (path, class_id, source, split); every row is used")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--scores-only", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    clf = Classifier(args.model, threads=2)
    ref = clf.ood
    if ref is None or ref.shift is None:
        print(f"{args.model} has no DATA_SHIFT reference")
        return 1
    if args.scores_only:
        ref = dataclasses.replace(ref, shift=dataclasses.replace(ref.shift, counts_set_apart=False))
    rows = list(csv.DictReader(open(args.split, encoding="utf-8")))
    got = embed_files(clf, [str(args.data / r["path"]) for r in rows], workers=0)
    kept = [rows[i] for i in got.ok]
    score, verdict = ood.verdicts_from_colour(ref, got.embeddings, got.colour)  # the runtime's verdict
    set_apart = verdict != 0
    counted = np.asarray(data_shift.shift_scores(ref, score, set_apart), dtype=np.float64)
    src = np.array([r["source"] for r in kept])
    rng = np.random.default_rng(args.seed)
    print(f"{args.model.name}: set-apart cells {'counted' if ref.shift.counts_set_apart else 'not counted'}; "
          f"{len(kept)} test cells, {100 * set_apart.mean():.2f} % set apart")
    for s in sorted(set(src.tolist())):
        idx = np.flatnonzero(src == s)
        raised = total = 0
        for n in data_shift.PSEUDO_PATIENT_SIZES:
            if n > len(idx):
                continue
            for _ in range(100):
                raised += data_shift.decide(ref, counted[rng.choice(idx, n, replace=False)]).raised
                total += 1
        print(f"  {s}: {len(idx)} cells, DATA_SHIFT for {raised} of {total} pseudo-patients")
    patients = np.array([r["path"].split("/")[2] if r["source"] == "DeepAPL" else "" for r in kept])
    decisions = [data_shift.decide(ref, counted[patients == p]) for p in sorted(set(patients.tolist()) - {""})]
    if decisions:
        print(f"  DeepAPL test patients: {sum(d.raised for d in decisions)} DATA_SHIFT of "
              f"{sum(d.decided for d in decisions)} decided ({len(decisions)} patients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
