"""Turn a differential into flags a technologist acts on, each naming the numbers behind it.

A flag is a prompt for a person (smear review, escalation), not a diagnosis; so every message
carries the count, the denominator, the exact 95% CI and the threshold, letting the reader
judge how much a "23% blasts" from 40 cells really says.

Every flag is one row of FLAG_RULES: its code, severity, the setting holding its threshold
and that setting's default, the rule and its wording, and where the default comes from.
The table drives evaluation here, the Settings fields and the config schema (core/config.py) and
the rows that document the thresholds in force (Settings.describe, the Run sheet); adding a
flag is adding a row (and its line in docs/report.md and docs/config-example.toml).

Confident and pending: a flag counts only *confident* cells (not sent to review). When the
cells in review would raise it too, the rule's pending twin is raised instead - its own code
(`NRBC_PENDING_REVIEW`), the REVIEW severity and a "possible ..., pending review" wording - so
one unverified lymphocyte called erythroblast no longer reads as NRBC_PRESENT, yet is not
hidden either. Measured on simulated patients from held-out test cells
(benchmarks/flag_rates.py, docs/report.md): 23 of 24 erythroblast calls in review were
lymphocytes, all 68 confident ones were right.
Every rule is pure over a Differential and a threshold, so `batchwbc verify` can recompute
flags from verified classes with the same functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from batchwbc.core.differential import Differential, exact_binomial_ci

if TYPE_CHECKING:
    from batchwbc.core.config import Settings
    from batchwbc.engine.data_shift import ShiftDecision

CRITICAL = "critical"  # needs prompt attention (coloured red)
#: A critical rule's pending twin: a possible critical finding that only cells in review raise.
#: Confirming it is the most urgent work of the morning, so it is coloured as urgent (orange-red
#: and bold), not like the quiet pending warnings: "Blasts: possibly 33.7 %" was once light blue.
POSSIBLE_CRITICAL = "possible_critical"
#: The images or the model do not suit each other (DATA_SHIFT, many unclassified crops, nearly
#: every cell in review): every number of the patient is in doubt, whatever its other flags say.
UNRELIABLE = "unreliable"
WARNING = "warning"  # needs review (coloured amber)
REVIEW = "review"  # only cells in review raise it: confirm them first (coloured light blue)
NOTE = "note"  # a caveat on precision, not a finding (LOW_WBC; coloured grey)

# Flag codes, stable for software reading the workbook.
BLASTS_HIGH = "BLASTS_HIGH"
BLASTS_PRESENT = "BLASTS_PRESENT"
IG_HIGH = "IG_HIGH"
BANDS_HIGH = "BANDS_HIGH"
NRBC_PRESENT = "NRBC_PRESENT"
LOW_WBC = "LOW_WBC"
MANY_LOW_CONFIDENCE = "MANY_LOW_CONFIDENCE"
MANY_UNCLASSIFIED = "MANY_UNCLASSIFIED"
MOSTLY_REVIEW = "MOSTLY_REVIEW"
DATA_SHIFT = "DATA_SHIFT"  # source: batchwbc, compared with the model's own validation data (engine/data_shift.py)
# Pending twins: what the flag would be if the cells in review were what the model guessed.
BLASTS_HIGH_PENDING_REVIEW = "BLASTS_HIGH_PENDING_REVIEW"
BLASTS_PENDING_REVIEW = "BLASTS_PENDING_REVIEW"
IG_HIGH_PENDING_REVIEW = "IG_HIGH_PENDING_REVIEW"
BANDS_HIGH_PENDING_REVIEW = "BANDS_HIGH_PENDING_REVIEW"
NRBC_PENDING_REVIEW = "NRBC_PENDING_REVIEW"

# What a threshold measures; decides its type, its valid values and how it is written.
PERCENT = "percent"  # a float from 0 to 100
COUNT = "count"  # a whole number >= FlagRule.minimum


@dataclass(frozen=True)
class Flag:
    code: str
    message: str  # names the numbers that raised it
    severity: str  # CRITICAL, UNRELIABLE, WARNING, NOTE, or (pending twins only) POSSIBLE_CRITICAL, REVIEW


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


#: Where a technologist reads what to do about DATA_SHIFT and the other UNRELIABLE flags.
DOCS_ADAPTATION = "docs/adaptation.md"

# ---------------------------------------------------------------- the rules: message or None
# Each definite rule counts confident cells only; its pending twin fires when the confident
# cells do not reach the threshold but all cells (review included) do.

def _pending_text(n_review: int, word: str) -> str:
    return f"{n_review} {_plural(n_review, word)} in review"


def _pct_rule(label: str, total: int, sure: int, op: str, d: Differential, t: float, confident: bool) -> str | None:
    """The message of a '% of WBC' rule on confident cells (or, for its pending twin, on all
    cells when the confident ones alone stay below the threshold). `total` cells of the group,
    `sure` of them confident (the caller names the Differential fields, so a renamed field is
    an error where it is used, not a silent getattr miss)."""
    cmp = _ge if op == ">=" else _gt
    sure_pct, total_pct = d.pct_of_wbc(sure), d.pct_of_wbc(total)
    if sure_pct is None or total_pct is None:
        return None
    if confident:
        if not cmp(sure_pct, t):
            return None
        extra = f"; {_pending_text(total - sure, 'more cell')}" if total > sure else ""
        return f"{_fraction_text(label, sure, sure_pct, d)} {op} {_n(t)}% (confident cells{extra})"
    if cmp(sure_pct, t) or not cmp(total_pct, t):
        return None
    return (f"{label}: possibly {total_pct:.1f}% ({total}/{d.wbc} WBC) {op} {_n(t)}%, pending review: "
            f"{_pending_text(total - sure, 'cell')}; the {sure} confident {_plural(sure, 'cell')} "
            f"{'gives' if sure == 1 else 'give'} {sure_pct:.1f}%")


def _blasts_high(d: Differential, t: float) -> str | None:
    return _pct_rule("Blasts", d.blasts, d.blasts_confident, ">=", d, t, True)


def _blasts_high_pending(d: Differential, t: float) -> str | None:
    return _pct_rule("Blasts", d.blasts, d.blasts_confident, ">=", d, t, False)


def _ig_high(d: Differential, t: float) -> str | None:
    return _pct_rule("Immature granulocytes", d.ig, d.ig_confident, ">", d, t, True)


def _ig_high_pending(d: Differential, t: float) -> str | None:
    return _pct_rule("Immature granulocytes", d.ig, d.ig_confident, ">", d, t, False)


def _bands_high(d: Differential, t: float) -> str | None:
    return _pct_rule("Band neutrophils", d.bands, d.bands_confident, ">", d, t, True)


def _bands_high_pending(d: Differential, t: float) -> str | None:
    return _pct_rule("Band neutrophils", d.bands, d.bands_confident, ">", d, t, False)


def _count_rule(label: str, word: str, total: int, sure: int, t: int, confident: bool, d: Differential,
                per100: bool = False) -> str | None:
    """A 'cells >=' rule: definite on confident cells; pending when only review cells reach it."""
    if confident:
        if sure < t:
            return None
        if per100:
            rate = f" ({sure}/{d.wbc} WBC" + (f" = {d.pct_of_wbc(sure):.1f}/100 WBC)" if d.wbc else ")")
        else:
            rate = f" ({d.pct_of_wbc(sure):.1f}% of {d.wbc} WBC)" if d.wbc else ""
        extra = f"; {total - sure} more in review" if total > sure else ""
        return f"{label} present: {sure} confident {_plural(sure, word)}{rate} >= {t}{extra}"
    if sure >= t or total < t:
        return None
    pending = total - sure
    sure_text = f" ({sure} confident)" if sure else ""
    return (f"{label}: {pending} possible {_plural(pending, word)}, pending review{sure_text}; "
            f"confirm in the Review sheet (flag at >= {t})")


def _blasts_present(d: Differential, t: int) -> str | None:
    return _count_rule("Blasts", "blast", d.blasts, d.blasts_confident, t, True, d)


def _blasts_pending(d: Differential, t: int) -> str | None:
    return _count_rule("Blasts", "blast", d.blasts, d.blasts_confident, t, False, d)


def _nrbc_present(d: Differential, t: int) -> str | None:
    return _count_rule("NRBC", "erythroblast", d.nrbc, d.nrbc_confident, t, True, d, per100=True)


def _nrbc_pending(d: Differential, t: int) -> str | None:
    return _count_rule("NRBC", "erythroblast", d.nrbc, d.nrbc_confident, t, False, d, per100=True)


def _low_wbc(d: Differential, t: int) -> str | None:
    if d.wbc >= t:
        return None
    if d.wbc == 0:
        return "No WBC classified: there is no differential for this patient"
    return f"Only {d.wbc} WBC classified (< {t}): differential imprecise"


def _share_above(k: int, n: int, t: float) -> tuple[float, float, float] | None:
    """(share, CI low, CI high) in percent when the exact 95% CI of k/n lies wholly above t %,
    else None: a small patient is not flagged for a share its few cells cannot establish."""
    if n == 0:
        return None
    low, high = exact_binomial_ci(k, n)
    if not _gt(100.0 * low, t):
        return None
    return 100.0 * k / n, 100.0 * low, 100.0 * high


def _many_unclassified(d: Differential, t: float) -> str | None:
    """Crops not recognised as any cell the model knows, clearly above t % of the crops read.
    After `adapt` a third of a lab's crops stayed unclassified with no DATA_SHIFT raised; this
    says so on its own."""
    hit = _share_above(d.unclassified, d.n_cells, t)
    if hit is None:
        return None
    share, low, high = hit
    return (f"{d.unclassified} of {d.n_cells} crops ({share:.0f}%, 95% CI {low:.0f}-{high:.0f}%) were not "
            f"recognised as any cell the model knows, far more than the {_n(t)}% expected: the model does not "
            f"suit these images, so validate it on verified cells and adapt it (see {DOCS_ADAPTATION})")


def _mostly_review(d: Differential, t: float) -> str | None:
    """Cells in review clearly above t % of the crops: the machine pre-classified few cells
    with confidence, whatever share the model's own metadata expects (after `adapt` that share
    was 86 %, so MANY_LOW_CONFIDENCE stayed silent while 1,557 of 1,816 cells were in review)."""
    hit = _share_above(d.n_review, d.n_cells, t)
    if hit is None:
        return None
    share, low, high = hit
    return (f"{d.n_review} of {d.n_cells} cells ({share:.0f}%, 95% CI {low:.0f}-{high:.0f}%) are in review, more "
            f"than {_n(t)}%: the machine is confident about few of them, so count this patient manually, or "
            f"validate and adapt the model (see {DOCS_ADAPTATION})")


def _many_low_confidence(d: Differential, t: float) -> str | None:
    """Review cells clearly above the share the model sends to review on its own validation
    data: the exact 95% CI of this patient's share lies wholly above t. A patient at the
    validated share is not flagged for it (its review cells are listed anyway, and any flag
    they could change is raised as a pending flag)."""
    if d.n_cells == 0:
        return None
    review_pct = 100.0 * d.n_review / d.n_cells
    low, high = exact_binomial_ci(d.n_review, d.n_cells)
    if not _gt(100.0 * low, t):
        return None
    return (f"Low-confidence cells {review_pct:.1f}% ({d.n_review}/{d.n_cells} cells, 95% CI "
            f"{100.0 * low:.1f}-{100.0 * high:.1f}%), clearly above the {_n(t)}% the model sends to review "
            "on its validation data: check image quality, or count manually")


@dataclass(frozen=True)
class FlagRule:
    """One flag: everything about it in one row."""

    code: str
    severity: str  # CRITICAL, UNRELIABLE, WARNING or NOTE (its pending twin: POSSIBLE_CRITICAL or REVIEW)
    setting: str  # the Settings field, and the key in the config's [flags] table
    default: float | int
    unit: str  # PERCENT or COUNT
    meaning: str  # the rule in words, as the Run sheet states it: "blasts >= (% of WBC)"
    rule: Callable[[Differential, Any], str | None]  # the message when raised, else None
    source: str  # where the default comes from (docs/report.md has the references)
    minimum: int = 0  # smallest valid value of a COUNT threshold
    suppressed_by: tuple[str, ...] = ()  # codes that already say what this flag (or its twin) would say
    pending_code: str | None = None  # the twin raised when only cells in review reach the threshold
    pending: Callable[[Differential, Any], str | None] | None = None  # the twin's message, else None

    @property
    def pending_severity(self) -> str:
        """The pending twin's severity: a possible critical finding reads as urgent."""
        return POSSIBLE_CRITICAL if self.severity == CRITICAL else REVIEW

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
    FlagRule(BLASTS_PRESENT, WARNING, "blasts_present_min_count", 1, COUNT, "confident blasts >= (cells)",
             _blasts_present, "ICGHR consensus rules: blasts in blood trigger a smear review", minimum=1,
             suppressed_by=(BLASTS_HIGH,), pending_code=BLASTS_PENDING_REVIEW, pending=_blasts_pending),
    FlagRule(BLASTS_HIGH, CRITICAL, "blasts_high_pct", 20.0, PERCENT, "confident blasts >= (% of WBC)",
             _blasts_high, "WHO 2022 / ICC 2022 AML threshold",
             pending_code=BLASTS_HIGH_PENDING_REVIEW, pending=_blasts_high_pending),
    FlagRule(IG_HIGH, WARNING, "ig_high_pct", 2.0, PERCENT, "confident immature granulocytes > (% of WBC)",
             _ig_high, "ICGHR review criterion; 2% is a common laboratory value",
             pending_code=IG_HIGH_PENDING_REVIEW, pending=_ig_high_pending),
    FlagRule(BANDS_HIGH, WARNING, "bands_high_pct", 10.0, PERCENT, "confident band neutrophils > (% of WBC)",
             _bands_high, "ACCP/SCCM SIRS criteria: >10% band forms",
             pending_code=BANDS_HIGH_PENDING_REVIEW, pending=_bands_high_pending),
    FlagRule(NRBC_PRESENT, WARNING, "nrbc_present_min_count", 1, COUNT, "confident erythroblasts >= (cells)",
             _nrbc_present, "ICGHR consensus rules: NRBC trigger a smear review", minimum=1,
             pending_code=NRBC_PENDING_REVIEW, pending=_nrbc_pending),
    FlagRule(LOW_WBC, NOTE, "min_wbc", 100, COUNT, "WBC classified <",
             _low_wbc, "the routine 100-cell differential (Rümke; CLSI H20 counts 400)", minimum=0),
    FlagRule(MANY_LOW_CONFIDENCE, WARNING, "low_confidence_high_pct", 20.0, PERCENT,
             "review cells, 95% CI wholly > (% of cells)", _many_low_confidence,
             "default: the model's own share of validation cells sent to review (its metadata, "
             "batchwbc.review_share_pct), else 20 %; set it here to override",
             suppressed_by=(MOSTLY_REVIEW,)),
    FlagRule(MANY_UNCLASSIFIED, UNRELIABLE, "unclassified_high_pct", 5.0, PERCENT,
             "unclassified crops, 95% CI wholly > (% of crops)", _many_unclassified,
             "batchwbc: the bundled model leaves 0.2 % of its test crops unclassified (target <= 1 %) "
             "and 18.8 % of an unseen analyzer's (docs/model-card.md)"),
    FlagRule(MOSTLY_REVIEW, UNRELIABLE, "review_mostly_pct", 50.0, PERCENT,
             "review cells, 95% CI wholly > (% of crops), whatever the model expects", _mostly_review,
             "batchwbc: the bundled model sends 19.7 % of its test cells to review, 53.6 % of an unseen "
             "analyzer's (docs/model-card.md); above half, a person classifies most of the patient anyway"),
)

