"""Seeded stratified split: reproducible, stratified, and stable when classes are added."""
from __future__ import annotations

from collections import Counter

from train.split import stratified_split


def strata():
    return [f"c{i % 5}|{'A' if i % 3 else 'B'}" for i in range(2000)]


def test_same_seed_same_split():
    assert stratified_split(strata(), seed=7) == stratified_split(strata(), seed=7)


def test_other_seed_other_split():
    assert stratified_split(strata(), seed=7) != stratified_split(strata(), seed=8)


def test_proportions_per_stratum():
    s = strata()
    out = stratified_split(s, (0.8, 0.12, 0.08), seed=1)
    for key in set(s):
        c = Counter(o for k, o in zip(s, out) if k == key)
        n = sum(c.values())
        assert abs(c["test"] - 0.08 * n) <= 1 and abs(c["val"] - 0.12 * n) <= 1


def test_adding_a_stratum_does_not_reshuffle_others():
    base = strata()
    out1 = stratified_split(base, seed=3)
    out2 = stratified_split(base + ["new|X"] * 50, seed=3)
    assert out2[: len(base)] == out1


def test_small_strata_reach_every_split():
    out = stratified_split(["rare|A"] * 4 + ["big|A"] * 100, seed=0)
    assert set(out[:4]) == {"train", "val", "test"}


def test_grouped_split_keeps_each_patient_in_one_split():
    from train.split import grouped_split

    strata, groups = [], []
    for p in range(40):
        for k in range(5 + p % 7):
            strata.append(("myeloblast" if k % 2 else "lymphocyte") + "|DeepAPL")
            groups.append(f"P{p:02d}")
    strata += ["basophil|PBC"] * 100
    groups += [None] * 100
    out = grouped_split(strata, groups, (0.8, 0.12, 0.08), seed=3)
    by_patient: dict[str, set] = {}
    for g, a in zip(groups, out):
        if g is not None:
            by_patient.setdefault(g, set()).add(a)
    assert all(len(s) == 1 for s in by_patient.values())
    assert {a for s in by_patient.values() for a in s} == {"train", "val", "test"}
    n = sum(g is not None for g in groups)
    share = {k: sum(1 for g, a in zip(groups, out) if g is not None and a == k) / n for k in ("test", "val")}
    assert 0.06 <= share["test"] <= 0.2 and 0.1 <= share["val"] <= 0.3
    assert out == grouped_split(strata, groups, (0.8, 0.12, 0.08), seed=3)


def test_grouped_split_pins_test_rows_and_splits_the_rest_train_val():
    from train.split import grouped_split

    strata = ["basophil|PBC"] * 50
    pinned = [i < 5 for i in range(50)]
    out = grouped_split(strata, [None] * 50, (0.8, 0.12, 0.08), seed=0, pinned_test=pinned)
    assert out[:5] == ["test"] * 5
    assert set(out[5:]) == {"train", "val"}
