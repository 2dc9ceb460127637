"""Stain colour of a crop, and the envelope of the training cells' stain colours.

Why a colour check apart from the embedding (batchwbc.engine.ood): an EfficientNet-Lite0
model standardises colour per image inside the network and is trained with stain
augmentation, so its embedding is blind to stain colour. Crops whose hue was turned by 120
degrees landed among the training cells (none of 12 unclassified, 4-6 counted without
review; docs/decisions/0011-out-of-distribution-and-data-shift.md). The colour check catches
them from the pixels alone, whatever the model does.

The statistic is the mean OpenCV 8-bit Lab a* and b* (128 = neutral) of the *model input*:
the framed, resized uint8 RGB square the runtime already holds in the main process. Why the
model input and not the decoded crop: framing (ADR 0005) puts the cell at the same share of
the square for every analyser, so the mean mixes cell and background alike across scanners,
and the runtime pays no extra decode, no worker-protocol change and no full-size colour
conversion. Why a*/b* means only: measured on 3,000 training cells of three sources, adding
the mean L* (exposure, cell size) or the spreads put normal AML-LMU cells outside and let
re-stained crops in; the chroma means separate both best.

The envelope is one Gaussian per training source (a robust centre and covariance of that
source's cells), and a crop's distance is its Mahalanobis distance to the nearest source: the
sources' stains differ (AML-LMU is bluer than PBC and DeepAPL), and one Gaussian around all of
them would also cover the space between them.

`batchwbc adapt` adds the lab's verified cells as one more group (with_group, called by
batchwbc.adaptation.colour), thresholded by the rule the envelope was fitted with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # numpy and OpenCV are imported where they are used
    import numpy as np

#: The statistic's name, stored with the envelope: a runtime refuses an envelope of another kind.
STATISTIC = "lab8-ab-mean-of-model-input-stride2"
#: Every STRIDE-th pixel in each direction: the mean of a*/b* moves by far less than a Lab
#: unit, and the conversion costs a quarter (33 vs 62 us per 128 px crop, measured).
STRIDE = 2
#: Covariance floor (Lab units squared): a source of near-identical crops (a synthetic test
#: set) would otherwise give a singular covariance and an envelope no real crop fits in.
VARIANCE_FLOOR = 1.0
#: The robust fit keeps this share of a source's cells nearest its centre (iterated).
KEEP = 0.975
#: Fewest cells a source needs for a Gaussian of its own; smaller sources are pooled.
MIN_GROUP = 20
POOLED = "(pooled)"


@dataclass(frozen=True)
class ColourEnvelope:
    """Where the training cells' stain colours lie: a crop is outside when its distance to the
    nearest group's centre is beyond `threshold`."""

    centres: "np.ndarray"  # [G, 2] mean a*, b* per group (training source)
    whitening: "np.ndarray"  # [G, 2, 2] inverse square root of each group's covariance
    groups: tuple[str, ...]
    threshold: float  # Mahalanobis distance (not squared)
    info: Mapping[str, Any] = field(default_factory=dict)


def colour_statistics(batch: "np.ndarray") -> "np.ndarray":
    """[N, S, S, 3] uint8 RGB model inputs -> [N, 2] float64 mean Lab a*, b* (pure).
    One colour conversion for the whole batch (the images stacked into one tall image)."""
    import cv2
    import numpy as np

    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"colour statistics need a uint8 [N, S, S, 3] batch, not {batch.dtype} {batch.shape}")
    n = batch.shape[0]
    if n == 0:
        return np.zeros((0, 2))
    small = np.ascontiguousarray(batch[:, ::STRIDE, ::STRIDE])
    h, w = small.shape[1:3]
    lab = cv2.cvtColor(small.reshape(n * h, w, 3), cv2.COLOR_RGB2LAB).reshape(n, h, w, 3)
    return np.array([cv2.mean(lab[i])[1:3] for i in range(n)], dtype=np.float64)


def group_distances(env: ColourEnvelope, stats: "np.ndarray") -> "np.ndarray":
    """Mahalanobis distance of each [N, 2] statistic to every group, [N, G]; +inf for a
    non-finite statistic (pure)."""
    import numpy as np

    x = np.asarray(stats, dtype=np.float64).reshape(-1, 2)
    finite = np.all(np.isfinite(x), axis=1)
    z = np.einsum("gij,ngj->ngi", env.whitening.astype(np.float64),
                  np.where(finite[:, None], x, 0.0)[:, None, :] - env.centres.astype(np.float64)[None])
    d = np.sqrt((z * z).sum(axis=2))
    d[~finite] = np.inf
    return d


def distances(env: ColourEnvelope, stats: "np.ndarray") -> "np.ndarray":
    """Mahalanobis distance of each [N, 2] statistic to the nearest group; +inf for a
    non-finite statistic (pure)."""
    return group_distances(env, stats).min(axis=1)


def outside(env: ColourEnvelope, stats: "np.ndarray") -> "np.ndarray":
    """True where a crop's stain colour is unlike every training group's (pure)."""
    return distances(env, stats) > env.threshold


def _whiten(cov: "np.ndarray") -> "np.ndarray":
    import numpy as np

    w, u = np.linalg.eigh(cov)
    return u @ np.diag(1.0 / np.sqrt(w)) @ u.T


