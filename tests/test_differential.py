"""Differential arithmetic and the exact (Clopper-Pearson) confidence interval."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from batchwbc.core import catalogue
from batchwbc.core.differential import exact_binomial_ci, regularized_beta, summarize
from batchwbc.core.records import CellResult


def cell(class_id: str, patient: str = "P", review: bool = False, i: int = 0) -> CellResult:
    return CellResult(patient, f"{patient}/{class_id}_{i}.jpg", class_id, 0.5 if review else 0.99,
                      "lymphocyte", 0.01, review)


def cells_from(counts: dict[str, int], n_review: int = 0) -> list[CellResult]:
    out = [cell(cid, i=i) for cid, n in counts.items() for i in range(n)]
    for i in range(n_review):
        out[i] = cell(out[i].class_id, review=True, i=i)
    return out


# ------------------------------------------------------------ the interval

def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k), summed exactly in rationals: an independent check on the continued fraction."""
    pf = Fraction(p)
    return float(sum(math.comb(n, i) * pf**i * (1 - pf) ** (n - i) for i in range(k + 1)))


@pytest.mark.parametrize("k,n", [(1, 10), (3, 20), (10, 100), (50, 100), (0, 100), (100, 100), (7, 200), (1, 1)])
def test_ci_bounds_satisfy_the_clopper_pearson_definition(k, n):
    lo, hi = exact_binomial_ci(k, n)
    # Upper bound: P(X <= k | hi) = 2.5%; lower bound: P(X >= k | lo) = 2.5%.
    if k < n:
        assert binom_cdf(k, n, hi) == pytest.approx(0.025, abs=1e-9)
    else:
        assert hi == 1.0
    if k > 0:
        assert 1 - binom_cdf(k - 1, n, lo) == pytest.approx(0.025, abs=1e-9)
    else:
        assert lo == 0.0
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_ci_matches_published_rumke_style_values():
    # Textbook Clopper-Pearson values for a 100-cell differential (Rümke table convention).
    lo, hi = exact_binomial_ci(10, 100)
    assert (round(lo * 100, 2), round(hi * 100, 2)) == (4.90, 17.62)
    lo, hi = exact_binomial_ci(50, 100)
    assert (round(lo * 100, 2), round(hi * 100, 2)) == (39.83, 60.17)
    # Zero events: the "rule of three"-like exact bound 1 - 0.025**(1/n).
    assert exact_binomial_ci(0, 100)[1] == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-12)
    assert exact_binomial_ci(200, 200)[0] == pytest.approx(0.025 ** (1 / 200), rel=1e-12)


