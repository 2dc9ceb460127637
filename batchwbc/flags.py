"""Turn a differential into flags a technologist acts on, each naming the numbers behind it.

A flag is a prompt for a person (smear review, escalation), not a diagnosis; so every message
carries the count, the denominator, the exact 95% CI and the threshold, letting the reader
judge how much a "23% blasts" from 40 cells really says.

Every flag is one row of FLAG_RULES: its code, severity, the setting holding its threshold
and that setting's default, the rule and its wording, and where the default comes from.
The table drives evaluation here, the Settings fields and the config schema (config.py) and
the rows that document the thresholds in force (Settings.describe, the Run sheet); adding a
flag is adding a row (and its line in docs/report.md and docs/config-example.toml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .differential import Differential

if TYPE_CHECKING:
    from .config import Settings
    from .datashift import ShiftDecision

CRITICAL = "critical"  # needs prompt attention (coloured red)
WARNING = "warning"  # needs review (coloured amber)

# Flag codes, stable for software reading the workbook.
BLASTS_HIGH = "BLASTS_HIGH"
BLASTS_PRESENT = "BLASTS_PRESENT"
IG_HIGH = "IG_HIGH"
BANDS_HIGH = "BANDS_HIGH"
NRBC_PRESENT = "NRBC_PRESENT"
LOW_WBC = "LOW_WBC"
MANY_LOW_CONFIDENCE = "MANY_LOW_CONFIDENCE"
DATA_SHIFT = "DATA_SHIFT"  # source: batchwbc, compared with the model's own validation data (datashift.py)

# What a threshold measures; decides its type, its valid values and how it is written.
PERCENT = "percent"  # a float from 0 to 100
COUNT = "count"  # a whole number >= FlagRule.minimum


@dataclass(frozen=True)
class Flag:
    code: str
    message: str  # names the numbers that raised it
    severity: str  # CRITICAL or WARNING


_EPS = 1e-9  # percentages are ratios of counts; keep "exactly at the threshold" exact despite float rounding


def _ge(value: float, threshold: float) -> bool:
    return value >= threshold - _EPS


def _gt(value: float, threshold: float) -> bool:
    return value > threshold + _EPS


def _n(x: float) -> str:
    """A threshold as written in the config: 20 -> '20', 2.5 -> '2.5'."""
    return f"{x:g}"


def _fraction_text(label: str, count: int, pct: float, diff: Differential) -> str:
    ci = diff.group_ci(count)
    ci_text = f", 95% CI {ci[0]:.1f}-{ci[1]:.1f}%" if ci else ""
    return f"{label} {pct:.1f}% ({count}/{diff.wbc} WBC{ci_text})"


def _plural(n: int, word: str) -> str:
    return f"{word}{'s' if n != 1 else ''}"


# ---------------------------------------------------------------- the rules: message or None

def _blasts_high(d: Differential, t: float) -> str | None:
    if d.blasts_pct is None or not _ge(d.blasts_pct, t):
        return None
    return f"{_fraction_text('Blasts', d.blasts, d.blasts_pct, d)} >= {_n(t)}%"


def _blasts_present(d: Differential, t: int) -> str | None:
    if d.blasts < t:
        return None
    pct = f" ({d.blasts_pct:.1f}% of {d.wbc} WBC)" if d.blasts_pct is not None else ""
    return f"Blasts present: {d.blasts} {_plural(d.blasts, 'cell')}{pct} >= {t}"


def _ig_high(d: Differential, t: float) -> str | None:
    if d.ig_pct is None or not _gt(d.ig_pct, t):
        return None
    return f"{_fraction_text('Immature granulocytes', d.ig, d.ig_pct, d)} > {_n(t)}%"


def _bands_high(d: Differential, t: float) -> str | None:
    if d.band_pct is None or not _gt(d.band_pct, t):
        return None
    return f"{_fraction_text('Band neutrophils', d.bands, d.band_pct, d)} > {_n(t)}%"


def _nrbc_present(d: Differential, t: int) -> str | None:
    if d.nrbc < t:
        return None
    per100 = f" = {d.nrbc_per_100_wbc:.1f}/100 WBC" if d.nrbc_per_100_wbc is not None else ""
    return f"NRBC present: {d.nrbc} {_plural(d.nrbc, 'erythroblast')} ({d.nrbc}/{d.wbc} WBC{per100}) >= {t}"


def _low_wbc(d: Differential, t: int) -> str | None:
    if d.wbc >= t:
        return None
    return f"Only {d.wbc} WBC classified (< {t}): differential imprecise"


def _many_low_confidence(d: Differential, t: float) -> str | None:
    if d.n_cells == 0:
        return None
    review_pct = 100.0 * d.n_review / d.n_cells
    if not _gt(review_pct, t):
        return None
    return f"Low-confidence cells {review_pct:.1f}% ({d.n_review}/{d.n_cells} cells) > {_n(t)}%"


@dataclass(frozen=True)
class FlagRule:
    """One flag: everything about it in one row."""

    code: str
    severity: str  # CRITICAL or WARNING
    setting: str  # the Settings field, and the key in the config's [flags] table
    default: float | int
    unit: str  # PERCENT or COUNT
    meaning: str  # the rule in words, as the Run sheet states it: "blasts >= (% of WBC)"
    rule: Callable[[Differential, Any], str | None]  # the message when raised, else None
    source: str  # where the default comes from (docs/report.md has the references)
    minimum: int = 0  # smallest valid value of a COUNT threshold
    suppressed_by: tuple[str, ...] = ()  # codes that already say what this flag would say

    @property
    def expected(self) -> str:
        """What a valid threshold is, for the config error message."""
        return "a number from 0 to 100" if self.unit == PERCENT else f"a whole number >= {self.minimum}"

    def parse(self, value: Any) -> float | int | None:
        """The threshold from a config value, or None when the value is not valid for it."""
        if isinstance(value, bool):
            return None
        if self.unit == COUNT:
            return value if isinstance(value, int) and value >= self.minimum else None
        if isinstance(value, (int, float)) and 0.0 <= value <= 100.0:  # NaN fails both comparisons
            return float(value)
        return None

    def shown(self, value: float | int) -> str:
        """A threshold as the Run sheet writes it."""
        return _n(value) if self.unit == PERCENT else str(value)

    def describe(self, value: float | int) -> tuple[str, str]:
        """The Run-sheet row stating this flag's rule, config key and threshold in force."""
        return f"Flag {self.code}: {self.meaning} [flags.{self.setting}]", self.shown(value)


