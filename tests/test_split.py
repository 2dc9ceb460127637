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
