"""False and missed flag rates on simulated patients built from held-out test cells.

A simulated patient (batchwbc.simulate) has a known composition, so the flags its true
differential raises are known; the model's differential of the same crops raises others.
This script builds the patients from the bundled model's test split only (PBC + Munich, the
sources the model was validated on), classifies them once with the runtime's own pipeline,
and scores the rule sets on the same cells:

- before: the rules before issue 12 (every classified cell counts, review cells included;
  MANY_LOW_CONFIDENCE when > 10% of cells are in review), frozen here;
- after: `batchwbc.core.flags.evaluate` as shipped (definite flags from confident cells, pending
  flags for what only review cells raise);
- after, % flags on all cells: the alternative for BLASTS_HIGH / IG_HIGH / BANDS_HIGH (all
  cells counted, no pending twin), to choose between the two by measurement.

    python benchmarks/flag_rates.py --data ../shared/data --normal 20 --abnormal 4 --cells 150 --seed 1

The patients come from PBC_dataset_normal_DIB and AML-Cytomorphology_LMU below --data (only
those two are linked into a temporary folder); --other-source (DeepAPL, never seen by the
model) adds normal compositions from another analyzer, scored in a table of their own.
A flag is *false* when the true differential does not raise it (nor a flag that suppresses
it), *missed* when the true differential raises it and the model's does not.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchwbc.core import flags as F  # noqa: E402
from batchwbc.core.config import Settings, load_settings  # noqa: E402
from batchwbc.core.differential import Differential, summarize  # noqa: E402
from batchwbc.core.records import CellResult  # noqa: E402
from batchwbc.simulate import PRESETS, simulate  # noqa: E402

SOURCES = ("PBC_dataset_normal_DIB", "AML-Cytomorphology_LMU")

#: Abnormal compositions besides the simulate presets: the low counts where one cell decides.
EXTRA = {
    "nrbc_low": {**PRESETS["normal"], "erythroblast": 2},
    "blasts_low": {**PRESETS["normal"], "myeloblast": 2},
    "ig_mild": {**PRESETS["normal"], "metamyelocyte": 3, "myelocyte": 2},
}
ABNORMAL = ("aml", "left_shift", "nrbc", "nrbc_low", "blasts_low", "ig_mild")
#: Flags about the run's quality rather than the patient's blood: scored separately.
QUALITY = {F.LOW_WBC, F.MANY_LOW_CONFIDENCE}


# ------------------------------------------------------------------ the "before" rules, frozen

def legacy_flags(d: Differential, s: Settings) -> list[str]:
    """The codes the pre-issue-12 rules raised: every cell counted, review or not."""
    out = []
    if d.blasts_pct is not None and d.blasts_pct >= 20.0 - 1e-9:
        out.append(F.BLASTS_HIGH)
    elif d.blasts >= 1:
        out.append(F.BLASTS_PRESENT)
    if d.ig_pct is not None and d.ig_pct > 2.0 + 1e-9:
        out.append(F.IG_HIGH)
    if d.band_pct is not None and d.band_pct > 10.0 + 1e-9:
        out.append(F.BANDS_HIGH)
    if d.nrbc >= 1:
        out.append(F.NRBC_PRESENT)
    if d.wbc < 100:
        out.append(F.LOW_WBC)
    if d.n_cells and 100.0 * d.n_review / d.n_cells > 10.0 + 1e-9:
        out.append(F.MANY_LOW_CONFIDENCE)
    return out


def current_flags(d: Differential, s: Settings) -> list[str]:
    return [f.code for f in F.evaluate(d, s)]


_PCT_CODES = {F.BLASTS_HIGH, F.IG_HIGH, F.BANDS_HIGH}


def pct_on_all_cells(d: Differential, s: Settings) -> list[str]:
    """The alternative to choose against: count flags as shipped, but the percentage flags
    (and nothing pending for them) on all cells, review included, as before."""
    codes = [c for c in current_flags(d, s) if c not in _PCT_CODES and definite(c) not in _PCT_CODES]
    old = [c for c in legacy_flags(d, s) if c in _PCT_CODES]
    if F.BLASTS_HIGH in old:
        codes = [c for c in codes if definite(c) != F.BLASTS_PRESENT]
    return old + codes


# ------------------------------------------------------------------ scoring

def definite(code: str) -> str:
    """The definite flag a code stands for (a pending code names the flag it may become)."""
    return F.PENDING_OF.get(code, code)


def is_pending(code: str) -> bool:
    return code in F.PENDING_OF


def truth_codes(classes: Iterable[str], s: Settings) -> set[str]:
    cells = [CellResult("t", f"{i}", c, 1.0, c, 0.0, False) for i, c in enumerate(classes)]
    return {c for c in current_flags(summarize(cells), s) if c not in QUALITY and not is_pending(c)}


def suppressors(code: str) -> set[str]:
    return {c for r in F.FLAG_RULES if r.code == code for c in r.suppressed_by}


def score(patients: Mapping[str, tuple[str, set[str], Sequence[CellResult]]], rules, s: Settings) -> dict:
    """patients: name -> (preset, true codes, the model's cells)."""
    res = {"normal_patients": 0, "normal_with_false": 0, "false_by_code": Counter(), "pending_by_code": Counter(),
           "abnormal_patients": 0, "abnormal_with_false": 0, "expected": Counter(), "caught": Counter(),
           "caught_or_pending": Counter(), "quality_by_code": Counter(), "patients": 0,
           "normal_with_pending": 0}
    for name, (preset, truth, cells) in patients.items():
        codes = rules(summarize(cells), s)
        res["patients"] += 1
        for c in codes:
            if c in QUALITY:
                res["quality_by_code"][c] += 1
        raised = {c for c in codes if c not in QUALITY and not is_pending(c)}
        pending = {definite(c) for c in codes if is_pending(c)}
        false = {c for c in raised if c not in truth and not (suppressors(c) & truth)}
        normal = preset in ("normal", "other")  # "other": normal compositions from an unseen source
        res["normal_patients" if normal else "abnormal_patients"] += 1
        if false:
            res["normal_with_false" if normal else "abnormal_with_false"] += 1
        for c in false:
            res["false_by_code"][c] += 1
        for c in pending:
            res["pending_by_code"][c] += 1
        if normal and pending:
            res["normal_with_pending"] += 1
        for c in truth:
            res["expected"][c] += 1
            hit = c in raised or (c == F.BLASTS_PRESENT and F.BLASTS_HIGH in raised)
            res["caught"][c] += hit
            res["caught_or_pending"][c] += hit or c in pending
    return res


def classify(slides: Path, workers: int) -> list[CellResult]:
    from batchwbc.inputs.slide_folders import discover
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.pipeline import Pipeline

    clf = Classifier(None, threads=1, spinning=False)
    found = discover(slides)
    pipe = Pipeline(clf.info.input_size, clf, clf.info.review_threshold, workers=workers)
    out = pipe.run(found.crops)
    if out.errors:
        raise SystemExit(f"{len(out.errors)} crops failed: {out.errors[:3]}")
    return out.cells


def table(*results: dict) -> str:
    def pct(a: int, b: int) -> str:
        return f"{a}/{b} ({100.0 * a / b:.0f}%)" if b else "-"

    before = results[0]
    rows: list[tuple[str, ...]] = []

    def add(label: str, fn) -> None:
        rows.append((label, *(fn(r) for r in results)))

    add("Normal patients with >= 1 false flag", lambda r: pct(r["normal_with_false"], r["normal_patients"]))
    for c in sorted(set().union(*(r["false_by_code"] for r in results))):
        add(f"  false {c} (all patients)", lambda r: str(r["false_by_code"][c]))
    add("Normal patients with a pending-review flag", lambda r: pct(r["normal_with_pending"], r["normal_patients"]))
    for c in sorted(set().union(*(r["pending_by_code"] for r in results))):
        add(f"  pending {c} (all patients)", lambda r: str(r["pending_by_code"][c]))
    add("Abnormal patients with >= 1 false flag", lambda r: pct(r["abnormal_with_false"], r["abnormal_patients"]))
    for c in sorted(before["expected"]):
        e = before["expected"][c]
        add(f"Missed {c} (definite)", lambda r: pct(e - r["caught"][c], e))
        add(f"Missed {c} (neither definite nor pending)", lambda r: pct(e - r["caught_or_pending"][c], e))
    for c in sorted(QUALITY):
        add(f"{c} raised (all patients)", lambda r: pct(r["quality_by_code"][c], r["patients"]))
    return rows


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


#: Predicted classes behind the count-based and percentage flags.
WATCHED = ("myeloblast", "erythroblast", "neutrophil_band", "promyelocyte", "myelocyte", "metamyelocyte")


def calls_table(truth_by: Mapping[str, list], cells_by: Mapping[str, Sequence[CellResult]]) -> str:
    """How often a call of each watched class is right, for confident and for review cells
    (over all simulated patients): the measurement behind counting only confident cells."""
    calls: dict[tuple[str, bool], Counter] = defaultdict(Counter)
    for p, cells in cells_by.items():
        true = {f: c for f, c in truth_by[p]}
        for c in cells:
            if c.class_id in WATCHED:
                t = true[c.file.split("/", 1)[1]]
                calls[(c.class_id, c.review)]["right" if t == c.class_id else "wrong"] += 1
                calls[(c.class_id, c.review)][f"true {t}"] += 1
    out = ["| called | confident: right / all | review: right / all | commonest wrong truth (confident; review) |",
           "|---|---|---|---|"]
    for k in WATCHED:
        conf, rev = calls[(k, False)], calls[(k, True)]

        def frac(c: Counter) -> str:
            n = c["right"] + c["wrong"]
            return f"{c['right']}/{n} ({100.0 * c['right'] / n:.0f}%)" if n else "0/0"

        def worst(c: Counter) -> str:
            w = [(v, t[5:]) for t, v in c.items() if t.startswith("true ") and t[5:] != k]
            return ", ".join(f"{t} {v}" for v, t in sorted(w, reverse=True)[:2]) or "-"
        out.append(f"| {k} | {frac(conf)} | {frac(rev)} | {worst(conf)}; {worst(rev)} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--split-csv", type=Path, default=Path("docs/model/test-split.csv"))
    ap.add_argument("--normal", type=int, default=20, help="simulated normal patients")
    ap.add_argument("--abnormal", type=int, default=4, help="patients per abnormal composition")
    ap.add_argument("--cells", type=int, default=150, help="cells per patient (<= 180: the test split has 108 segmented neutrophils)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--other-source", default="DeepAPL",
                    help="a labelled folder below --data the model never saw: normal patients from it "
                         "show what MANY_LOW_CONFIDENCE does on unfamiliar images ('' to skip)")
    ap.add_argument("--other-patients", type=int, default=4)
    ap.add_argument("--cells-json", type=Path, help="reuse (or save) the classified cells here")
    ap.add_argument("--json", type=Path, help="also write the scores as JSON")
    args = ap.parse_args(argv)

    settings = load_settings(None)
    comps = {**PRESETS, **EXTRA}
    with tempfile.TemporaryDirectory() as tmp:
        if args.cells_json and args.cells_json.is_file():
            saved = json.loads(args.cells_json.read_text())
            truth_by = {p: v["truth"] for p, v in saved.items()}
            cells_by = {p: [CellResult(**c) for c in v["cells"]] for p, v in saved.items()}
        else:
            data = Path(tmp) / "data"
            data.mkdir()
            for name in SOURCES:
                (data / name).symlink_to((args.data / name).resolve(), target_is_directory=True)
            slides = Path(tmp) / "slides"
            truth_by = defaultdict(list)
            n = 0
            for preset, count in (("normal", args.normal), *((a, args.abnormal) for a in ABNORMAL)):
                out = Path(tmp) / f"sim_{preset}"
                rows = simulate(data, out, count, args.cells, [(preset, comps[preset])], seed=args.seed + n,
                                split_csv=args.split_csv, only_split="test")
                n += 1
                slides.mkdir(exist_ok=True)
                for p in sorted({r.patient for r in rows}):
                    (slides / f"{preset}_{p}").symlink_to(out / p, target_is_directory=True)
                for r in rows:
                    truth_by[f"{preset}_{r.patient}"].append([r.file.split("/", 1)[1], r.class_id])
            if args.other_source:
                other = Path(tmp) / "other"
                other.mkdir()
                (other / args.other_source).symlink_to((args.data / args.other_source).resolve(),
                                                       target_is_directory=True)
                out = Path(tmp) / "sim_other"
                rows = simulate(other, out, args.other_patients, args.cells, [("normal", PRESETS["normal"])],
                                seed=args.seed + n)
                for p in sorted({r.patient for r in rows}):
                    (slides / f"other_{p}").symlink_to(out / p, target_is_directory=True)
                for r in rows:
                    truth_by[f"other_{r.patient}"].append([r.file.split("/", 1)[1], r.class_id])
            cells = classify(slides, args.workers)
            test = Path(tmp) / "testsplit" / "all"  # the whole test split as one patient
            test.mkdir(parents=True)
            with open(args.split_csv, newline="", encoding="utf-8") as fh:
                for i, row in enumerate(r for r in csv.DictReader(fh) if r["split"] == "test"):
                    src = (args.data / row["path"]).resolve()
                    (test / f"{i:04d}{src.suffix}").symlink_to(src)
            split_cells = classify(test.parent, args.workers)
            truth_by["testsplit"] = []
            cells = [*cells, *(CellResult(**{**vars(c), "patient": "testsplit"}) for c in split_cells)]
            cells_by = defaultdict(list)
            for c in cells:
                cells_by[c.patient].append(c)
            if args.cells_json:
                args.cells_json.write_text(json.dumps({
                    p: {"truth": truth_by[p], "cells": [{k: v for k, v in vars(c).items() if k != "thumbnail_jpeg"}
                                                         for c in cells_by[p]]} for p in truth_by}))
    split_cells = cells_by.pop("testsplit", [])
    truth_by.pop("testsplit", None)
    if split_cells:
        k = sum(c.review for c in split_cells)
        u = sum(c.class_id == "unclassified" for c in split_cells)
        print(f"the model's own test split: {k}/{len(split_cells)} cells in review ({100.0 * k / len(split_cells):.1f}%), "
              f"{u} of them unclassified")
    patients = {p: (p.split("_SIM")[0], truth_codes([c for _, c in truth_by[p]], settings), cells_by[p])
                for p in sorted(truth_by)}
    others = {p: v for p, v in patients.items() if v[0] == "other"}
    patients = {p: v for p, v in patients.items() if v[0] != "other"}
    print(calls_table(truth_by, {p: cells_by[p] for p in patients}))
    review = sum(c.review for _, _, cs in patients.values() for c in cs)
    total = sum(len(cs) for _, _, cs in patients.values())
    variants = {"before": legacy_flags, "after": current_flags, "after, % flags on all cells": pct_on_all_cells}
    scores = {k: score(patients, fn, settings) for k, fn in variants.items()}
    unclassified = sum(c.class_id == "unclassified" for _, _, cs in patients.values() for c in cs)
    print(f"{len(patients)} patients, {total} cells, {review} in review ({100.0 * review / total:.1f}%), "
          f"{unclassified} of them unclassified")
    shares: dict[str, list[float]] = defaultdict(list)
    for p, (preset, _, cs) in {**patients, **others}.items():
        shares[preset].append(100.0 * sum(c.review for c in cs) / len(cs))
    for preset, v in shares.items():
        print(f"review share, {preset}: median {sorted(v)[len(v) // 2]:.1f}%, range {min(v):.1f}-{max(v):.1f}%")
    print(markdown(["measure", *variants], table(*scores.values())))
    if others:
        print(f"\nNormal patients from {args.other_source} (a source the model never saw):")
        other_scores = {k: score(others, fn, settings) for k, fn in variants.items()}
        print(markdown(["measure", *variants], table(*other_scores.values())))
        scores["other source"] = other_scores
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1, default=dict))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
