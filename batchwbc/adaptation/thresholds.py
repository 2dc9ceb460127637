"""Re-derive a model's OOD and DATA_SHIFT thresholds from a lab's verified cells (`batchwbc adapt`).

Why: adapt refits only the last layer, so the embedding, and with it the parent reference's
class centres, covariance and background centre (batchwbc.ood), stay valid. What changes is
what counts as "validated data": once a lab has adapted the model on its own verified cells,
those cells are validated data, and a run on more cells like them must neither leave them
unclassified nor raise DATA_SHIFT. So only the thresholds move, and only upwards (never
stricter than the parent): the unclassified threshold to cover the lab's cells, the DATA_SHIFT
cell cut and batch threshold to what pseudo-patients of the lab's cells reach.

The reject-centre (background) rule moves only where the reference carries the not-a-cell rule
(batchwbc.engine.junk_rule), and then like the unclassified threshold: its margin becomes at
least the lab's cells' gap at the same quantile. Why: a lab whose analyser the model never saw
has a third of its verified cells nearer the reject centres than the training cells are (ADR
0011), and without a move they stayed unclassified on every patient after adapting; the
not-a-cell rule, which is never moved, is what keeps noise and background out, and it caught
them as well as before when measured (docs/adaptation.md). The move is also checked on junk cut
from the lab's own crops (margin_move), since a lab's background is not the training sources'.
A reference without that rule keeps its margin, since there the margin is the only guard
against background. The not-a-cell rule itself is kept as it is. Pure numpy; no TensorFlow,
no file access.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from batchwbc.engine.data_shift import PSEUDO_PATIENT_SIZES
from batchwbc.engine.ood import UNCLASSIFIED_QUANTILE

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.ood import OodReference

#: Pseudo-patients drawn per pool (one patient folder, or all cells) and size.
DRAWS_PER_SIZE = 25
#: The reject-centre margin may move if the junk cut from the lab's crops it counts as cells stays
#: within this share (or the count with the margin kept, if higher): the share of held-out cells
#: issue 18 allows unclassified at home, the same bar the other way round.
JUNK_TOLERANCE = 0.01
#: The key the adaptation provenance (batchwbc.adaptation JSON) records this under.
PROVENANCE_KEY = "ood_reference_rederived"


@dataclass(frozen=True)
class Rederived:
    reference: "OodReference"  # the parent's reference with the lab's thresholds
    provenance: dict[str, Any]  # what was re-derived, for batchwbc.adaptation (JSON-ready)


def _pools(groups: Sequence[str | None] | None, n: int) -> dict[str, list[int]]:
    """Cell indices per patient folder; cells without a patient share one pool ("" key)."""
    pools: dict[str, list[int]] = {}
    for i in range(n):
        g = groups[i] if groups is not None else None
        pools.setdefault(g or "", []).append(i)
    return pools


def pseudo_patient_statistics(ref: "OodReference", scores: "np.ndarray", groups: Sequence[str | None] | None,
                              seed: int = 0) -> list[float]:
    """The DATA_SHIFT batch statistic (data_shift.batch_statistic with ref's cut) of pseudo-patients
    drawn from the lab's cells: groups of 20, 50, 100, 200 cells, each drawn within one patient
    folder (a real patient's cells are what a run will check), as many sizes as the pool holds;
    a pool smaller than 20 cells but with at least min_cells counts as one pseudo-patient."""
    import numpy as np

    from batchwbc.engine.data_shift import batch_statistic

    rng = np.random.default_rng(seed)
    stats: list[float] = []
    for _, idx in sorted(_pools(groups, len(scores)).items()):
        pool = scores[np.array(idx)]
        sizes = [s for s in PSEUDO_PATIENT_SIZES if s <= len(pool)]
        if not sizes and len(pool) >= ref.shift.min_cells:
            stats.append(batch_statistic(ref, pool))
        for size in sizes:
            for _ in range(DRAWS_PER_SIZE if size < len(pool) else 1):
                stats.append(batch_statistic(ref, rng.choice(pool, size=size, replace=False)))
    return stats


def rederive(parent: "OodReference", embeddings: "np.ndarray", groups: Sequence[str | None] | None = None,
             seed: int = 0, junk: "np.ndarray | None" = None) -> Rederived:
    """The parent's reference with thresholds that accept the lab's verified cells (see module doc).

    embeddings: the lab cells' embeddings [N, D] from the parent model (the same as the adapted
    one's: adapt changes only the head); groups: each cell's patient folder or None; junk:
    embeddings of background corners and synthetic non-cells cut from the lab's own crops
    (batchwbc.engine.junk_crops), which the command always passes: the reject-centre margin
    moves only if it counts no more of them than JUNK_TOLERANCE allows (margin_move)."""
    import numpy as np

    from batchwbc.engine import data_shift, ood

    emb = np.asarray(embeddings, dtype=np.float32)
    scores, flagged = ood.score_and_flag(parent, emb)
    finite = np.isfinite(scores)
    lab = scores[finite]
    prov: dict[str, Any] = {
        "lab_cells_scored": int(finite.sum()),
        "parent_unclassified_lab_cells": int(flagged.sum()),
        "unclassified_threshold": {"parent": parent.threshold, "new": parent.threshold,
                                   "rule": f"max(parent, {100 * UNCLASSIFIED_QUANTILE:g}th percentile of the lab cells' scores)"},
        "background_rule": {"parent": parent.reject_margin, "new": parent.reject_margin,
                            "rule": (f"max(parent, {100 * UNCLASSIFIED_QUANTILE:g}th percentile of the lab cells' gaps)"
                                     if parent.junk is not None else "unchanged: the reference has no not-a-cell rule")},
        "not_a_cell_rule": "unchanged" if parent.junk is not None else "none",
    }
    if len(lab) == 0:  # nothing to learn from: keep the parent's reference as it is
        prov["unchanged_because"] = "no lab cell has a finite score"
        return Rederived(parent, prov)

    threshold = max(parent.threshold, float(np.quantile(lab, UNCLASSIFIED_QUANTILE)))
    prov["unclassified_threshold"]["new"] = threshold
    margin = parent.reject_margin
    if parent.junk is not None:
        _, known, rejected = ood.distances(parent, emb[finite])
        gaps = (known - rejected)[np.isfinite(known - rejected)]
        if len(gaps):
            margin = max(parent.reject_margin, float(np.quantile(gaps, UNCLASSIFIED_QUANTILE)))
        if junk is not None and margin > parent.reject_margin:
            margin, prov["junk_check"] = margin_move(dataclasses.replace(parent, threshold=threshold), margin, junk)
    prov["background_rule"]["new"] = margin
    new = dataclasses.replace(parent, threshold=threshold, reject_margin=margin,
                              info={**dict(parent.info), "rederived_by_adapt": {"lab_cells": int(len(lab))}})
    # What is still unclassified is what the not-a-cell rule, an unmoved background rule or the
    # 0.25% tails catch: reported, not hidden, so a lab sees verified cells the guard still sets apart.
    _, still = ood.score_and_flag(new, emb)
    prov["new_unclassified_lab_cells"] = int(still.sum())

    if parent.shift is not None:
        shift = parent.shift
        pools = _pools(groups, len(scores))
        # what DATA_SHIFT counts: with the parent's thresholds before, with the new ones after
        # (data_shift.shift_scores: set-apart cells count as unusual where the reference says so)
        counted_before = np.asarray(data_shift.shift_scores(parent, scores, flagged), dtype=np.float64)
        counted = np.asarray(data_shift.shift_scores(new, scores, still), dtype=np.float64)
        decisions = {p: data_shift.decide(parent, counted_before[np.array(i)]) for p, i in pools.items()}
        batches = {p: counted[np.array(i)] for p, i in pools.items()}
        cut = max(shift.cell_cut, float(np.quantile(lab, shift.cell_quantile)))
        probe = dataclasses.replace(new, shift=dataclasses.replace(shift, cell_cut=cut))
        kept = np.flatnonzero(finite)
        stats = pseudo_patient_statistics(probe, counted[kept], [groups[i] for i in kept] if groups else None, seed)
        shift_threshold = max([shift.threshold, *stats])
        new_shift = dataclasses.replace(shift, cell_cut=cut, threshold=shift_threshold,
                                        info={**dict(shift.info), "rederived_by_adapt": {
                                            "pseudo_patients": len(stats), "sizes": list(PSEUDO_PATIENT_SIZES)}})
        new = dataclasses.replace(new, shift=new_shift)
        after = {p: data_shift.decide(new, s) for p, s in batches.items()}
        named = [p for p in batches if p]
        prov["data_shift"] = {
            "cell_cut": {"parent": shift.cell_cut, "new": cut, "rule": f"max(parent, the lab cells' score at quantile {shift.cell_quantile})"},
            "threshold": {"parent": shift.threshold, "new": shift_threshold,
                          "rule": "max(parent, the highest batch statistic of pseudo-patients of 20-200 lab cells)"},
            "pseudo_patients": len(stats),
            "highest_pseudo_patient_statistic": max(stats) if stats else None,
            "min_cells": shift.min_cells,
            "batches": "patient folders" if named else "all lab cells as one batch",
            "batches_checked": sum(d.decided for d in decisions.values()),
            "parent_raised_data_shift": sum(d.raised for d in decisions.values()),
            "new_raised_data_shift": sum(d.raised for d in after.values()),
        }
    return Rederived(new, _finite_json(prov))


def margin_move(kept: "OodReference", margin: float, junk: "np.ndarray") -> tuple[float, dict[str, Any]]:
    """The margin to use, `margin` or `kept`'s own, and what the check counted (pure).

    Why a check on the lab's own junk: the margin was the guard against background until the
    not-a-cell rule, and a lab's background (its red cells, its platelets, its stain) is not the
    training sources'. Junk cut from the lab's own crops the way the export cuts it is counted
    as cells with the margin kept and with it moved; the move stands if it counts at most
    max(the kept count, JUNK_TOLERANCE of the crops)."""
    import numpy as np

    from batchwbc.engine import ood

    junk = np.asarray(junk, dtype=np.float32)
    counted_kept = int((~ood.score_and_flag(kept, junk)[1]).sum())
    counted_moved = int((~ood.score_and_flag(dataclasses.replace(kept, reject_margin=margin), junk)[1]).sum())
    allowed = max(counted_kept, int(math.floor(JUNK_TOLERANCE * len(junk))))
    check: dict[str, Any] = {"junk_crops": int(len(junk)), "counted_with_margin_kept": counted_kept,
                             "counted_with_margin_moved": counted_moved, "allowed": allowed,
                             "rule": f"move only if at most max(the kept count, {100 * JUNK_TOLERANCE:g}% of the crops) are counted"}
    if counted_moved > allowed:
        check["margin_kept_because"] = (f"moving it to {margin:.3g} would count {counted_moved} of {len(junk)} junk "
                                        f"crops cut from the lab's cells as cells ({counted_kept} with it kept)")
        return kept.reject_margin, check
    return margin, check


def _finite_json(d: Any) -> Any:
    """JSON has no infinity: a non-finite float becomes None."""
    if isinstance(d, dict):
        return {k: _finite_json(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
