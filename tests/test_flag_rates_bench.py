"""The scoring of benchmarks/flag_rates.py, on constructed patients (no model, no data): the
before/after table in docs/report.md is only as good as this counting."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from batchwbc.core import flags as fl
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.records import CellResult

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "flag_rates.py"
_spec = importlib.util.spec_from_file_location("flag_rates", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def cells(*groups):
    out = []
    for cid, n, review in groups:
        out += [CellResult("P", f"P/{cid}{review}{i}.png", cid, 0.5 if review else 0.99, "lymphocyte", 0.3, review)
                for i in range(n)]
    return out


def test_truth_flags_come_from_the_true_composition():
    truth = ["lymphocyte"] * 100 + ["erythroblast"] * 2
    assert bench.truth_codes(truth, DEFAULT_SETTINGS) == {fl.NRBC_PRESENT}
    assert bench.truth_codes(["lymphocyte"] * 100, DEFAULT_SETTINGS) == set()


def test_one_review_erythroblast_is_a_false_flag_before_and_pending_after():
    normal = ("normal", set(), cells(("lymphocyte", 100, False), ("erythroblast", 1, True)))
    nrbc = ("nrbc", {fl.NRBC_PRESENT}, cells(("lymphocyte", 100, False), ("erythroblast", 3, False)))
    patients = {"n": normal, "a": nrbc}
    before = bench.score(patients, bench.legacy_flags, DEFAULT_SETTINGS)
    after = bench.score(patients, bench.current_flags, DEFAULT_SETTINGS)
    assert before["normal_with_false"] == 1 and before["false_by_code"][fl.NRBC_PRESENT] == 1
    assert after["normal_with_false"] == 0 and after["pending_by_code"][fl.NRBC_PRESENT] == 1
    assert after["normal_with_pending"] == 1
    for r in (before, after):
        assert r["expected"][fl.NRBC_PRESENT] == 1 and r["caught"][fl.NRBC_PRESENT] == 1


def test_a_flag_only_pending_is_missed_as_definite_but_not_altogether():
    p = {"x": ("left_shift", {fl.BANDS_HIGH},
               cells(("lymphocyte", 85, False), ("neutrophil_band", 10, False), ("neutrophil_band", 5, True)))}
    after = bench.score(p, bench.current_flags, DEFAULT_SETTINGS)
    assert after["caught"][fl.BANDS_HIGH] == 0 and after["caught_or_pending"][fl.BANDS_HIGH] == 1
    alt = bench.score(p, bench.pct_on_all_cells, DEFAULT_SETTINGS)
    assert alt["caught"][fl.BANDS_HIGH] == 1


def test_legacy_many_low_confidence_was_above_10_percent():
    d = cells(("lymphocyte", 89, False), ("lymphocyte", 11, True))
    from batchwbc.core.differential import summarize

    assert fl.MANY_LOW_CONFIDENCE in bench.legacy_flags(summarize(d), DEFAULT_SETTINGS)
    assert fl.MANY_LOW_CONFIDENCE not in bench.current_flags(summarize(d), DEFAULT_SETTINGS)