#: In the order the Run sheet and the config list them; evaluation goes most severe first.
FLAG_RULES: tuple[FlagRule, ...] = (
    FlagRule(BLASTS_PRESENT, WARNING, "blasts_present_min_count", 1, COUNT, "blasts >= (cells)",
             _blasts_present, "ICGHR consensus rules: blasts in blood trigger a smear review", minimum=1,
             suppressed_by=(BLASTS_HIGH,)),
    FlagRule(BLASTS_HIGH, CRITICAL, "blasts_high_pct", 20.0, PERCENT, "blasts >= (% of WBC)",
             _blasts_high, "WHO 2022 / ICC 2022 AML threshold"),
    FlagRule(IG_HIGH, WARNING, "ig_high_pct", 2.0, PERCENT, "immature granulocytes > (% of WBC)",
             _ig_high, "ICGHR review criterion; 2% is a common laboratory value"),
    FlagRule(BANDS_HIGH, WARNING, "bands_high_pct", 10.0, PERCENT, "band neutrophils > (% of WBC)",
             _bands_high, "ACCP/SCCM SIRS criteria: >10% band forms"),
    FlagRule(NRBC_PRESENT, WARNING, "nrbc_present_min_count", 1, COUNT, "erythroblasts >= (cells)",
             _nrbc_present, "ICGHR consensus rules: NRBC trigger a smear review", minimum=1),
    FlagRule(LOW_WBC, WARNING, "min_wbc", 100, COUNT, "WBC classified <",
             _low_wbc, "the routine 100-cell differential (Rümke; CLSI H20 counts 400)", minimum=0),
    FlagRule(MANY_LOW_CONFIDENCE, WARNING, "low_confidence_high_pct", 10.0, PERCENT,
             "review cells > (% of cells)", _many_low_confidence, "batchwbc default (no published standard)"),
)

_SEVERITY_RANK = {CRITICAL: 0, WARNING: 1}


def evaluate(diff: Differential, settings: "Settings", rules: Sequence[FlagRule] | None = None,
             shift: "ShiftDecision | None" = None) -> list[Flag]:
    """All flags raised by one differential, most severe first (table order within a
    severity), then DATA_SHIFT when the patient's data-shift decision raised it; pure.
    `rules` defaults to the rules `settings` was built from. DATA_SHIFT is not a table row:
    its threshold comes from the model file (batchwbc.datashift), not from the lab's config."""
    table = settings.flag_rules if rules is None else rules
    flags: list[Flag] = []
    for rule in sorted(table, key=lambda r: _SEVERITY_RANK[r.severity]):
        if any(f.code in rule.suppressed_by for f in flags):
            continue
        message = rule.rule(diff, getattr(settings, rule.setting))
        if message is not None:
            flags.append(Flag(rule.code, message, rule.severity))
    if shift is not None and shift.raised:
        flags.append(Flag(DATA_SHIFT, f"Data shift: {shift.text()}", WARNING))
    return flags


def worst_severity(flags: Sequence[Flag]) -> str | None:
    """The severity that decides a row's colour: CRITICAL beats WARNING; None when unflagged."""
    if any(f.severity == CRITICAL for f in flags):
        return CRITICAL
    return WARNING if flags else None
