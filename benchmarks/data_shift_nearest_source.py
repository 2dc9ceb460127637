"""Would DATA_SHIFT see a new hospital if each cell were compared with the cut of the training
source nearest to it in stain colour, rather than the highest source cut? (Measured, not built.)

The model's own validation cells (a run's split.csv, rows "val") give each source's 80th-percentile
score and the pseudo-patient threshold under that rule; the new hospital's cells come from a
cache of benchmarks/adapt_cache.py made with the same model.

    python benchmarks/data_shift_nearest_source.py TWIN.onnx RUN/split.csv /tmp/twin-deepapl-emb.npz
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from batchwbc.engine import ood, stain_colour
    from batchwbc.engine.data_shift import PSEUDO_PATIENT_SIZES, lower_bound
    from batchwbc.engine.embed import embed_files
    from batchwbc.engine.model import Classifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("split", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args(argv)
    clf = Classifier(args.model, threads=2)
    ref, env = clf.ood, clf.ood.colour
    rows = [r for r in csv.DictReader(open(args.split, encoding="utf-8")) if r["split"] == "val"]
    got = embed_files(clf, [str(args.data / r["path"]) for r in rows], workers=0)
    src = np.array([rows[i]["source"] for i in got.ok])
    s_home = ood.score(ref, got.embeddings)

    def nearest(stats: np.ndarray) -> np.ndarray:
        return np.array(env.groups)[stain_colour.group_distances(env, stats).argmin(axis=1)]

    cuts = {g: float(np.quantile(s_home[src == g], 0.8)) for g in env.groups}
    cut_home = np.array([cuts[g] for g in nearest(got.colour)])
    rng = np.random.default_rng(0)
    stats = []
    for g in sorted(set(src.tolist())):
        idx = np.flatnonzero(src == g)
        for n in PSEUDO_PATIENT_SIZES:
            for _ in range(50):
                pick = rng.choice(idx, min(n, len(idx)), replace=False)
                stats.append(lower_bound(int((s_home[pick] > cut_home[pick]).sum()), len(pick)))
    threshold = max(stats)
    d = np.load(args.cache)
    s_new = ood.score(ref, d["embeddings"].astype(np.float32))
    near = nearest(d["colour"])
    cut_new = np.array([cuts[g] for g in near])
    pats = d["patients"]
    print(f"per-source cuts {cuts}; threshold under the rule {threshold:.3f} (stored: cut {ref.shift.cell_cut:.3f}, "
          f"threshold {ref.shift.threshold:.3f})")
    print("new cells colour-nearest:", {g: round(float((near == g).mean()), 3) for g in env.groups})
    for name, cut, thr in (("stored", np.full(len(s_new), ref.shift.cell_cut), ref.shift.threshold),
                           ("nearest-colour source", cut_new, threshold)):
        raised = decided = 0
        shares = []
        for p in np.unique(pats):
            m = pats == p
            if m.sum() < 20:
                continue
            u = int((s_new[m] > cut[m]).sum())
            decided += 1
            shares.append(u / m.sum())
            raised += lower_bound(u, int(m.sum())) > thr
        print(f"{name}: DATA_SHIFT for {raised} of {decided} patients; median share beyond the cut {np.median(shares):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