def test_ci_matches_scipy_beta_quantiles_when_available():
    stats = pytest.importorskip("scipy.stats")
    for n in (5, 100, 1000, 50_000):
        for k in sorted({1, 2, n // 3, n // 2, n - 1}):
            lo, hi = exact_binomial_ci(k, n)
            assert lo == pytest.approx(stats.beta.ppf(0.025, k, n - k + 1), abs=1e-10)
            assert hi == pytest.approx(stats.beta.ppf(0.975, k + 1, n - k), abs=1e-10)


def test_ci_other_level_is_narrower_and_symmetric_for_half():
    lo95, hi95 = exact_binomial_ci(50, 100)
    lo80, hi80 = exact_binomial_ci(50, 100, level=0.80)
    assert lo95 < lo80 < 0.5 < hi80 < hi95
    assert lo95 + hi95 == pytest.approx(1.0, abs=1e-12)


def test_regularized_beta_symmetry():
    for a, b, x in [(2, 3, 0.3), (10, 90, 0.08), (0.5, 0.5, 0.9)]:
        assert regularized_beta(a, b, x) + regularized_beta(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k,n", [(0, 0), (-1, 10), (11, 10)])
def test_ci_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError):
        exact_binomial_ci(k, n)


# ------------------------------------------------------------ the differential

def test_percentages_sum_to_100_over_wbc_only():
    rng = random.Random(7)
    for _ in range(20):
        counts = {cid: rng.randint(0, 40) for cid in catalogue.CLASS_IDS}
        counts["lymphocyte"] += 1  # at least one WBC
        d = summarize(cells_from(counts))
        wbc = sum(counts[c] for c in catalogue.WBC_CLASS_IDS)
        assert d.wbc == wbc
        assert d.n_cells == sum(counts.values())
        assert sum(d.percent.values()) == pytest.approx(100.0, abs=1e-9)
        assert set(d.percent) == set(catalogue.WBC_CLASS_IDS)  # NRBC and platelets are not in it
        for cid in catalogue.WBC_CLASS_IDS:
            lo, hi = d.ci[cid]
            assert lo <= d.percent[cid] <= hi
            assert (lo, hi) == pytest.approx(tuple(x * 100 for x in exact_binomial_ci(counts[cid], wbc)))


def test_immature_fractions_nrbc_and_platelets():
    counts = {
        "myeloblast": 5, "promyelocyte": 2, "myelocyte": 1, "metamyelocyte": 1, "neutrophil_band": 3,
        "lymphocyte": 30, "neutrophil_segmented": 58, "erythroblast": 4, "platelet": 2,
    }
    d = summarize(cells_from(counts, n_review=6))
    assert (d.wbc, d.n_cells) == (100, 106)
    assert (d.blasts, d.ig, d.bands, d.immature) == (5, 4, 3, 12)
    assert d.blasts_pct == pytest.approx(5.0)
    assert d.ig_pct == pytest.approx(4.0)
    assert d.band_pct == pytest.approx(3.0)
    assert d.immature_pct == pytest.approx(12.0)
    assert (d.nrbc, d.nrbc_per_100_wbc, d.platelets) == (4, pytest.approx(4.0), 2)
    assert d.n_review == 6
    assert d.counts["erythroblast"] == 4 and d.counts["basophil"] == 0
    lo, hi = d.group_ci(d.blasts)
    assert lo < 5.0 < hi


def test_nrbc_per_100_wbc_is_not_a_percentage_of_all_cells():
    d = summarize(cells_from({"lymphocyte": 50, "erythroblast": 25}))
    assert d.nrbc_per_100_wbc == pytest.approx(50.0)  # 25 per 50 WBC, not 25/75
    assert d.percent["lymphocyte"] == pytest.approx(100.0)


def test_zero_cells_and_zero_wbc_give_none_not_errors():
    empty = summarize([])
    assert (empty.n_cells, empty.wbc, empty.n_review) == (0, 0, 0)
    assert all(v is None for v in empty.percent.values())
    assert all(v is None for v in empty.ci.values())
    assert empty.blasts_pct is None and empty.nrbc_per_100_wbc is None and empty.group_ci(0) is None
    only_platelets = summarize(cells_from({"platelet": 3, "erythroblast": 1}))
    assert only_platelets.wbc == 0 and only_platelets.platelets == 3 and only_platelets.immature_pct is None


def test_unknown_class_is_named():
    with pytest.raises(KeyError, match="plasma_cell"):
        summarize([cell("plasma_cell")])


def test_smudge_cells_are_a_percentage_of_all_cells_never_of_wbc():
    # 90 WBC + 2 NRBC + 3 platelets + 5 smudge = 100 cells: smudge is 5% of ALL cells,
    # and the WBC percentages still sum to 100 over the 90 leukocytes only.
    d = summarize(cells_from({"neutrophil_segmented": 60, "lymphocyte": 30, "erythroblast": 2,
                              "platelet": 3, "smudge": 5}))
    assert d.n_cells == 100 and d.wbc == 90
    assert d.smudge == 5 and d.smudge_pct_of_cells == pytest.approx(5.0)
    assert "smudge" not in d.percent
    assert sum(v for v in d.percent.values() if v is not None) == pytest.approx(100.0)
    assert d.percent["lymphocyte"] == pytest.approx(100 * 30 / 90)
    empty = summarize([])
    assert empty.smudge == 0 and empty.smudge_pct_of_cells is None
    # An unclassified crop (batchwbc.ood) is in no count, so not in the smudge denominator either.
    from batchwbc.engine.ood import UNCLASSIFIED

    with_unknown = summarize(cells_from({"lymphocyte": 9, "smudge": 1}) + [cell(UNCLASSIFIED, i=99)] * 10)
    assert with_unknown.n_cells == 20 and with_unknown.unclassified == 10
    assert with_unknown.smudge_pct_of_cells == pytest.approx(10.0)
