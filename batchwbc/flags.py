"""Turn a differential into flags a technologist acts on, each naming the numbers behind it.

A flag is a prompt for a person (smear review, escalation), not a diagnosis; so every message
carries the count, the denominator, the exact 95% CI and the threshold, letting the reader
judge how much a "23% blasts" from 40 cells really says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import Settings
from .differential import Differential

if TYPE_CHECKING:
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


def evaluate(diff: Differential, settings: Settings, shift: "ShiftDecision | None" = None) -> list[Flag]:
    """All flags raised by one differential (and the patient's data-shift decision, when
    given), most severe first; pure."""
    flags: list[Flag] = []
    if diff.blasts_pct is not None and _ge(diff.blasts_pct, settings.blasts_high_pct):
        text = _fraction_text("Blasts", diff.blasts, diff.blasts_pct, diff)
        flags.append(Flag(BLASTS_HIGH, f"{text} >= {_n(settings.blasts_high_pct)}%", CRITICAL))
    if diff.blasts >= settings.blasts_present_min_count and not flags:  # BLASTS_HIGH already says it
        pct = f" ({diff.blasts_pct:.1f}% of {diff.wbc} WBC)" if diff.blasts_pct is not None else ""
        flags.append(
            Flag(
                BLASTS_PRESENT,
                f"Blasts present: {diff.blasts} cell{'s' if diff.blasts != 1 else ''}{pct}"
                f" >= {settings.blasts_present_min_count}",
                WARNING,
            )
        )
    if diff.ig_pct is not None and _gt(diff.ig_pct, settings.ig_high_pct):
        text = _fraction_text("Immature granulocytes", diff.ig, diff.ig_pct, diff)
        flags.append(Flag(IG_HIGH, f"{text} > {_n(settings.ig_high_pct)}%", WARNING))
    if diff.band_pct is not None and _gt(diff.band_pct, settings.bands_high_pct):
        text = _fraction_text("Band neutrophils", diff.bands, diff.band_pct, diff)
        flags.append(Flag(BANDS_HIGH, f"{text} > {_n(settings.bands_high_pct)}%", WARNING))
    if diff.nrbc >= settings.nrbc_present_min_count:
        per100 = f" = {diff.nrbc_per_100_wbc:.1f}/100 WBC" if diff.nrbc_per_100_wbc is not None else ""
        flags.append(
            Flag(
                NRBC_PRESENT,
                f"NRBC present: {diff.nrbc} erythroblast{'s' if diff.nrbc != 1 else ''}"
                f" ({diff.nrbc}/{diff.wbc} WBC{per100}) >= {settings.nrbc_present_min_count}",
                WARNING,
            )
        )
    if diff.wbc < settings.min_wbc:
        flags.append(
            Flag(
                LOW_WBC,
                f"Only {diff.wbc} WBC classified (< {settings.min_wbc}): differential imprecise",
                WARNING,
            )
        )
    if diff.n_cells > 0:
        review_pct = 100.0 * diff.n_review / diff.n_cells
        if _gt(review_pct, settings.low_confidence_high_pct):
            flags.append(
                Flag(
                    MANY_LOW_CONFIDENCE,
                    f"Low-confidence cells {review_pct:.1f}% ({diff.n_review}/{diff.n_cells} cells)"
                    f" > {_n(settings.low_confidence_high_pct)}%",
                    WARNING,
                )
            )
    if shift is not None and shift.raised:
        flags.append(Flag(DATA_SHIFT, f"Data shift: {shift.text()}", WARNING))
    return flags


def worst_severity(flags: list[Flag]) -> str | None:
    """The severity that decides a row's colour: CRITICAL beats WARNING; None when unflagged."""
    if any(f.severity == CRITICAL for f in flags):
        return CRITICAL
    return WARNING if flags else None
