"""How much synthetic junk would a run count as cells? Out-of-sample background corners and non-cells.

Why: the OOD guard is tested on 20 crops (tests/test_ood_bundled.py); the reject centres are
fitted on 600 background corners and 600 synthetic non-cells of training crops
(export/ood_reference.py). This draws new ones, made the same way but from the test split's
crops and with another seed, and runs the runtime's verdict on them (score threshold, reject
rule, not-a-cell rule, stain colour): the share counted as a cell; of those, how many the review
threshold does not send to a person, and how many were called a leukocyte (so would enter the
differential's denominator) without review.

    python benchmarks/junk_counted.py MODEL.onnx docs/model/test-split-3src.csv [--n 300]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from batchwbc.core import catalogue
    from batchwbc.engine import ood
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.preprocess import decode_rgb, read_bytes
    from export.ood_reference import background_corner, embed_loaders, not_a_cell

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    clf = Classifier(args.model, threads=2)
    ref = clf.ood
    if ref is None:
        print(f"{args.model} has no OOD reference")
        return 1
    rows = list(csv.DictReader(open(args.split, encoding="utf-8")))
    rng = np.random.default_rng(args.seed)
    donors = [args.data / rows[i]["path"] for i in rng.permutation(len(rows))[: args.n]]
    print(f"{args.model.name}: threshold {ref.threshold:.3g}, reject margin {ref.reject_margin:.3g}, review below {clf.info.review_threshold}")
    for name, make in (("background corners", background_corner), ("synthetic non-cells", not_a_cell)):
        r = np.random.default_rng(args.seed + (1 if make is not_a_cell else 0))
        got = embed_loaders(clf, [(lambda p=p: make(decode_rgb(read_bytes(p)), r)) for p in donors])
        _, verdict = ood.verdicts_from_colour(ref, got.emb, got.colour)  # the runtime's verdict
        counted = verdict == 0
        confident = counted & (got.probs.max(axis=1) >= clf.info.review_threshold)
        called = np.asarray(clf.info.classes)[got.probs.argmax(axis=1)]
        in_wbc = counted & np.isin(called, catalogue.WBC_CLASS_IDS)  # in the differential's denominator
        _, known, rejected = ood.distances(ref, got.emb)
        gap = known - rejected
        print(f"  {name}: {len(counted)} crops; counted as a cell {100 * counted.mean():.1f} % "
              f"({counted.sum()}), of them without review {confident.sum()}; as a leukocyte {in_wbc.sum()} "
              f"({(in_wbc & confident).sum()} without review); "
              f"gap (nearest class - nearest reject) 5th percentile {np.quantile(gap, 0.05):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
