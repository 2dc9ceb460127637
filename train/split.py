"""Seeded, stratified train/val/test split, saved so every evaluation can be reproduced."""
from __future__ import annotations

import csv
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_split(strata: Sequence[str], fractions=(0.8, 0.12, 0.08), seed: int = 0) -> list[str]:
    """Assign 'train'/'val'/'test' per item, stratified by its stratum key (class|source).

    Deterministic for the same strata sequence and seed; each stratum is shuffled with its
    own generator derived from the seed and the key, so adding a class never reshuffles others.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3:
        raise ValueError("split fractions must be three numbers summing to 1")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        groups[key].append(i)
    out = [""] * len(strata)
    for key in sorted(groups):
        idx = np.array(groups[key])
        rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = int(round(n * fractions[2]))
        n_val = int(round(n * fractions[1]))
        if n >= 3:  # every split gets at least one of every stratum that can afford it
            n_test, n_val = max(1, n_test), max(1, n_val)
        for j, i in enumerate(idx):
            out[i] = "test" if j < n_test else ("val" if j < n_test + n_val else "train")
    return out


def grouped_split(strata: Sequence[str], groups: Sequence[str | None], fractions=(0.8, 0.12, 0.08), seed: int = 0,
                  pinned_test: Sequence[bool] | None = None) -> list[str]:
    """Like `stratified_split`, but every item with a group (a patient) goes to the split of its group.

    Cells of one patient share a smear, a stain and often a disease, so a per-cell split would
    leak. Within each source (the part of the stratum after '|'), patients are shuffled with a
    generator derived from the seed and the source and dealt to test, then validation, until each
    holds its fraction of that source's cells; the rest train. Items without a group keep the
    per-cell stratified split. `pinned_test` forces items into test (e.g. the cells an earlier
    model was tested on, so two models are compared on the same cells); the remaining ungrouped
    items are then split into train and validation only, in the ratio of their fractions.
    """
    n = len(strata)
    if len(groups) != n or (pinned_test is not None and len(pinned_test) != n):
        raise ValueError("strata, groups and pinned_test must have the same length")
    pinned = list(pinned_test) if pinned_test is not None else [False] * n
    out = [""] * n
    free = [i for i in range(n) if groups[i] is None and not pinned[i]]
    for i in range(n):
        if pinned[i]:
            out[i] = "test"
    if free:
        if any(pinned):
            tv = fractions[0] + fractions[1]
            sub = stratified_split([strata[i] for i in free], (fractions[0] / tv, fractions[1] / tv, 0.0), seed)
            sub = ["val" if a == "test" else a for a in sub]  # strata of < 3 items may still draw a 'test'
        else:
            sub = stratified_split([strata[i] for i in free], fractions, seed)
        for i, a in zip(free, sub):
            out[i] = a
    by_source: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i in range(n):
        if groups[i] is not None and not pinned[i]:
            by_source[strata[i].split("|", 1)[-1]][groups[i]].append(i)
    for source in sorted(by_source):
        patients = sorted(by_source[source])
        rng = np.random.default_rng([seed, zlib.crc32(source.encode("utf-8"))])
        patients = [patients[j] for j in rng.permutation(len(patients))]
        total = sum(len(by_source[source][p]) for p in patients)
        targets = (("test", fractions[2] * total), ("val", fractions[1] * total))
        k, filled = 0, {"test": 0, "val": 0}
        for name, target in targets:
            while k < len(patients) and filled[name] < target:
                for i in by_source[source][patients[k]]:
                    out[i] = name
                filled[name] += len(by_source[source][patients[k]])
                k += 1
        for p in patients[k:]:
            for i in by_source[source][p]:
                out[i] = "train"
    return out


def write_split_csv(path: Path, rows: Sequence[tuple[str, str, str, str]]) -> None:
    """rows: (path relative to the data root, class_id, source, split)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_id", "source", "split"])
        w.writerows(rows)


def read_split_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
