"""Where do a new lab's cells and junk crops fall on the reject-centre rule? (Measured; the rule is not changed.)

Why: `batchwbc adapt` keeps the parent's background rule (a crop is unclassified when its
distance to the nearest cell class exceeds its distance to the nearest reject centre by more
than the margin), so noise and background stay caught. For a lab on another analyzer this rule,
not the score, sets apart a third of its verified cells for good (ADR 0011). This prints, for
the lab's cells (a benchmarks/adapt_cache.py cache made with MODEL) and for the noise and
background corpus of tests/test_ood_bundled.py, the gap (nearest-class distance minus
nearest-reject distance), and what a margin re-derived from the lab's cells would leave.

    PYTHONPATH=. python benchmarks/reject_margin_probe.py MODEL.onnx /tmp/lab-emb.npz
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from batchwbc.engine import ood
    from batchwbc.engine.embed import embed_files
    from batchwbc.engine.model import Classifier
    from test_ood_bundled import build_ood_corpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args(argv)
    clf = Classifier(args.model, threads=2)
    ref = clf.ood
    d = np.load(args.cache)
    _, known, rejected = ood.distances(ref, d["embeddings"].astype(np.float32))
    lab = known - rejected
    with tempfile.TemporaryDirectory() as tmp:
        build_ood_corpus(Path(tmp) / "slides", args.data)
        files = sorted(str(p) for p in (Path(tmp) / "slides").rglob("*") if p.is_file())
        got = embed_files(clf, files, workers=0)
    junk_score, jk, jr = ood.distances(ref, got.embeddings)
    junk = jk - jr
    print(f"{args.model.name}: reject margin {ref.reject_margin:.1f}; lab cells {len(lab)}, "
          f"{100 * (lab > ref.reject_margin).mean():.1f} % set apart by the rule")
    print("lab gap at 50/90/99/99.75 %:", " / ".join(f"{v:.1f}" for v in np.quantile(lab, [.5, .9, .99, .9975])))
    print(f"noise and background ({len(junk)} crops): gap {junk.min():.1f} to {junk.max():.1f}")
    for q in (0.9, 0.99, 0.9975):
        m = float(np.quantile(lab, q))
        caught = ((junk > m) | (junk_score > ref.threshold)).mean()
        print(f"margin at the lab's {100 * q:g}th percentile ({m:.1f}): lab cells set apart {100 * (lab > m).mean():.1f} %, "
              f"noise and background still caught {100 * caught:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
