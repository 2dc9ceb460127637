"""How many patients of a folder would a model's report flag DATA_SHIFT for?

Why: DATA_SHIFT is the banner that sends a lab to `evaluate` and `adapt`; whether it fires for
a hospital the model never saw is measured here, patient by patient, with the runtime's own
pipeline and decision (no workbook).

    python benchmarks/data_shift_by_patient.py MODEL.onnx ../shared/data/DeepAPL/All
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from batchwbc.engine import data_shift
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.pipeline import Pipeline
    from batchwbc.inputs.slide_folders import discover

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("slides", type=Path, help="a slides folder: one sub-folder per patient")
    args = ap.parse_args(argv)
    clf = Classifier(args.model, threads=2)
    if clf.ood is None or clf.ood.shift is None:
        print(f"{args.model} has no DATA_SHIFT reference")
        return 1
    cells = Pipeline(clf.info.input_size, clf, clf.info.review_threshold, workers=0).run(discover(args.slides).crops).cells
    decisions, _ = data_shift.decide_all(clf.info.metadata, cells)  # the report's own decision
    unclassified = collections.Counter(c.patient for c in cells if c.class_id == "unclassified")
    print(f"{args.model.name}: cell cut {clf.ood.shift.cell_cut:.3f}, threshold {clf.ood.shift.threshold:.3f}, "
          f"set-apart cells {'counted' if clf.ood.shift.counts_set_apart else 'not counted'}; "
          f"{len(decisions)} patients, {sum(d.decided for d in decisions.values())} decided, "
          f"{sum(d.raised for d in decisions.values())} DATA_SHIFT; "
          f"{100 * sum(unclassified.values()) / max(1, len(cells)):.1f} % of {len(cells)} cells unclassified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
