"""Per-patient differential: counts, percentages of WBC with exact 95% CIs, immature fractions.

A differential is a proportion estimated from a small sample (classically 100 cells), so each
percentage is reported with its exact binomial (Clopper-Pearson) confidence interval - the
same convention as Rümke's tables - and never with a normal approximation, which is wrong
exactly where it matters (0 blasts, or a few).
Erythroblasts and platelets are not leukocytes: they are left out of the WBC denominator and
reported as NRBC per 100 WBC and as a separate platelet count. Smudge cells (ruptured
leukocytes, ADR 0009) are reported apart as a count and a percentage of all counted cells
(every cell given a class; unclassified crops are in no count), as analyzers and manual
practice do.

Each class is also counted among the *confident* cells only (those not sent to review), so a
flag can tell what the model is sure of from what one unverified cell would raise
(core/flags.py; the measurement is in docs/report.md, "Confident and pending flags").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping, Sequence

from batchwbc.core import catalogue
from batchwbc.core.records import CellResult

NRBC_CLASS = "erythroblast"
PLATELET_CLASS = "platelet"
SMUDGE_IDS = catalogue.ids_in_group(catalogue.SMUDGE)
BLAST_IDS = catalogue.ids_in_group(catalogue.BLAST)
IG_IDS = catalogue.ids_in_group(catalogue.IMMATURE_GRANULOCYTE)
BAND_IDS = catalogue.ids_in_group(catalogue.BAND)


# ------------------------------------------------------------ exact binomial CI

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of Beta(a, b) at x; binomial tail sums are values of it."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _beta_quantile(q: float, a: float, b: float) -> float:
    """Invert I_x(a, b) = q by bisection; I is monotone in x, so this cannot miss."""
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if regularized_beta(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2.0


def exact_binomial_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval for k successes in n trials, as FRACTIONS (0..1), not percent.

    The bounds are the Beta quantiles  B(alpha/2; k, n-k+1)  and  B(1-alpha/2; k+1, n-k),
    i.e. the p at which the binomial tail P(X >= k) or P(X <= k) equals alpha/2.
    """
    if n <= 0:
        raise ValueError("a confidence interval needs at least one trial (n >= 1)")
    if not 0 <= k <= n:
        raise ValueError(f"successes k={k} must lie between 0 and n={n}")
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie strictly between 0 and 1")
    return _clopper_pearson(k, n, level)


@lru_cache(maxsize=8192)
def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    # Cached: a night's report asks for the same (k, n) many times (e.g. 0 of 100 for rare classes).
    half_alpha = (1.0 - level) / 2.0
    if k == 0:  # closed forms, exact to the last bit
        lower = 0.0
    elif k == n:
        lower = half_alpha ** (1.0 / n)
    else:
        lower = _beta_quantile(half_alpha, k, n - k + 1)
    if k == n:
        upper = 1.0
    elif k == 0:
        upper = 1.0 - half_alpha ** (1.0 / n)
    else:
        upper = _beta_quantile(1.0 - half_alpha, k + 1, n - k)
    return lower, upper


# ------------------------------------------------------------ the differential

