"""DATA_SHIFT: is a batch of crops (one patient, or the whole run) unlike the model's validated data?

Why per batch and not per cell: a crop from another analyser or stain often still looks like
a cell to the model, so few of them are unclassified, yet together they sit further from the
training cells than any batch of the model's own data does (measured: docs/model-card.md,
"Out-of-distribution crops and DATA_SHIFT"). The statistic is the share of the batch's cells
whose OOD score (batchwbc.ood) lies beyond `cell_cut`, the 80th percentile of held-out
training cells' scores, so about 20% of a normal batch is expected there. The score is scaled
per class (engine/ood.py), so this holds whatever the patient's mix of classes: a patient with 70%
eosinophils or monocytes is not "shifted" (measured; an unscaled distance raised it for all
such pseudo-patients). To be fair to small
batches the decision uses the lower bound of that share's exact 95% confidence interval
(Clopper-Pearson), and DATA_SHIFT is raised when that lower bound exceeds `threshold`: the
highest value seen on pseudo-patients of 20-200 held-out training cells of one source.
Under MIN_CELLS cells no decision is made (the interval is too wide to say anything).

References that say so (`ShiftReference.counts_set_apart`, every export since 2026-12-04) also
count a cell the run set apart as unclassified as unusual, whatever its score (shift_scores).
Why: with the Lite0 models a new hospital's cells do not score further from the class centres
than the training sources' own; they fall nearer the reject centres (measured on DeepAPL with
a model that never saw it: 32 % set apart by that rule, 0.2 % by the score, 2 % by colour), so
a statistic of scores alone raised DATA_SHIFT for 1 of 82 such patients (ADR 0011). The
threshold is derived under the same rule, so a batch of the model's own data is unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.ood import OodReference

#: No DATA_SHIFT decision for fewer scored cells than this (default; the model file may set it).
MIN_CELLS = 20
#: Sizes (cells) of the pseudo-patients whose highest batch statistic sets the threshold: at
#: export from held-out training cells (export/ood_reference.py), at adapt from the lab's cells.
PSEUDO_PATIENT_SIZES = (20, 50, 100, 200)
STATISTIC = "lower 95% bound of the share of cells beyond the 80th percentile of held-out training cells' OOD scores"
STATISTIC_WITH_SET_APART = ("lower 95% bound of the share of cells beyond the 80th percentile of held-out training "
                            "cells' OOD scores or set apart as unclassified")
MESSAGE = "results are unreliable until the model is validated on your verified cells"


@dataclass(frozen=True)
class ShiftDecision:
    raised: bool
    decided: bool  # False: too few cells (or no reference) to decide
    cells: int  # cells with a finite score
    unusual: int  # of those, beyond the reference's cell cut
    statistic: float | None  # lower 95% bound of unusual / cells
    threshold: float | None

    def text(self) -> str:
        """One plain sentence a technologist reads at 7 a.m.: the share of unusual cells, no
        statistics (those are in `detail`, for the Run sheet)."""
        if not self.decided:
            return f"no data-shift check ({self.cells} scored {_cells(self.cells)}, fewer than needed)"
        share = 100.0 * self.unusual / self.cells
        if self.raised:
            return (f"{share:.0f}% of cells ({self.unusual} of {self.cells}) are unlike the model's validation data: "
                    f"{MESSAGE}")
        return (f"images like those the model was validated on ({share:.0f}% of cells, {self.unusual} of "
                f"{self.cells}, unlike its validation data, as usual)")

    def detail(self) -> str:
        """The statistic behind the decision, for an auditor (the Run sheet), not for the verdict line."""
        if not self.decided or self.statistic is None or self.threshold is None:
            return ""
        op = ">" if self.raised else "<="
        return (f"lower 95% bound of that share {100 * self.statistic:.1f}% {op} the limit "
                f"{100 * self.threshold:.1f}%")


def _cells(n: int) -> str:
    return "cell" if n == 1 else "cells"


#: The next step after DATA_SHIFT and its kin, in the log and on the report's banners.
NEXT_STEP = ("check the model on cells your lab has verified (batchwbc evaluate) and adapt it to your images "
             "(batchwbc adapt); see docs/adaptation.md")
#: The same for a model `batchwbc adapt` wrote: telling a lab to adapt the model it adapted
#: would send it in a circle; what is left is its own count and more verified cells.
NEXT_STEP_ADAPTED = ("count these patients' cells yourself; this model is already adapted to your lab, so check it "
                     "on verified cells of other patients (batchwbc evaluate) and adapt it again on more of your "
                     "verified cells (batchwbc adapt); see docs/adaptation.md")


def next_step(adapted: bool = False) -> str:
    """The next step the warnings name, for a model as shipped or adapted (pure)."""
    return NEXT_STEP_ADAPTED if adapted else NEXT_STEP


def lower_bound(unusual: int, cells: int) -> float:
    from batchwbc.core.differential import exact_binomial_ci

    return exact_binomial_ci(unusual, cells)[0]


def batch_statistic(ref: "OodReference", scores: "Sequence[float] | np.ndarray") -> float:
    """The statistic of one batch of cell scores (ref.shift must be set; 0 for no cells)."""
    import math

    vals = [float(s) for s in scores if s is not None and not math.isnan(float(s))]
    if not vals:
        return 0.0
    return lower_bound(sum(1 for s in vals if s > ref.shift.cell_cut), len(vals))


def decide(ref: "OodReference | None", scores: "Sequence[float | None] | np.ndarray") -> ShiftDecision:
    """DATA_SHIFT for one batch of cell OOD scores (None = a cell without a score); pure.
    An unclassified crop's score counts like any other: it is far from the training cells."""
    import math

    vals = [float(s) for s in scores if s is not None and not math.isnan(float(s))]  # inf stays: unusual
    if ref is None or ref.shift is None:
        return ShiftDecision(False, False, len(vals), 0, None, None)
    shift = ref.shift
    if len(vals) < shift.min_cells:
        return ShiftDecision(False, False, len(vals), 0, None, shift.threshold)
    unusual = sum(1 for s in vals if s > shift.cell_cut)
    stat = lower_bound(unusual, len(vals))
    return ShiftDecision(stat > shift.threshold, True, len(vals), unusual, stat, shift.threshold)


