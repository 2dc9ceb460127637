"""Per-source numbers a lab cares about, for any batchwbc model on a split's test rows (issue 11).

For each source (and PBC + Munich together): accuracy and macro-F1 over the paper's ten
classes and over all, blast recall / precision, smudge F1, calibration error, the share of
cells sent to review or left unclassified, and the false-alarm rate a lab sees on healthy
patients: the share of mature normal cells (basophil, eosinophil, lymphocyte, monocyte,
segmented neutrophil) called blast, immature granulocyte or erythroblast. Every crop goes
through the runtime exactly as `batchwbc run` would classify it (batchwbc.commands.evaluate).

    python benchmarks/source_metrics.py --model batchwbc/models/batchwbc-wbc13.onnx \\
        --data ../shared/data --split docs/model/test-split.csv [--json out.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MATURE = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil_segmented")
ALARM = ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "erythroblast")


def _f(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _has(per: dict, class_id: str) -> bool:
    """The class is there and some verified cell belongs to it (else recall/F1 mean nothing)."""
    return class_id in per and per[class_id].support > 0


def run_view(preds, threshold: float | None) -> dict:
    """Issue 18's rows, counted as the report counts: an unclassified crop is an abstention
    (coverage), accuracy and blast/smudge scores are over the classified crops, and a mature
    cell is a false alarm only when it is *confidently* called blast/IG/NRBC (classified and
    not sent to review), since a reviewed cell reaches a person before any count."""
    from batchwbc.core import catalogue
    from batchwbc.engine.ood import UNCLASSIFIED

    t, p, c = preds.true_ids, preds.pred_ids, preds.confidence
    thr = threshold if threshold is not None else 0.5
    classified = [i for i in range(len(t)) if p[i] != UNCLASSIFIED]
    paper = set(catalogue.PAPER_CLASS_IDS)
    p10 = [i for i in classified if t[i] in paper]

    def prf(k: str) -> tuple[float | None, float | None, float | None]:
        tp = sum(t[i] == k and p[i] == k for i in classified)
        support = sum(t[i] == k for i in classified)
        called = sum(p[i] == k for i in classified)
        if not support:
            return None, None, None
        r, pr = tp / support, (tp / called if called else float("nan"))
        return r, pr, (2 * r * pr / (r + pr) if called and (r + pr) else 0.0)

    mature = [i for i in range(len(t)) if t[i] in MATURE]
    confident_alarm = sum(p[i] in ALARM and c[i] >= thr for i in mature)
    br, bp, _ = prf("myeloblast")
    return {
        "coverage": len(classified) / max(1, len(t)),
        "paper10_accuracy_classified": (sum(t[i] == p[i] for i in p10) / len(p10)) if p10 else None,
        "blast_recall_classified": br, "blast_precision_classified": bp,
        "smudge_f1_classified": prf("smudge")[2],
        "mature_confidently_called_blast_ig_nrbc": confident_alarm / len(mature) if mature else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--only-split", default="test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from batchwbc.core import catalogue, agreement
    from batchwbc.inputs.public_datasets import LabelledImage
    from batchwbc.commands.evaluate import predict_labelled
    from batchwbc.commands.run import load_classifier
    from batchwbc.inputs.labelled_folders import LabelledSet

    clf = load_classifier(args.model, 1)
    classes = tuple(clf.info.classes)
    root = Path(args.data)
    by_source: dict[str, list] = defaultdict(list)
    with open(args.split, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["split"] != args.only_split or row["class_id"] not in classes:
                continue
            patient = row["path"].split("/")[2] if row["source"] == "DeepAPL" else None
            by_source[row["source"]].append(LabelledImage(root / row["path"], row["class_id"], row["source"], patient))
    groups = {s: items for s, items in sorted(by_source.items())}
    home = [it for s, items in groups.items() if s != "DeepAPL" for it in items]
    if home and "DeepAPL" in groups:
        groups["PBC + AML-LMU"] = home
    out = {}
    print(f"model {clf.info.model_version} ({clf.info.path.name}); split {args.split} rows '{args.only_split}'")
    head = ("source", "n", "acc10", "F1-10", "acc", "macroF1", "blastR", "blastP", "smudgeF1", "ECE",
            "review", "unclass", "mature->alarm")
    print("".join(f"{h:>14s}" if i else f"{h:16s}" for i, h in enumerate(head)))
    for name, items in groups.items():
        preds = predict_labelled(LabelledSet(items=items), root, clf, args.workers, 4)
        # the classifier-only view (an unclassified crop scored by its best class), as the model
        # card's table has always been measured; `batchwbc evaluate` reports the run's view too
        ev = agreement.evaluate(preds.true_ids, preds.pred_ids, preds.confidence, preds.patients, classes,
                                 model_threshold=clf.info.review_threshold, guess_ids=preds.guess_ids)
        per = {m.class_id: m for m in ev.classifier.per_class}
        mature = [(t, p) for t, p in zip(preds.true_ids, preds.guess_ids) if t in MATURE]
        alarm = sum(p in ALARM for _, p in mature) / len(mature) if mature else float("nan")
        thr = clf.info.review_threshold or 0.5
        review = sum(c < thr for c in preds.confidence) / max(1, len(preds.confidence))
        rec = {
            "n": ev.n, "paper10_accuracy": ev.classifier_paper10.accuracy, "paper10_macro_f1": ev.classifier_paper10.macro_f1,
            "accuracy": ev.classifier.accuracy, "macro_f1": ev.classifier.macro_f1,
            "blast_recall": per["myeloblast"].recall if _has(per, "myeloblast") else None,
            "blast_precision": per["myeloblast"].precision if _has(per, "myeloblast") else None,
            "smudge_f1": per["smudge"].f1 if _has(per, "smudge") else None,
            "ece": ev.calibration.ece, "share_review": review,
            "share_unclassified": preds.unclassified / max(1, ev.n),
            "mature_called_blast_ig_nrbc": alarm, "mature_n": len(mature),
        }
        rec.update(run_view(preds, clf.info.review_threshold))
        out[name] = rec
        vals = (ev.n, rec["paper10_accuracy"], rec["paper10_macro_f1"], rec["accuracy"], rec["macro_f1"],
                rec["blast_recall"], rec["blast_precision"], rec["smudge_f1"], rec["ece"], review,
                rec["share_unclassified"], alarm)
        print(f"{name:16s}" + "".join(f"{v:>14d}" if isinstance(v, int) else f"{_f(v):>14s}" for v in vals))
    print("\nissue 18's rows (report view: unclassified = abstention; scores over classified crops;"
          " false alarms = mature cells confidently called blast/IG/NRBC)")
    head2 = ("source", "coverage", "acc10", "blastR", "blastP", "smudgeF1", "ECE", "review", "conf.alarm")
    print("".join(f"{h:>14s}" if i else f"{h:16s}" for i, h in enumerate(head2)))
    for name, rec in out.items():
        vals = (rec["coverage"], rec["paper10_accuracy_classified"], rec["blast_recall_classified"],
                rec["blast_precision_classified"], rec["smudge_f1_classified"], rec["ece"], rec["share_review"],
                rec["mature_confidently_called_blast_ig_nrbc"])
        print(f"{name:16s}" + "".join(f"{_f(v):>14s}" for v in vals))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": clf.info.model_version, "split": args.split, "sources": out},
                                              indent=2, default=lambda x: None))
    _ = catalogue


if __name__ == "__main__":
    main()
