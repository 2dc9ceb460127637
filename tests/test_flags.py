"""Flags at, just below and just above each threshold, and what their messages say."""
from __future__ import annotations

from dataclasses import replace

import pytest

from batchwbc import flags as fl
from batchwbc.config import DEFAULT_SETTINGS
from batchwbc.differential import exact_binomial_ci, summarize
from batchwbc.results import CellResult


def diff(counts: dict[str, int], n_review: int = 0):
    cells = []
    for cid, n in counts.items():
        for i in range(n):
            review = len(cells) < n_review
            cells.append(CellResult("P", f"P/{cid}{i}.png", cid, 0.4 if review else 0.99, "monocyte", 0.01, review))
    return summarize(cells)


def wbc_with(n_total: int = 100, **special: int) -> dict[str, int]:
    counts = dict(special)
    wbc_special = sum(v for k, v in special.items() if k not in ("erythroblast", "platelet"))
    counts["lymphocyte"] = counts.get("lymphocyte", 0) + n_total - wbc_special
    return counts


def codes(d, settings=DEFAULT_SETTINGS) -> set[str]:
    return {f.code for f in fl.evaluate(d, settings)}


def flag(d, code, settings=DEFAULT_SETTINGS):
    return next(f for f in fl.evaluate(d, settings) if f.code == code)


def test_normal_differential_raises_nothing():
    assert fl.evaluate(diff(wbc_with(neutrophil_segmented=60, monocyte=5)), DEFAULT_SETTINGS) == []


@pytest.mark.parametrize("blasts,expected", [(19, False), (20, True), (21, True)])
def test_blasts_high_at_20_percent(blasts, expected):
    d = diff(wbc_with(myeloblast=blasts))
    assert (fl.BLASTS_HIGH in codes(d)) is expected
    assert (fl.BLASTS_PRESENT in codes(d)) is not expected  # the critical flag replaces the warning


def test_blasts_high_message_and_severity():
    f = flag(diff(wbc_with(myeloblast=23)), fl.BLASTS_HIGH)
    assert f.severity == fl.CRITICAL
    assert "23.0%" in f.message and "23/100 WBC" in f.message and ">= 20%" in f.message
    lo, hi = exact_binomial_ci(23, 100)
    assert f"95% CI {lo * 100:.1f}-{hi * 100:.1f}%" in f.message


def test_blasts_threshold_is_configurable_eg_icc_10_percent():
    icc = replace(DEFAULT_SETTINGS, blasts_high_pct=10.0)
    assert fl.BLASTS_HIGH not in codes(diff(wbc_with(myeloblast=9)), icc)
    f = flag(diff(wbc_with(myeloblast=10)), fl.BLASTS_HIGH, icc)
    assert ">= 10%" in f.message


@pytest.mark.parametrize("blasts,min_count,expected", [(0, 1, False), (1, 1, True), (1, 2, False), (2, 2, True)])
def test_blasts_present(blasts, min_count, expected):
    s = replace(DEFAULT_SETTINGS, blasts_present_min_count=min_count)
    d = diff(wbc_with(myeloblast=blasts))
    assert (fl.BLASTS_PRESENT in codes(d, s)) is expected
    if expected:
        assert f"{blasts} cell" in flag(d, fl.BLASTS_PRESENT, s).message


@pytest.mark.parametrize(
    "ig,n_wbc,expected",
    [(2, 100, False), (3, 100, True), (2, 99, True), (2, 101, False)],  # 2.0% is not "above 2%"
)
def test_ig_above_threshold(ig, n_wbc, expected):
    d = diff(wbc_with(n_wbc, promyelocyte=ig))
    assert (fl.IG_HIGH in codes(d)) is expected


def test_ig_sums_all_three_stages_and_names_numbers():
    d = diff(wbc_with(promyelocyte=1, myelocyte=1, metamyelocyte=1))
    f = flag(d, fl.IG_HIGH)
    assert "3.0%" in f.message and "3/100 WBC" in f.message and "> 2%" in f.message
    assert f.severity == fl.WARNING


@pytest.mark.parametrize("bands,expected", [(9, False), (10, False), (11, True)])
def test_bands_above_threshold(bands, expected):
    d = diff(wbc_with(neutrophil_band=bands))
    assert (fl.BANDS_HIGH in codes(d)) is expected
    if expected:
        assert f"{bands}/100 WBC" in flag(d, fl.BANDS_HIGH).message


@pytest.mark.parametrize("nrbc,expected", [(0, False), (1, True), (5, True)])
def test_nrbc_present(nrbc, expected):
    d = diff(wbc_with(erythroblast=nrbc))
    assert (fl.NRBC_PRESENT in codes(d)) is expected
    if expected:
        msg = flag(d, fl.NRBC_PRESENT).message
        assert f"{nrbc}/100 WBC" in msg and f"{nrbc:.1f}/100 WBC" in msg


@pytest.mark.parametrize("n_wbc,expected", [(99, True), (100, False), (101, False)])
def test_low_wbc_below_100(n_wbc, expected):
    d = diff(wbc_with(n_wbc))
    assert (fl.LOW_WBC in codes(d)) is expected
    if expected:
        assert f"{n_wbc} WBC" in flag(d, fl.LOW_WBC).message and "< 100" in flag(d, fl.LOW_WBC).message


def test_platelets_and_nrbc_do_not_count_towards_the_100_wbc():
    d = diff(wbc_with(99, platelet=5, erythroblast=0))
    assert d.n_cells == 104 and fl.LOW_WBC in codes(d)


@pytest.mark.parametrize("n_review,expected", [(10, False), (11, True)])
def test_many_low_confidence_cells(n_review, expected):
    d = diff(wbc_with(), n_review=n_review)
    assert (fl.MANY_LOW_CONFIDENCE in codes(d)) is expected
    if expected:
        assert f"{n_review}/100 cells" in flag(d, fl.MANY_LOW_CONFIDENCE).message


def test_empty_patient_only_gets_the_imprecision_flag():
    assert codes(summarize([])) == {fl.LOW_WBC}
    assert "Only 0 WBC" in flag(summarize([]), fl.LOW_WBC).message


def test_zero_wbc_but_nrbc_does_not_divide_by_zero():
    d = diff({"erythroblast": 3})
    assert codes(d) == {fl.NRBC_PRESENT, fl.LOW_WBC}
    assert "3/0 WBC" in flag(d, fl.NRBC_PRESENT).message


def test_worst_severity():
    crit = diff(wbc_with(myeloblast=30))
    assert fl.worst_severity(fl.evaluate(crit, DEFAULT_SETTINGS)) == fl.CRITICAL
    warn = diff(wbc_with(erythroblast=1))
    assert fl.worst_severity(fl.evaluate(warn, DEFAULT_SETTINGS)) == fl.WARNING
    assert fl.worst_severity([]) is None


def test_critical_flag_listed_first():
    got = fl.evaluate(diff(wbc_with(myeloblast=25, promyelocyte=5)), DEFAULT_SETTINGS)
    assert got[0].code == fl.BLASTS_HIGH