@dataclass(frozen=True)
class Differential:
    """One patient's differential; percentages are in percent (0..100), None when WBC is 0."""

    n_cells: int  # every crop read: classified cells (leukocyte or not) and unclassified crops
    wbc: int  # leukocytes only: the denominator of every percentage
    counts: Mapping[str, int]  # every catalogue class id -> cells (0 included)
    percent: Mapping[str, float | None]  # WBC class id -> % of WBC
    ci: Mapping[str, tuple[float, float] | None]  # WBC class id -> exact 95% CI, in percent
    blasts: int
    blasts_pct: float | None
    ig: int  # promyelocytes + myelocytes + metamyelocytes
    ig_pct: float | None
    bands: int
    band_pct: float | None
    immature: int  # blasts + IG + bands
    immature_pct: float | None
    nrbc: int
    nrbc_per_100_wbc: float | None
    platelets: int
    n_review: int  # cells below the review threshold, of n_cells
    #: every catalogue class id -> cells of it NOT in review (confident); counts - this = review cells
    confident_counts: Mapping[str, int]
    unclassified: int = 0  # crops not recognised as a known cell (batchwbc.ood): in n_cells, never in a count
    smudge: int = 0  # ruptured leukocytes: reported apart, never in the WBC denominator
    smudge_pct_of_cells: float | None = None  # smudge / all counted cells (n_cells - unclassified) x 100, ADR 0009

    def confident(self, class_ids: Sequence[str] | str) -> int:
        """Confident (not in review) cells of one class id or of several, e.g. BLAST_IDS."""
        ids = (class_ids,) if isinstance(class_ids, str) else class_ids
        return sum(self.confident_counts.get(c, 0) for c in ids)

    @property
    def blasts_confident(self) -> int:
        return self.confident(BLAST_IDS)

    @property
    def ig_confident(self) -> int:
        return self.confident(IG_IDS)

    @property
    def bands_confident(self) -> int:
        return self.confident(BAND_IDS)

    @property
    def nrbc_confident(self) -> int:
        return self.confident(NRBC_CLASS)

    @property
    def classified(self) -> int:
        """Cells given a class (leukocyte or not); unclassified crops are read but not classified."""
        return self.n_cells - self.unclassified

    @property
    def blasts_confident_pct(self) -> float | None:
        """Confident blasts as % of all WBC: the figure the blast flags compare (core/flags.py)."""
        return self.pct_of_wbc(self.blasts_confident)

    @property
    def ig_confident_pct(self) -> float | None:
        return self.pct_of_wbc(self.ig_confident)

    @property
    def band_confident_pct(self) -> float | None:
        return self.pct_of_wbc(self.bands_confident)

    def pct_of_wbc(self, count: int) -> float | None:
        """count as % of all WBC (review cells included in the denominator); None when WBC is 0."""
        return None if self.wbc == 0 else 100.0 * count / self.wbc

    def group_ci(self, count: int) -> tuple[float, float] | None:
        """Exact 95% CI (percent) of count / WBC, for the immature fractions in flag messages."""
        return None if self.wbc == 0 else _pct_pair(exact_binomial_ci(count, self.wbc))


def _pct_pair(pair: tuple[float, float]) -> tuple[float, float]:
    return pair[0] * 100.0, pair[1] * 100.0


def summarize(cells: Sequence[CellResult]) -> Differential:
    """Count one patient's cells; pure, and safe for zero cells (percentages are then None)."""
    from batchwbc.engine.ood import UNCLASSIFIED

    counts = {cid: 0 for cid in catalogue.CLASS_IDS}
    confident = {cid: 0 for cid in catalogue.CLASS_IDS}
    n_review = unclassified = 0
    for cell in cells:
        n_review += bool(cell.review)
        if cell.class_id == UNCLASSIFIED:  # not a cell the model knows: in no count, no percentage
            unclassified += 1
            continue
        if cell.class_id not in counts:
            catalogue.get(cell.class_id)  # raises KeyError naming the unknown class
        counts[cell.class_id] += 1
        confident[cell.class_id] += not cell.review
    wbc = sum(counts[c] for c in catalogue.WBC_CLASS_IDS)

    def pct(k: int) -> float | None:
        return None if wbc == 0 else 100.0 * k / wbc

    percent = {c: pct(counts[c]) for c in catalogue.WBC_CLASS_IDS}
    ci = {
        c: None if wbc == 0 else _pct_pair(exact_binomial_ci(counts[c], wbc)) for c in catalogue.WBC_CLASS_IDS
    }
    blasts = sum(counts[c] for c in BLAST_IDS)
    ig = sum(counts[c] for c in IG_IDS)
    bands = sum(counts[c] for c in BAND_IDS)
    immature = blasts + ig + bands
    nrbc = counts[NRBC_CLASS]
    smudge = sum(counts[c] for c in SMUDGE_IDS)
    counted = len(cells) - unclassified  # every cell given a class; an unclassified crop is in no count
    return Differential(
        n_cells=len(cells),
        wbc=wbc,
        counts=MappingProxyType(counts),
        percent=MappingProxyType(percent),
        ci=MappingProxyType(ci),
        blasts=blasts,
        blasts_pct=pct(blasts),
        ig=ig,
        ig_pct=pct(ig),
        bands=bands,
        band_pct=pct(bands),
        immature=immature,
        immature_pct=pct(immature),
        nrbc=nrbc,
        nrbc_per_100_wbc=pct(nrbc),
        platelets=counts[PLATELET_CLASS],
        n_review=n_review,
        confident_counts=MappingProxyType(confident),
        unclassified=unclassified,
        smudge=smudge,
        smudge_pct_of_cells=None if counted == 0 else 100.0 * smudge / counted,
    )