def shift_scores(ref: "OodReference | None", scores: "Sequence[float | None] | np.ndarray",
                 set_apart: "Sequence[bool] | np.ndarray") -> list[float | None]:
    """The scores DATA_SHIFT counts (pure): a cell set apart as unclassified becomes +inf (always
    beyond the cut) when the reference counts such cells, else its score is kept as it is."""
    if len(scores) != len(set_apart):
        raise ValueError(f"{len(scores)} scores for {len(set_apart)} set-apart flags")
    counts = ref is not None and ref.shift is not None and ref.shift.counts_set_apart
    return [float("inf") if counts and bool(a) else (None if s is None else float(s)) for s, a in zip(scores, set_apart)]


def decide_all(model_metadata, cells) -> tuple[dict[str, ShiftDecision], ShiftDecision]:
    """(decision per patient, decision for the whole run) from a run's cells and the model's
    metadata; no decisions (decided=False) when the model carries no reference."""
    from batchwbc.engine.ood import OodReferenceError, from_metadata

    try:
        ref = from_metadata(model_metadata)
    except OodReferenceError:  # the Classifier already refused such a model; a report never fails on it
        ref = None
    from batchwbc.engine.ood import UNCLASSIFIED

    scores = shift_scores(ref, [c.ood_score for c in cells], [c.class_id == UNCLASSIFIED for c in cells])
    by_patient: dict[str, list] = {}
    for c, score in zip(cells, scores):
        by_patient.setdefault(c.patient, []).append(score)
    per_patient = {p: decide(ref, s) for p, s in by_patient.items()}
    return per_patient, decide(ref, scores)


def log_line(per_patient: dict[str, ShiftDecision], whole: ShiftDecision, adapted: bool = False) -> str | None:
    """The one warning sentence for the log, or None when nothing was raised: how much of the
    run is unlike the validation data, for whom, and what to do next."""
    raised = [p for p, d in per_patient.items() if d.raised]
    if not raised and not whole.raised:
        return None
    decided = sum(d.decided for d in per_patient.values())
    names = ", ".join(raised[:10]) + (f" and {len(raised) - 10} more" if len(raised) > 10 else "")
    who = (f"{len(raised)} of {decided} {'patient' if decided == 1 else 'patients'} checked"
           + (f" ({names})" if raised else ""))
    if whole.decided:
        share = 100.0 * whole.unusual / whole.cells
        what = f"{share:.0f}% of this run's cells are unlike the model's validation data ({who})"
    else:
        what = f"the cells of {who} are unlike the model's validation data"
    return f"DATA_SHIFT: {what}, so the results are unreliable: {next_step(adapted)}."
