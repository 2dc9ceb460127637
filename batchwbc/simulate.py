"""Simulated patients with a known differential, drawn from any labelled folder.

Real patients' true differentials are never known exactly; a simulated patient - real
labelled crops sampled in chosen proportions into a slides folder - is, so the whole
pipeline (discovery -> model -> counting -> report) can be checked against the truth, on the
public datasets or on a lab's own labelled cells. Counts are allocated exactly (largest
remainder), so the truth is a fixed composition, not itself a random sample.

    python -m batchwbc.simulate --data ../shared/data --out /tmp/sim --patients 4 --cells 200 \\
        --preset normal --preset aml --seed 1
    python -m batchwbc.simulate --data ../shared/data --out /tmp/sim --patients 1 --cells 300 \\
        --composition "neutrophil_segmented=60,lymphocyte=30,monocyte=10"

Files are symlinked by default (`--copy` copies) under anonymous names (cell_0001.jpg), in
shuffled order, so neither a name nor the order gives the class away. `truth.csv` (patient,
file, class_id, source, original) and `composition.json` record the truth. To evaluate a
model only on images it never trained on, pass `--split-csv runs/NAME/split.csv --only-split
test`, or `--exclude-list CSV` with a `path` column of files to leave out.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from batchwbc.core import catalogue
from batchwbc.inputs.public_datasets import LabelledImage, read_any

log = logging.getLogger(__name__)

#: Compositions in percent of all cells, loosely modelled on typical peripheral smears.
PRESETS: dict[str, dict[str, float]] = {
    "normal": {"neutrophil_segmented": 58, "neutrophil_band": 2, "lymphocyte": 30, "monocyte": 6,
               "eosinophil": 3, "basophil": 1},
    "left_shift": {"neutrophil_segmented": 45, "neutrophil_band": 18, "metamyelocyte": 8, "myelocyte": 6,
                   "promyelocyte": 3, "lymphocyte": 15, "monocyte": 5},
    "aml": {"myeloblast": 40, "promyelocyte": 4, "neutrophil_segmented": 20, "lymphocyte": 25, "monocyte": 8,
            "erythroblast": 3},
    "nrbc": {"neutrophil_segmented": 50, "lymphocyte": 28, "monocyte": 6, "eosinophil": 3, "erythroblast": 8,
             "platelet": 5},
    "lymphocytosis": {"lymphocyte": 70, "neutrophil_segmented": 22, "monocyte": 5, "eosinophil": 2, "basophil": 1},
}


class SimulationError(Exception):
    """Impossible request (unknown class, too few images...); str is one sentence."""


@dataclass(frozen=True)
class TruthRow:
    patient: str
    file: str  # POSIX path relative to the slides folder, as batchwbc reports it
    class_id: str
    source: str
    original: str  # the labelled image it came from


def parse_composition(text: str) -> dict[str, float]:
    """'neutrophil_segmented=60,lymphocyte=30' -> normalised percentages summing to 100."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise SimulationError(f"composition entry {part!r} must look like class_id=percent.")
        if not catalogue.is_known(name):
            raise SimulationError(f"unknown class {name!r} in the composition; known: {', '.join(catalogue.CLASS_IDS)}.")
        try:
            w = float(value)
        except ValueError:
            raise SimulationError(f"{value.strip()!r} for {name} is not a number.") from None
        if not w >= 0 or w == float("inf"):
            raise SimulationError(f"the share of {name} must be a non-negative number.")
        weights[name] = weights.get(name, 0.0) + w
    total = sum(weights.values())
    if total <= 0:
        raise SimulationError("the composition must give at least one class a positive share.")
    return {k: 100.0 * v / total for k, v in weights.items() if v > 0}


def allocate_counts(percent: Mapping[str, float], n: int) -> dict[str, int]:
    """Exact integer counts summing to n (largest remainder), deterministic for ties."""
    total = sum(percent.values())
    raw = {k: n * v / total for k, v in percent.items()}
    counts = {k: int(x) for k, x in raw.items()}
    short = n - sum(counts.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), catalogue.CLASS_IDS.index(k)))[:short]:
        counts[k] += 1
    return {k: v for k, v in counts.items() if v > 0}


def _norm(p: str | os.PathLike) -> str:
    return os.path.normcase(os.path.abspath(p))


def read_path_list(csv_path: str | os.PathLike, data_root: str | os.PathLike, only_split: str | None = None) -> set[str]:
    """Absolute paths named in a CSV's `path` column (relative ones are relative to data_root);
    with only_split, just the rows whose `split` column equals it."""
    p = Path(csv_path)
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise SimulationError(f"{p} has no 'path' column.")
            if only_split is not None and "split" not in reader.fieldnames:
                raise SimulationError(f"{p} has no 'split' column, so --only-split cannot be used with it.")
            rows = [r for r in reader if only_split is None or r.get("split") == only_split]
    except OSError as exc:
        raise SimulationError(f"cannot read {p} ({exc.strerror or exc}).") from None
    root = Path(data_root)
    return {_norm(r["path"]) if os.path.isabs(r["path"]) else _norm(root / r["path"]) for r in rows if r.get("path")}


