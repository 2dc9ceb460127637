"""The reject-centre margin's trade-off on the export's own data: real cells set apart against junk let in.

Why: the margin is the 99.75th percentile of held-out training cells' gaps (nearest-class minus
nearest-reject distance) pooled over the sources, so the source whose cells sit nearest the
reject centres sets it. This rebuilds the reference exactly as `python -m export.ood_reference`
does (same seed and cells) and prints, for a few margins, the share of held-out cells above
it (set apart) and of the background corners and synthetic non-cells the reject centres were
fitted on below it (not caught by the rule).

    python benchmarks/reject_margin_tradeoff.py MODEL.onnx RUN/split.csv [--margins 48.6,30,20,10,0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    import export.ood_reference as export_ref
    from batchwbc.engine import ood

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("split", type=Path, help="the model's run split.csv (as for export.ood_reference)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--margins", default="")
    args = ap.parse_args(argv)
    seen: dict = {}
    fit = export_ref.fit_with_thresholds

    def keep(ref_emb, ref_labels, bg_emb, held_emb, held_labels, held_sources, rng, **kw):
        r = fit(ref_emb, ref_labels, bg_emb, held_emb, held_labels, held_sources, rng, **kw)
        junk = kw.get("junk_emb")
        for name, e in (("held", held_emb), ("background", bg_emb), ("non-cells", junk if junk is not None else bg_emb[:0])):
            _, known, rejected = ood.distances(r, e)
            seen[name] = known - rejected
        seen["sources"], seen["margin"] = np.asarray(held_sources), r.reject_margin
        return r

    export_ref.fit_with_thresholds = keep
    try:
        export_ref.build(args.model, args.data, args.split, log=lambda _: None)
    finally:
        export_ref.fit_with_thresholds = fit
    held, src = seen["held"], seen["sources"]
    per_source = ", ".join(f"{s} {np.quantile(held[src == s], ood.UNCLASSIFIED_QUANTILE):.1f}" for s in sorted(set(src.tolist())))
    print(f"{args.model.name}: margin {seen['margin']:.1f}; each source's own 99.75th percentile: {per_source}")
    margins = [float(m) for m in args.margins.split(",") if m] or [seen["margin"], 30, 20, 10, 0]
    for m in margins:
        print(f"  margin {m:6.1f}: held-out cells set apart {100 * (held > m).mean():.2f} %, "
              f"background corners not caught {100 * (seen['background'] <= m).mean():.1f} %, "
              f"non-cells not caught {100 * (seen['non-cells'] <= m).mean():.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