def _robust_gaussian(x: "np.ndarray", rounds: int = 5) -> tuple["np.ndarray", "np.ndarray"]:
    """Centre and covariance of the KEEP share of rows nearest the centre, refitted `rounds`
    times (concentration steps of a minimum-covariance-determinant fit): a few odd crops
    (a smear's edge, a dark giant cell) do not widen the envelope for everyone."""
    import numpy as np

    floor = VARIANCE_FLOOR * np.eye(x.shape[1])
    keep = np.ones(len(x), bool)
    for _ in range(rounds):
        centre = x[keep].mean(axis=0)
        cov = np.cov(x[keep].T) + floor
        z = (x - centre) @ _whiten(cov).T
        d = (z * z).sum(axis=1)
        keep = d <= np.quantile(d, KEEP)
    return x[keep].mean(axis=0), np.cov(x[keep].T) + floor


def fit_envelope(stats: "np.ndarray", groups: Sequence[str], quantile: float, margin: float,
                 info: Mapping[str, Any] | None = None) -> ColourEnvelope:
    """The envelope of training cells' statistics ([N, 2], one group name per row): a robust
    Gaussian per group (groups under MIN_GROUP cells pooled), and the threshold at `quantile`
    of these same cells' distances times `margin` (the margin stands in for cells the fit has
    not seen; export.ood_reference measures the share of held-out cells outside)."""
    import numpy as np

    x = np.asarray(stats, dtype=np.float64)
    g = np.asarray([str(s) for s in groups])
    if x.ndim != 2 or x.shape[1] != 2 or len(x) != len(g):
        raise ValueError("need an [N, 2] statistic array with one group per row")
    if len(x) < MIN_GROUP or not np.all(np.isfinite(x)):
        raise ValueError(f"the stain-colour envelope needs at least {MIN_GROUP} cells with finite statistics")
    if not (0.0 < quantile <= 1.0 and margin >= 1.0):
        raise ValueError("quantile must be in (0, 1] and margin at least 1")
    names, counts = np.unique(g, return_counts=True)
    small = set(names[counts < MIN_GROUP])
    g = np.where(np.isin(g, list(small)), POOLED, g)
    if (g == POOLED).sum() and (g == POOLED).sum() < MIN_GROUP:  # too few even pooled: join the largest group
        g = np.where(g == POOLED, names[np.argmax(counts)], g)
    order = tuple(sorted(set(g.tolist())))
    fits = [_robust_gaussian(x[g == name]) for name in order]
    env = ColourEnvelope(centres=np.stack([c for c, _ in fits]), whitening=np.stack([_whiten(v) for _, v in fits]),
                         groups=order, threshold=float("inf"))
    threshold = _threshold_rule(env, x, quantile, margin)
    full = {"statistic": STATISTIC, "quantile": quantile, "margin": margin, "fit_cells": int(len(x))}
    full.update(info or {})
    return ColourEnvelope(env.centres, env.whitening, order, threshold, full)


def _threshold_rule(env: ColourEnvelope, x: "np.ndarray", quantile: float, margin: float) -> float:
    """The threshold rule: `quantile` of these cells' distances to the nearest group, times `margin`."""
    import numpy as np

    return float(np.quantile(distances(env, x), quantile)) * margin


def threshold_rule(env: ColourEnvelope) -> tuple[float, float]:
    """(quantile, margin) the envelope's threshold was set with, as fit_envelope records them;
    ValueError when the envelope does not record them (then nobody can widen it by the same rule)."""
    try:
        quantile, margin = float(env.info["quantile"]), float(env.info["margin"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("the stain-colour envelope does not record the quantile and margin of its threshold") from None
    if not (0.0 < quantile <= 1.0 and margin >= 1.0):
        raise ValueError("the stain-colour envelope records an invalid quantile or margin")
    return quantile, margin


def with_group(env: ColourEnvelope, stats: "np.ndarray", name: str,
               info: Mapping[str, Any] | None = None) -> ColourEnvelope:
    """`env` with one more group, a robust Gaussian fitted on `stats` ([N, 2], N >= MIN_GROUP,
    all finite), and a threshold by env's own rule (threshold_rule) on these cells' distances
    to the widened envelope, or env's threshold where that is higher (pure).

    Why never lower: env's own training cells are not at hand (only their groups are stored),
    and they set env's threshold; a lower one would put some of them outside. Why the same
    rule: the new group is judged exactly as export judged the training sources. `info` is
    recorded in the envelope's info under "added_groups" (one entry per group ever added)."""
    import numpy as np

    x = np.asarray(stats, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError("need an [N, 2] statistic array")
    if len(x) < MIN_GROUP or not np.all(np.isfinite(x)):
        raise ValueError(f"a stain-colour group needs at least {MIN_GROUP} cells with finite statistics")
    if name in env.groups:
        raise ValueError(f"the stain-colour envelope already has a group {name!r}")
    quantile, margin = threshold_rule(env)
    centre, cov = _robust_gaussian(x)
    wider = ColourEnvelope(centres=np.concatenate([np.asarray(env.centres, np.float64), centre[None]]),
                           whitening=np.concatenate([np.asarray(env.whitening, np.float64), _whiten(cov)[None]]),
                           groups=(*env.groups, name), threshold=float("inf"))
    own = _threshold_rule(wider, x, quantile, margin)
    added = {"group": name, "cells": int(len(x)), "threshold_by_rule": own, "threshold_before": env.threshold,
             **dict(info or {})}
    full = {**dict(env.info), "added_groups": [*env.info.get("added_groups", []), added]}
    return ColourEnvelope(wider.centres, wider.whitening, wider.groups, max(env.threshold, own), full)