def select_items(items: Iterable[LabelledImage], include: set[str] | None = None,
                 exclude: set[str] | None = None) -> list[LabelledImage]:
    out = []
    for it in items:
        key = _norm(it.path)
        if include is not None and key not in include:
            continue
        if exclude and key in exclude:
            continue
        out.append(it)
    return out


def build_patients(
    items: Sequence[LabelledImage],
    out: str | os.PathLike,
    compositions: Sequence[tuple[str, Mapping[str, float]]],
    n_patients: int,
    cells: int,
    seed: int = 0,
    copy: bool = False,
) -> list[TruthRow]:
    """Write out/<patient>/cell_NNNN.ext for each patient and return the truth rows.

    Patients cycle through `compositions` (name, percent). Within a patient no image is
    used twice; across patients images may repeat once a class's pool is exhausted.
    """
    import numpy as np

    if n_patients < 1 or cells < 1:
        raise SimulationError("ask for at least one patient and one cell per patient.")
    if not compositions:
        raise SimulationError("no composition given.")
    rng = np.random.default_rng(seed)
    pools: dict[str, list[LabelledImage]] = defaultdict(list)
    for it in sorted(items, key=lambda i: str(i.path)):
        pools[it.class_id].append(it)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise SimulationError(f"output folder {out_dir} is not empty; choose a new one.")
    # One shuffled queue per class, drawn from in order and reshuffled when exhausted.
    queues: dict[str, list[LabelledImage]] = {}
    truth: list[TruthRow] = []
    width = len(str(n_patients))
    for k in range(n_patients):
        name, percent = compositions[k % len(compositions)]
        counts = allocate_counts(percent, cells)
        patient = f"SIM{k + 1:0{width}d}_{name}"
        chosen: list[LabelledImage] = []
        for class_id, n in sorted(counts.items()):
            pool = pools.get(class_id, [])
            if len(pool) < n:
                raise SimulationError(
                    f"patient {patient} needs {n} {class_id} images but only {len(pool)} are available; "
                    "ask for fewer cells or give more data."
                )
            q = queues.get(class_id, [])
            if len(q) < n:  # start a fresh pass over the pool (no repeats within this patient)
                q = [pool[i] for i in rng.permutation(len(pool))]
            chosen.extend(q[:n])
            queues[class_id] = q[n:]
        order = rng.permutation(len(chosen))
        folder = out_dir / patient
        folder.mkdir()
        for j, i in enumerate(order):
            src = chosen[int(i)]
            dest = folder / f"cell_{j + 1:04d}{src.path.suffix.lower()}"
            _place(src.path, dest, copy)
            truth.append(TruthRow(patient, f"{patient}/{dest.name}", src.class_id, src.source, os.path.abspath(src.path)))
    return truth


def _place(src: Path, dest: Path, copy: bool) -> None:
    if not copy:
        try:
            os.symlink(os.path.abspath(src), dest)
            return
        except OSError:  # e.g. Windows without the symlink privilege
            log.warning("could not create a symlink; copying files instead")
    shutil.copyfile(src, dest)


