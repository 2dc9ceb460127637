"""Widen a model's stain-colour envelope by the lab's verified cells (`batchwbc adapt`).

Why: the envelope (batchwbc.engine.stain_colour) sets apart a crop whose stain colour is unlike
every training source's. A lab whose stain lies outside it would see its cells set apart by
colour even after adapting the model to them, which defeats adapt for exactly the labs that
need it. Once the lab has verified its cells, their stain is validated data, as the thresholds
module (batchwbc.adaptation.thresholds) holds for the embedding: so the lab's cells become one
more group of the envelope, fitted and thresholded by the rule export used for the training
sources (stain_colour.with_group). The parent's groups stay as they are and the threshold never
falls, so the training sources' cells stay inside, and a colour unlike both the training
sources and the lab (a re-stained crop) is still set apart.

Too few cells for a Gaussian of their own (stain_colour.MIN_GROUP) keep the parent's envelope,
and the provenance says so: a handful of cells would give a group of any shape. A parent without
an envelope gets none. Pure numpy; no file access.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.stain_colour import ColourEnvelope

#: The key the adaptation provenance (batchwbc.adaptation JSON) records this under.
PROVENANCE_KEY = "stain_colour_rederived"
#: The added group's name: "adapted: <labelled folder's name>" (made unique when adapted again).
GROUP_PREFIX = "adapted: "


@dataclass(frozen=True)
class ColourRederived:
    envelope: "ColourEnvelope | None"  # the envelope the adapted model carries (the parent's when kept)
    provenance: dict[str, Any] | None  # JSON-ready; None when the parent has no envelope
    kept_because: str | None = None  # one sentence when the parent's envelope was kept unchanged


def group_name(envelope: "ColourEnvelope", lab_name: str) -> str:
    """GROUP_PREFIX + lab_name, with " (2)", " (3)" ... when an earlier adaptation used it."""
    base = f"{GROUP_PREFIX}{lab_name}"
    name, n = base, 1
    while name in envelope.groups:
        n += 1
        name = f"{base} ({n})"
    return name


def rederive_colour(parent: "ColourEnvelope | None", stats: "np.ndarray", lab_name: str) -> ColourRederived:
    """The envelope for the adapted model (see module doc). stats: the lab cells' colour
    statistics [N, 2] (stain_colour.colour_statistics of the model inputs adapt embedded);
    lab_name: the labelled folder's name."""
    import numpy as np

    from batchwbc.engine import stain_colour

    if parent is None:
        return ColourRederived(None, None)
    x = np.asarray(stats, dtype=np.float64).reshape(-1, 2)
    x = x[np.all(np.isfinite(x), axis=1)]
    prov: dict[str, Any] = {
        "lab_cells": int(len(x)),
        "parent_outside_lab_cells": int(stain_colour.outside(parent, x).sum()),
        "threshold": {"parent": parent.threshold, "new": parent.threshold},
        "groups": {"parent": list(parent.groups), "new": list(parent.groups)},
    }

    def keep(reason: str) -> ColourRederived:
        why = f"the stain-colour envelope was kept as the parent's: {reason}"
        return ColourRederived(parent, {**prov, "new_outside_lab_cells": prov["parent_outside_lab_cells"],
                                        "kept_parent_because": why}, why)

    if len(x) < stain_colour.MIN_GROUP:
        return keep(f"{len(x)} lab cells are too few for a colour group of their own "
                    f"(at least {stain_colour.MIN_GROUP} needed)")
    try:
        quantile, margin = stain_colour.threshold_rule(parent)
    except ValueError as exc:
        return keep(str(exc))
    name = group_name(parent, lab_name)
    rule = f"max(parent, the lab cells' distances at quantile {quantile:g} x margin {margin:g})"
    new = stain_colour.with_group(parent, x, name, {"rule": rule})
    prov.update({
        "added_group": name,
        "threshold": {"parent": parent.threshold, "new": new.threshold, "rule": rule},
        "groups": {"parent": list(parent.groups), "new": list(new.groups)},
        "new_outside_lab_cells": int(stain_colour.outside(new, x).sum()),
    })
    return ColourRederived(new, prov)