#: Each pending code -> the definite flag it may turn into once its cells are verified.
PENDING_OF: dict[str, str] = {r.pending_code: r.code for r in FLAG_RULES if r.pending_code}


def rule_for(code: str, rules: Sequence[FlagRule] = FLAG_RULES) -> FlagRule:
    """The table's rule for a flag code, so a default quoted elsewhere (`batchwbc info`) is the
    table's own number rather than a copy."""
    for rule in rules:
        if rule.code == code:
            return rule
    raise KeyError(f"no flag rule {code!r} in the table")


#: Most at stake first: the order of a Flags cell and the colour of its row (worst_severity).
_SEVERITY_RANK = {CRITICAL: 0, POSSIBLE_CRITICAL: 1, UNRELIABLE: 2, WARNING: 3, REVIEW: 4, NOTE: 5}
#: Every severity, most at stake first.
SEVERITIES: tuple[str, ...] = tuple(sorted(_SEVERITY_RANK, key=_SEVERITY_RANK.__getitem__))


def evaluate(diff: Differential, settings: "Settings", rules: Sequence[FlagRule] | None = None,
             shift: "ShiftDecision | None" = None) -> list[Flag]:
    """All flags raised by one differential, most at stake first: critical, possible critical
    (pending review), DATA_SHIFT and the other UNRELIABLE flags, warnings, pending warnings,
    then LOW_WBC (table order within a severity; DATA_SHIFT first among the UNRELIABLE); pure. `rules` defaults to the rules `settings` was
    built from. DATA_SHIFT is not a table row: its threshold comes from the model file
    (batchwbc.engine.data_shift), not from the lab's config.

    A rule raises its definite flag, or else its pending twin (REVIEW severity), never both.
    A flag named in `suppressed_by` silences the rule (both forms); its pending twin silences
    the rule's pending twin (BLASTS_HIGH_PENDING_REVIEW already says what
    BLASTS_PENDING_REVIEW would)."""
    table = settings.flag_rules if rules is None else rules
    twin = {r.code: r.pending_code for r in table if r.pending_code}
    raised: list[tuple[int, int, Flag]] = []
    codes: set[str] = set()
    for i, rule in sorted(enumerate(table), key=lambda ir: (_SEVERITY_RANK[ir[1].severity], ir[0])):
        if codes & set(rule.suppressed_by):
            continue
        threshold = getattr(settings, rule.setting)
        message = rule.rule(diff, threshold)
        if message is not None:
            flag = Flag(rule.code, message, rule.severity)
        elif rule.pending is not None and rule.pending_code is not None:
            if codes & {twin.get(c) for c in rule.suppressed_by}:
                continue
            pending = rule.pending(diff, threshold)
            if pending is None:
                continue
            flag = Flag(rule.pending_code, pending, rule.pending_severity)
        else:
            continue
        codes.add(flag.code)
        raised.append((_SEVERITY_RANK[flag.severity], i, flag))
    if shift is not None and shift.raised:
        raised.append((_SEVERITY_RANK[UNRELIABLE], -1, Flag(DATA_SHIFT, f"Data shift: {shift.text()}", UNRELIABLE)))
    return [f for _, _, f in sorted(raised, key=lambda t: (t[0], t[1]))]


def is_pending(flag: Flag) -> bool:
    """A flag only cells in review raise: confirm them before acting on it."""
    return flag.code in PENDING_OF


def worst_severity(flags: Sequence[Flag]) -> str | None:
    """The severity that decides a row's colour: the first of SEVERITIES among the flags; None
    when unflagged."""
    if not flags:
        return None
    return min((f.severity for f in flags), key=lambda sev: _SEVERITY_RANK.get(sev, len(_SEVERITY_RANK)))
