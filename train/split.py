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


def write_split_csv(path: Path, rows: Sequence[tuple[str, str, str, str]]) -> None:
    """rows: (path relative to the data root, class_id, source, split)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_id", "source", "split"])
        w.writerows(rows)


def read_split_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
