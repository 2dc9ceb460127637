"""Share the review-thumbnail cap fairly across patients.

The workbook embeds at most `[review] max_images` thumbnails so that a bad night cannot make
a file too large to open. Filling that cap in patient order left the last patients of a night
with no thumbnail at all, although their review is as urgent. Instead every patient gets an
equal share (water-filling: a patient needing less than the share keeps all its cells and the
rest is shared among the others), and within a patient the least confident cells come first,
because they are the likeliest to be wrong.

Pure (no I/O, no heavy imports): the pipeline uses `ThumbnailKeeper` while cells arrive, to
keep memory bounded, and the report applies `fair_quota` to what it is given.
"""
from __future__ import annotations

import heapq
from typing import Hashable, Sequence


def fair_level(demand: Sequence[int], cap: int) -> int:
    """The largest share L with sum(min(d, L)) <= cap: every patient may keep L thumbnails."""
    if cap <= 0:
        return 0
    if sum(demand) <= cap:
        return max(demand, default=0)
    lo, hi = 0, max(demand)  # sum(min(d, lo)) <= cap < sum(min(d, hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(min(d, mid) for d in demand) <= cap:
            lo = mid
        else:
            hi = mid
    return lo


def fair_quota(demand: Sequence[int], cap: int) -> list[int]:
    """How many thumbnails each patient (in report order) gets out of `cap`.

    Each patient gets min(demand, L) with L from `fair_level`; the slots left over (fewer than
    the patients still wanting more) go one each to the earliest such patients, so the result
    is deterministic and sums to min(cap, sum(demand)).
    """
    if cap < 0:
        raise ValueError("the thumbnail cap must be >= 0")
    level = fair_level(demand, cap)
    quota = [min(d, level) for d in demand]
    spare = max(0, cap - sum(quota))
    for i, d in enumerate(demand):
        if spare == 0:
            break
        if d > quota[i]:
            quota[i] += 1
            spare -= 1
    return quota


class ThumbnailKeeper:
    """Decide, while cells arrive in any order, which thumbnails may still be needed.

    `offer` returns the keys whose thumbnails can be dropped now. It keeps, per patient, the
    lowest-confidence min(arrived, L + 1) cells, where L is `fair_level` of the cells arrived so
    far: L can only fall as more cells arrive and a kept cell's rank can only rise, so nothing
    dropped is ever needed again, and memory stays near cap + one thumbnail per patient.
    `final_drops` then trims to the exact `fair_quota`, identical whatever the arrival order.
    """

    def __init__(self, cap: int, patient_order: Sequence[str] = ()):
        if cap < 0:
            raise ValueError("the thumbnail cap must be >= 0")
        self.cap = cap
        self._order: dict[str, int] = {p: i for i, p in enumerate(dict.fromkeys(patient_order))}
        self._arrived: dict[str, int] = {}
        self._kept: dict[str, list[tuple[float, tuple, Hashable]]] = {}  # max-heap by (confidence, tiebreak)

    def _patient_index(self, patient: str) -> int:
        return self._order.setdefault(patient, len(self._order))

    def offer(self, patient: str, confidence: float, tiebreak: tuple, key: Hashable) -> list[Hashable]:
        """Register one review cell with a thumbnail; return the keys to drop now.

        `tiebreak` orders cells of equal confidence (e.g. the crop's position in the run)."""
        self._patient_index(patient)
        self._arrived[patient] = self._arrived.get(patient, 0) + 1
        heapq.heappush(self._kept.setdefault(patient, []), (-confidence, tuple(-x for x in tiebreak), key))
        level = fair_level(list(self._arrived.values()), self.cap)
        drops: list[Hashable] = []
        for heap in self._kept.values():
            while len(heap) > level + 1:
                drops.append(heapq.heappop(heap)[2])
        return drops

    def final_drops(self) -> list[Hashable]:
        """The keys beyond each patient's exact share, once every cell has arrived."""
        patients = sorted(self._arrived, key=self._patient_index)
        quota = fair_quota([self._arrived[p] for p in patients], self.cap)
        drops: list[Hashable] = []
        for p, q in zip(patients, quota):
            heap = self._kept.get(p, [])
            while len(heap) > q:
                drops.append(heapq.heappop(heap)[2])
        return drops
