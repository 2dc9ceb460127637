"""The review-thumbnail cap is shared fairly across patients, lowest confidence first."""
import itertools
import random

import pytest

from batchwbc.core.thumbnail_quota import ThumbnailKeeper, fair_level, fair_quota


def test_every_patient_gets_a_share_not_only_the_first_ones():
    # Filled in patient order, a cap of 10 would give 10, 0, 0; shared, each gets some.
    assert fair_quota([50, 50, 50], 10) == [4, 3, 3]
    assert fair_quota([2, 50, 50], 10) == [2, 4, 4]  # a small patient keeps all; the rest is shared
    assert fair_quota([1, 1], 10) == [1, 1]
    assert fair_quota([5, 5], 0) == [0, 0]
    assert fair_quota([], 5) == []


@pytest.mark.parametrize("seed", range(20))
def test_quota_is_max_min_fair_and_uses_the_whole_cap(seed):
    rnd = random.Random(seed)
    demand = [rnd.randrange(0, 40) for _ in range(rnd.randrange(1, 8))]
    cap = rnd.randrange(0, 120)
    q = fair_quota(demand, cap)
    assert sum(q) == min(cap, sum(demand))
    assert all(0 <= a <= d for a, d in zip(q, demand))
    short = [a for a, d in zip(q, demand) if a < d]  # patients that did not get all they wanted
    assert not short or max(short) - min(short) <= 1
    assert all(a <= max(short, default=a) for a in q) or not short
    assert fair_level(demand, cap) <= (max(demand) if demand else 0)


def _keep(cells, cap, patients):
    keeper = ThumbnailKeeper(cap, patients)
    kept = set()
    for key, (patient, conf) in cells:
        kept.add(key)
        kept -= set(keeper.offer(patient, conf, (key,), key))
        assert len(kept) <= cap + len(patients)  # memory stays bounded while cells arrive
    return kept - set(keeper.final_drops())


def test_streaming_keeper_matches_the_exact_share_whatever_the_arrival_order():
    rnd = random.Random(1)
    patients = ["P1", "P2", "P3"]
    cells = [(i, (rnd.choice(patients), round(rnd.random(), 3))) for i in range(60)]
    cap = 13
    demand = [sum(1 for _, (p, _) in cells if p == pt) for pt in patients]
    quota = dict(zip(patients, fair_quota(demand, cap)))
    expected = set()
    for pt in patients:
        mine = sorted((c for c in cells if c[1][0] == pt), key=lambda c: (c[1][1], c[0]))
        expected |= {k for k, _ in mine[:quota[pt]]}
    for _ in range(10):
        rnd.shuffle(cells)
        assert _keep(cells, cap, patients) == expected


def test_negative_cap_is_refused():
    with pytest.raises(ValueError):
        fair_quota([1], -1)
    with pytest.raises(ValueError):
        ThumbnailKeeper(-1)