def write_truth(out: str | os.PathLike, truth: Sequence[TruthRow], compositions: Mapping[str, Mapping[str, float]],
                meta: Mapping[str, object]) -> None:
    out_dir = Path(out)
    with open(out_dir / "truth.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "file", "class_id", "source", "original"])
        for r in truth:
            w.writerow([r.patient, r.file, r.class_id, r.source, r.original])
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for r in truth:
        per_patient[r.patient][r.class_id] += 1
    doc = {
        **meta,
        "patients": {
            p: {"preset": p.split("_", 1)[1], "counts": dict(sorted(c.items())), "cells": sum(c.values()),
                "requested_percent": dict(compositions[p.split("_", 1)[1]])}
            for p, c in per_patient.items()
        },
    }
    (out_dir / "composition.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def read_truth(path: str | os.PathLike) -> list[TruthRow]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [TruthRow(r["patient"], r["file"], r["class_id"], r["source"], r["original"]) for r in csv.DictReader(fh)]


def simulate(data: str | os.PathLike, out: str | os.PathLike, n_patients: int, cells: int,
             compositions: Sequence[tuple[str, Mapping[str, float]]], seed: int = 0, copy: bool = False,
             exclude_csv: str | os.PathLike | None = None, split_csv: str | os.PathLike | None = None,
             only_split: str | None = None) -> list[TruthRow]:
    """Read the labelled data, apply the held-out filters, build the patients, write the truth."""
    from batchwbc.inputs.public_datasets import DatasetError

    try:
        scan = read_any(data)
    except DatasetError as exc:
        raise SimulationError(str(exc)) from None
    include = read_path_list(split_csv, data, only_split) if split_csv else None
    exclude = read_path_list(exclude_csv, data) if exclude_csv else None
    items = select_items(scan.items, include, exclude)
    if not items:
        raise SimulationError("no labelled images are left after the split/exclusion filters.")
    truth = build_patients(items, out, compositions, n_patients, cells, seed, copy)
    meta = {"data": str(Path(data).resolve()), "seed": seed, "cells_per_patient": cells,
            "split_csv": str(split_csv) if split_csv else None, "only_split": only_split,
            "exclude_list": str(exclude_csv) if exclude_csv else None, "linked": not copy}
    write_truth(out, truth, dict(compositions), meta)
    return truth


_HELP_DESCRIPTION = """\
Build simulated patients with a known differential from labelled images: real labelled
crops drawn in chosen proportions into a slides folder, so that `batchwbc run` on it can be
checked against the truth. Counts are allocated exactly (largest remainder). Images are
symlinked (--copy copies them) under anonymous names (cell_0001.jpg) in shuffled order, so
neither a name nor the order gives the class away. OUT/truth.csv (patient, file, class_id,
source, original) and OUT/composition.json record the truth."""


def _help_epilog() -> str:
    """The presets' compositions, examples and exit codes: --help alone says what the tool does
    (issue 19: it listed the options and nothing else)."""
    import textwrap

    presets = "\n".join(textwrap.fill(", ".join(f"{cid}={pct:g}" for cid, pct in comp.items()), 88,
                                       initial_indent=f"  {name:<14} ", subsequent_indent=" " * 17)
                         for name, comp in sorted(PRESETS.items()))
    return (f"presets (class_id=percent of all cells, as --composition takes them):\n{presets}\n\n"
            "examples:\n"
            "  python -m batchwbc.simulate --data ../shared/data --out /tmp/sim --patients 4 --cells 200 \\\n"
            "      --preset normal --preset aml --seed 1\n"
            "  python -m batchwbc.simulate --data ../shared/data --out /tmp/sim --patients 1 --cells 300 \\\n"
            '      --composition "neutrophil_segmented=60,lymphocyte=30,monocyte=10"\n'
            "  batchwbc run /tmp/sim --out /tmp/sim.xlsx   (then compare with /tmp/sim/truth.csv)\n\n"
            "Exit codes: 0 written; 2 impossible request (unknown class, too few images, OUT not empty, ...)\n"
            "or a usage error.")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m batchwbc.simulate", description=_HELP_DESCRIPTION,
                                 epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True,
                    help="a labelled folder in a known layout (PBC, Munich AML, DeepAPL, or <class_id>/ subfolders), "
                         "or a folder of such folders, e.g. ../shared/data")
    ap.add_argument("--out", required=True,
                    help="new, empty slides folder to create: OUT/<patient>/cell_0001.jpg, ... for `batchwbc run`")
    ap.add_argument("--patients", type=int, default=len(PRESETS),
                    help=f"how many simulated patients (default {len(PRESETS)}: one per preset, so every preset, "
                         "NRBC included, is shown)")
    ap.add_argument("--cells", type=int, default=200, help="cells per patient (default 200)")
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS),
                    help="composition preset; repeat to cycle patients through several (default: all)")
    ap.add_argument("--composition", action="append", default=[],
                    help='custom composition "class_id=percent,..." (repeatable; used before presets)')
    ap.add_argument("--seed", type=int, default=0,
                    help="random seed: the same seed and data give the same patients and images (default 0)")
    ap.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    ap.add_argument("--exclude-list", help="CSV with a 'path' column of images not to use (e.g. training files)")
    ap.add_argument("--split-csv", help="split.csv written by training (path,class_id,source,split)")
    ap.add_argument("--only-split", help="with --split-csv: draw only from this split, e.g. test")
    args = ap.parse_args(argv)
    if args.only_split and not args.split_csv:
        ap.error("--only-split needs --split-csv")
    try:
        comps: list[tuple[str, Mapping[str, float]]] = [
            (f"custom{i + 1}", parse_composition(c)) for i, c in enumerate(args.composition)
        ]
        presets = args.preset or ([] if comps else sorted(PRESETS))
        comps += [(p, PRESETS[p]) for p in presets]
        truth = simulate(args.data, args.out, args.patients, args.cells, comps, args.seed, args.copy,
                         args.exclude_list, args.split_csv, args.only_split)
    except SimulationError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return 2
    n_patients = len({t.patient for t in truth})
    print(f"wrote {len(truth)} cells for {n_patients} simulated patients to {args.out} (truth.csv, composition.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
