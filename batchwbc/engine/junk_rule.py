"""The not-a-cell rule: one linear boundary between the model's cells and junk, in the OOD space.

Why a rule of its own beside the reject centres (batchwbc.engine.ood): the reject-centre rule
compares the distance to the nearest cell class with the distance to the nearest reject
centre, under the covariance the cell classes share. Junk is spread far wider than any cell
class, so one centre per kind of junk describes it poorly, and with three training sources the
rule's margin is a pooled quantile set by the source whose cells sit nearest the reject
centres (DeepAPL). Out of sample the bundled Lite0 counted 9.3 % of synthetic non-cells as
cells (docs/decisions/0011-out-of-distribution-and-data-shift.md, "A linear not-a-cell
rule"). A logistic regression fitted on the very crops the reject centres come from (training
cells against background corners and synthetic non-cells) learns the direction that separates
them instead of assuming it.

It is fitted at export (export.ood_reference.fit_junk_rule); the runtime only applies it.
The rule lives in the reference's whitened PCA space z = P (e - mu), which the runtime
computes anyway: per crop one dot product of k numbers. Its threshold is the same quantile of
held-out training cells' logits as the other two rules' (UNCLASSIFIED_QUANTILE), so it sets
apart at most that share of cells like the training cells. It is kept beside the reject-centre
rule, not instead of it: on a hospital the model never saw, the cells that rule sets apart are
the ones the model gets wrong most often (ADR 0011), which is its job as an OOD rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # numpy is imported where it is used
    import numpy as np


@dataclass(frozen=True)
class JunkRule:
    """A crop is not a cell when weights . z + bias > threshold (z: the reference's whitened space)."""

    weights: "np.ndarray"  # [k]
    bias: float
    threshold: float
    info: Mapping[str, Any] = field(default_factory=dict)


def logits(rule: JunkRule, z: "np.ndarray") -> "np.ndarray":
    """Log-odds of "not a cell" per row of z ([N, k]); higher is more like junk (pure)."""
    import numpy as np

    return np.asarray(z, dtype=np.float64) @ np.asarray(rule.weights, dtype=np.float64) + rule.bias


def flags(rule: JunkRule, z: "np.ndarray") -> "np.ndarray":
    """True where the crop is set apart as not a cell (pure)."""
    return logits(rule, z) > rule.threshold
