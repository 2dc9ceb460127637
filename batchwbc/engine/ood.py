"""Out-of-distribution (OOD) score of a crop: how unlike the model's own training cells it is.

Why: a softmax always sums to one, so noise, a background corner or a cell type the model
never learned still gets a confident class (random noise came out "myelocyte 0.88"). The
model's embedding (the input of its last layer) does carry the information: crops of the
classes it knows fall in tight clusters, other crops do not. The rule chosen by measurement
(docs/decisions/0011-out-of-distribution-and-data-shift.md) uses the Mahalanobis distance of
the embedding to each class centre, with one covariance shared by all classes, in a PCA
subspace of the training embeddings (Lee et al., NeurIPS 2018), plus one "reject" centre
fitted on background corners cut from training crops (red cells, no leukocyte: the crops a
distance to the cell classes alone missed most often). A crop is unclassified when

* its OOD score is beyond `threshold`: the smallest, over the cell classes, of the distance to
  the class centre divided by that class's median distance among held-out training cells
  (1 = a typical cell of that class; the division makes the score mean the same for a
  tight class such as platelets and a spread-out one such as eosinophils, so a patient's
  class mix does not move the DATA_SHIFT statistic), or
* it lies nearer the background centre than any cell class, by more than `reject_margin`
  (raw distance to the nearest cell class minus distance to the background centre), or
* the reference carries a not-a-cell rule (batchwbc.engine.junk_rule: one linear boundary
  between training cells and junk crops in the same whitened space) and the crop lies on the
  junk side of it.

Everything is folded into one linear map, so the runtime computes  || P (e - mu) - centre ||^2
per crop and centre: a [k, D] matrix product, nothing else.

Apart from the embedding, the reference may carry a stain-colour envelope
(batchwbc.engine.stain_colour): a crop whose mean Lab a*/b* lies outside the training cells'
colours is unclassified too, with a reason of its own. Why: a model that standardises colour
inside its graph (EfficientNet-Lite0) has an embedding blind to stain colour, so re-stained
crops score like cells (ADR 0011, "Stain-colour check"). A reference without the envelope
judges by the embedding alone, exactly as before.

The reference (mu, P, the centres, the class scales, the thresholds, the colour envelope) lives in the model
file's metadata under KEY_OOD, written by `python -m export.ood_reference`; a model without it simply gets
no OOD score and no "unclassified" label (older files keep working).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # numpy is imported where it is used, so `batchwbc --help` stays instant
    import numpy as np

    from batchwbc.engine.junk_rule import JunkRule
    from batchwbc.engine.stain_colour import ColourEnvelope

#: Metadata key of the cell-level reference (JSON, see to_metadata).
KEY_OOD = "batchwbc.ood"
#: The unclassified threshold covers this share of known cells' scores: held-out training cells
#: at export (export/ood_reference.py), the lab's verified cells at adapt (adaptation.thresholds).
UNCLASSIFIED_QUANTILE = 0.9975
#: The label a crop gets when its score is beyond the threshold. Not a catalogue class: the
#: model never predicts it, and it is never counted in the differential.
UNCLASSIFIED = "unclassified"
UNCLASSIFIED_DISPLAY = "Unclassified"
#: The review reason shown for such a crop.
UNCLASSIFIED_REASON = "not recognised as a cell the model knows"
#: The review reason of a crop the stain-colour envelope sets apart.
COLOUR_REASON = "stain colour unlike any training cell"
#: Why a crop is unclassified, as bits of one small integer (the result cache stores it; 0:
#: classified). A cache row written before the colour check holds 1, which still means BY_EMBEDDING.
BY_EMBEDDING = 1
BY_COLOUR = 2
SCORE_NAME = "mahalanobis-pca-nearest-class"
#: Format 2 = format 1 plus a "stain_colour" envelope. A reference with the envelope is written
#: as format 2, so an older batchwbc refuses the model instead of silently skipping the colour
#: check; one without it stays format 1, byte for byte as before. Format 3 = a "junk_rule"
#: (the not-a-cell rule), with or without the envelope: again so that an older batchwbc refuses
#: the model rather than count junk the file says to set apart.
FORMAT = 1
FORMAT_WITH_COLOUR = 2
FORMAT_WITH_JUNK_RULE = 3
#: Class names starting with this are "not a cell" centres (e.g. "reject:background").
REJECT_PREFIX = "reject:"


class OodReferenceError(Exception):
    """A batchwbc.ood entry that cannot be used; str is one sentence."""


@dataclass(frozen=True)
class ShiftReference:
    """Batch-level reference (batchwbc.engine.data_shift): the threshold on the batch statistic."""

    threshold: float
    cell_quantile: float  # a cell "is unusual" above this quantile of held-out training cells' scores
    cell_cut: float  # that quantile's score
    min_cells: int
    info: Mapping[str, Any] = field(default_factory=dict)
    # True: a cell the run sets apart as unclassified counts as unusual whatever its score
    # (data_shift.shift_scores); the threshold was derived under the same rule. Older files: False.
    counts_set_apart: bool = False


@dataclass(frozen=True)
class OodReference:
    mean: "np.ndarray"  # [D]
    projection: "np.ndarray"  # [k, D]: PCA basis followed by within-class whitening
    centres: "np.ndarray"  # [C, k] class centres in the whitened space (cell classes and reject centres)
    classes: tuple[str, ...]
    threshold: float  # cell score above which a crop is unclassified
    embedding_output: str
    reject_margin: float = float("inf")  # (nearest class distance - nearest reject distance) above this: unclassified
    scales: "np.ndarray | None" = None  # [C] typical distance per class (1 for reject centres); None = all 1
    basis: "np.ndarray | None" = None  # [k, D] PCA basis (kept for analysis only, not stored)
    shift: ShiftReference | None = None
    info: Mapping[str, Any] = field(default_factory=dict)  # how it was fitted and measured, for audit
    colour: "ColourEnvelope | None" = None  # stain-colour envelope (batchwbc.engine.stain_colour); None: no colour check
    junk: "JunkRule | None" = None  # not-a-cell rule (batchwbc.engine.junk_rule); None: the reject centres alone

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def describe(self) -> str:
        rej = sum(c.startswith(REJECT_PREFIX) for c in self.classes)
        text = (f"Mahalanobis to the nearest of {len(self.classes) - rej} classes, PCA {self.projection.shape[0]} "
                f"of {self.dim}, {rej} reject centre{'s' if rej != 1 else ''}")
        if self.junk is not None:
            text += ", a linear not-a-cell rule"
        if self.colour is not None:
            added = len(self.colour.info.get("added_groups") or ())  # labs' cells added by adapt
            n = len(self.colour.groups) - added
            text += f"; stain-colour envelope of {n} training source{'s' if n != 1 else ''}"
            if added:
                text += f" and {added} adapted lab{'s' if added != 1 else ''}"
        return text


# ----------------------------------------------------------------------------- fitting (export side)

def fit_reference(emb: "np.ndarray", labels: Sequence[str], k: int = 32, shrinkage: float = 1e-3,
                  embedding_output: str = "embedding") -> OodReference:
    """Fit mu, the PCA basis, the class centres and the shared covariance on training embeddings.

    Shrinkage adds `shrinkage` x the mean variance to the covariance's diagonal: ReLU
    embeddings have dimensions that are almost always zero, which would make it singular.
    The threshold is left at +inf; export.ood_reference sets it from held-out cells.
    """
    import numpy as np

    x = np.asarray(emb, dtype=np.float64)
    labels = list(labels)
    classes = tuple(sorted(set(labels)))
    if x.ndim != 2 or len(x) != len(labels) or len(classes) < 1:
        raise ValueError("need an [N, D] embedding array with one label per row")
    k = int(min(k, x.shape[1], len(x) - 1))
    mean = x.mean(axis=0)
    xc = x - mean
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    basis = vt[:k]  # [k, D]
    z = xc @ basis.T
    lab = np.array(labels)
    centres = np.stack([z[lab == c].mean(axis=0) for c in classes])
    resid = z - centres[np.searchsorted(np.array(classes), lab)]
    cov = resid.T @ resid / max(1, len(z) - len(classes))
    cov += shrinkage * np.trace(cov) / k * np.eye(k)
    w, u = np.linalg.eigh(cov)
    whiten = u @ np.diag(1.0 / np.sqrt(w)) @ u.T  # symmetric S^-1/2
    return OodReference(
        mean=mean.astype(np.float32), projection=(whiten @ basis).astype(np.float32),
        centres=(centres @ whiten.T).astype(np.float32), classes=classes, threshold=float("inf"),
        embedding_output=embedding_output, basis=basis,
    )


# ----------------------------------------------------------------------------- scoring (runtime)

def whiten(ref: OodReference, emb: "np.ndarray") -> "np.ndarray":
    """The embedding rows in the reference's whitened PCA space, z = P (e - mu) ([N, k])."""
    import numpy as np

    return (np.asarray(emb, dtype=np.float32) - ref.mean) @ ref.projection.T


def distances(ref: OodReference, emb: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Per embedding row: (OOD score = smallest scaled distance to a cell class, raw squared
    Mahalanobis distance to the nearest cell class, to the nearest reject centre; +inf where
    there is none)."""
    return _distances_of(ref, whiten(ref, emb))


def _distances_of(ref: OodReference, z: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    import numpy as np

    d = (z * z).sum(axis=1, keepdims=True) - 2.0 * z @ ref.centres.T + (ref.centres * ref.centres).sum(axis=1)
    d = np.maximum(d, 0.0).astype(np.float64)
    reject = np.array([c.startswith(REJECT_PREFIX) for c in ref.classes])
    scales = np.ones(len(ref.classes)) if ref.scales is None else np.asarray(ref.scales, dtype=np.float64)
    inf = np.full(len(d), np.inf)
    if not (~reject).any():
        return inf, inf, d.min(axis=1) if reject.any() else inf
    known = d[:, ~reject]
    rejected = d[:, reject].min(axis=1) if reject.any() else inf
    return (known / scales[~reject]).min(axis=1), known.min(axis=1), rejected


def mahalanobis(ref: OodReference, emb: "np.ndarray") -> "np.ndarray":
    """Squared Mahalanobis distance of each embedding row to its nearest cell-class centre."""
    return distances(ref, emb)[1]


def score_and_flag(ref: OodReference, emb: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """(OOD score per crop, unclassified yes/no per crop). Higher scores are less like the
    training cells; a non-finite embedding scores +inf and is unclassified, so it is never
    mistaken for a known cell."""
    import numpy as np

    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != ref.dim:
        raise ValueError(f"embedding has shape {emb.shape}; the OOD reference needs [N, {ref.dim}]")
    finite = np.all(np.isfinite(emb), axis=1)
    z = whiten(ref, np.where(finite[:, None], emb, 0.0))
    score, known, rejected = _distances_of(ref, z)
    score[~finite] = np.inf
    with np.errstate(invalid="ignore"):
        nearer_reject = (known - rejected) > ref.reject_margin
    flagged = (score > ref.threshold) | nearer_reject | ~finite
    if ref.junk is not None:
        from batchwbc.engine import junk_rule

        flagged |= junk_rule.flags(ref.junk, z)
    return score, flagged


def score(ref: OodReference, emb: "np.ndarray") -> "np.ndarray":
    """The OOD score per crop (see score_and_flag)."""
    return score_and_flag(ref, emb)[0]


def verdicts(ref: OodReference, emb: "np.ndarray", images: "np.ndarray") -> tuple["np.ndarray", "np.ndarray"]:
    """(OOD score per crop, verdict per crop): the verdict is 0 for a crop that is classified,
    else BY_EMBEDDING and/or BY_COLOUR. `images` are the model inputs ([N, S, S, 3] uint8 RGB),
    read only when the reference carries a colour envelope."""
    colour = None
    if ref.colour is not None:
        from batchwbc.engine import stain_colour

        if len(images) != len(emb):
            raise ValueError(f"{len(images)} images for {len(emb)} embeddings")
        colour = stain_colour.colour_statistics(images)
    return verdicts_from_colour(ref, emb, colour)


def verdicts_from_colour(ref: OodReference, emb: "np.ndarray", colour: "np.ndarray | None") -> tuple["np.ndarray", "np.ndarray"]:
    """verdicts for crops whose stain-colour statistics ([N, 2], stain_colour.colour_statistics
    of the model inputs) are already at hand, as `embed_files` returns them; `colour` is read
    only when the reference carries a colour envelope (pure)."""
    import numpy as np

    scores, flagged = score_and_flag(ref, emb)
    codes = np.where(flagged, BY_EMBEDDING, 0).astype(np.int64)
    if ref.colour is not None:
        from batchwbc.engine import stain_colour

        if colour is None or len(colour) != len(codes):
            raise ValueError(f"colour statistics for {0 if colour is None else len(colour)} crops, {len(codes)} embeddings")
        codes |= np.where(stain_colour.outside(ref.colour, colour), BY_COLOUR, 0)
    return scores, codes


def reasons(verdict: int) -> list[str]:
    """The review reasons of an unclassified crop's verdict (empty for 0). A bare True from an
    older caller means BY_EMBEDDING."""
    v = int(verdict)
    return [r for bit, r in ((BY_EMBEDDING, UNCLASSIFIED_REASON), (BY_COLOUR, COLOUR_REASON)) if v & bit]


# ----------------------------------------------------------------------------- metadata

_DTYPES = {"float32": "<f4", "float16": "<f2"}


def _pack(a: "np.ndarray", dtype: str = "float32") -> dict:
    """float16 halves the biggest array (the [k, D] projection); its 3 significant digits
    move distances by far less than the gap between cells and rejected crops."""
    import numpy as np

    a = np.ascontiguousarray(a, dtype=_DTYPES[dtype])
    return {"dtype": dtype, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _fits_float16(a: "np.ndarray") -> bool:
    """float16 only where it stays finite and keeps small entries (a degenerate covariance
    can make the whitening huge or tiny)."""
    import numpy as np

    big = float(np.abs(a).max(initial=0.0))
    return big < 6e4 and np.isfinite(a.astype(np.float16)).all()


def _unpack(d: Any, name: str) -> "np.ndarray":
    import numpy as np

    try:
        a = np.frombuffer(base64.b64decode(d["base64"], validate=True), dtype=_DTYPES[d["dtype"]]).reshape(d["shape"])
    except Exception:  # noqa: BLE001 - any malformed entry is one sentence for the user
        raise OodReferenceError(f"the model's {KEY_OOD} metadata has an unreadable {name!r} array.") from None
    if not np.all(np.isfinite(a)):
        raise OodReferenceError(f"the model's {KEY_OOD} metadata has non-finite values in {name!r}.")
    return a.astype(np.float32)


def to_metadata(ref: OodReference) -> str:
    """The JSON stored under KEY_OOD (arrays as base64 little-endian float32: compact and exact)."""
    import math

    import numpy as np

    if not math.isfinite(ref.threshold):
        raise ValueError("set the reference's threshold before storing it")
    fmt = FORMAT_WITH_JUNK_RULE if ref.junk is not None else FORMAT if ref.colour is None else FORMAT_WITH_COLOUR
    body: dict[str, Any] = {
        "format": fmt,
        "score": SCORE_NAME,
        "embedding_output": ref.embedding_output,
        "classes": list(ref.classes),
        "threshold": ref.threshold,
        "reject_margin": ref.reject_margin if math.isfinite(ref.reject_margin) else None,
        "mean": _pack(ref.mean),
        "projection": _pack(ref.projection, "float16" if _fits_float16(ref.projection) else "float32"),
        "centres": _pack(ref.centres),
        "scales": _pack(ref.scales if ref.scales is not None else np.ones(len(ref.classes))),
        "info": dict(ref.info),
    }
    if ref.shift is not None:
        body["data_shift"] = {
            "threshold": ref.shift.threshold, "cell_quantile": ref.shift.cell_quantile,
            "cell_cut": ref.shift.cell_cut, "min_cells": ref.shift.min_cells, "info": dict(ref.shift.info),
        }
        if ref.shift.counts_set_apart:  # written only when set, so older files read back byte-identical
            body["data_shift"]["counts_set_apart"] = True
    if ref.colour is not None:
        body["stain_colour"] = _colour_body(ref.colour)
    if ref.junk is not None:
        body["junk_rule"] = _junk_body(ref.junk, ref.projection.shape[0])
    return json.dumps(body, separators=(",", ":"))


def _junk_body(rule: "JunkRule", k: int) -> dict:
    """The not-a-cell rule as stored: k weights, a bias and a threshold."""
    import math

    if not (math.isfinite(rule.threshold) and math.isfinite(rule.bias)) or len(rule.weights) != k:
        raise ValueError(f"the not-a-cell rule needs {k} weights and a finite bias and threshold before it is stored")
    return {"weights": _pack(rule.weights), "bias": rule.bias, "threshold": rule.threshold, "info": dict(rule.info)}


def _junk_from_body(body: Any, k: int) -> "JunkRule":
    """The stored not-a-cell rule, or OodReferenceError in one sentence (a damaged entry must
    refuse the model, not drop the rule)."""
    import math

    from batchwbc.engine.junk_rule import JunkRule

    bad = OodReferenceError(f"the model's {KEY_OOD} metadata has an unreadable junk_rule.")
    if not isinstance(body, dict):
        raise bad
    try:
        bias, threshold, info = float(body["bias"]), float(body["threshold"]), dict(body.get("info") or {})
    except Exception:  # noqa: BLE001
        raise bad from None
    weights = _unpack(body.get("weights"), "junk_rule weights")
    if weights.shape != (k,) or not (math.isfinite(bias) and math.isfinite(threshold)):
        raise bad
    return JunkRule(weights, bias, threshold, info)


def _colour_body(env: "ColourEnvelope") -> dict:
    """The envelope as stored: a few hundred bytes (G x 2 centres, G x 2 x 2 whitening)."""
    import math

    from batchwbc.engine.stain_colour import STATISTIC

    if not math.isfinite(env.threshold):
        raise ValueError("set the colour envelope's threshold before storing it")
    return {"statistic": STATISTIC, "groups": list(env.groups), "threshold": env.threshold,
            "centres": _pack(env.centres), "whitening": _pack(env.whitening), "info": dict(env.info)}


def _colour_from_body(body: Any) -> "ColourEnvelope":
    """The stored envelope, or OodReferenceError in one sentence (a model must not lose its
    colour check to a damaged entry, nor run it with nonsense)."""
    import math

    from batchwbc.engine.stain_colour import STATISTIC, ColourEnvelope

    bad = OodReferenceError(f"the model's {KEY_OOD} metadata has an unreadable stain_colour envelope.")
    if not isinstance(body, dict):
        raise bad
    if body.get("statistic") != STATISTIC:
        raise OodReferenceError(f"the model's {KEY_OOD} metadata has a stain_colour envelope of a kind this "
                                f"batchwbc does not read ({body.get('statistic')!r}).")
    try:
        groups = tuple(str(g) for g in body["groups"])
        threshold = float(body["threshold"])
        info = dict(body.get("info") or {})
    except Exception:  # noqa: BLE001
        raise bad from None
    centres, whitening = (_unpack(body.get(n), f"stain_colour {n}") for n in ("centres", "whitening"))
    g = len(groups)
    if not (g >= 1 and centres.shape == (g, 2) and whitening.shape == (g, 2, 2)
            and math.isfinite(threshold) and threshold > 0):
        raise bad
    return ColourEnvelope(centres, whitening, groups, threshold, info)


def from_metadata(meta: Mapping[str, str]) -> OodReference | None:
    """The reference stored in a model's metadata, None when it has none; OodReferenceError when
    it is there but unusable (a model should not silently lose its safety check)."""
    import math

    raw = meta.get(KEY_OOD)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        if body.get("format") not in (FORMAT, FORMAT_WITH_COLOUR, FORMAT_WITH_JUNK_RULE) or body.get("score") != SCORE_NAME:
            raise OodReferenceError(f"the model's {KEY_OOD} metadata is of a kind this batchwbc does not read "
                                 f"({body.get('score')!r}, format {body.get('format')!r}).")
        threshold = float(body["threshold"])
        margin = float("inf") if body.get("reject_margin") is None else float(body["reject_margin"])
        out_name = str(body["embedding_output"])
        classes = tuple(str(c) for c in body["classes"])
        shift_body = body.get("data_shift")
        if (body["format"] == FORMAT_WITH_JUNK_RULE) != ("junk_rule" in body):
            raise OodReferenceError(f"the model's {KEY_OOD} metadata is format {body['format']} "
                                    f"{'without' if body['format'] == FORMAT_WITH_JUNK_RULE else 'with'} a junk_rule.")
        if body["format"] != FORMAT_WITH_JUNK_RULE and (body["format"] == FORMAT_WITH_COLOUR) != ("stain_colour" in body):
            raise OodReferenceError(f"the model's {KEY_OOD} metadata is format {body['format']} "
                                    f"{'without' if body['format'] == FORMAT_WITH_COLOUR else 'with'} a stain_colour envelope.")
    except OodReferenceError:
        raise
    except Exception:  # noqa: BLE001
        raise OodReferenceError(f"the model's {KEY_OOD} metadata is not valid JSON with a threshold.") from None
    mean, proj, centres, scales = (_unpack(body.get(n), n) for n in ("mean", "projection", "centres", "scales"))
    if not (mean.ndim == 1 and proj.ndim == 2 and centres.ndim == 2 and proj.shape[1] == mean.shape[0]
            and centres.shape[1] == proj.shape[0] and len(classes) == centres.shape[0] == len(scales)
            and scales.ndim == 1 and (scales > 0).all() and math.isfinite(threshold)):
        raise OodReferenceError(f"the model's {KEY_OOD} metadata has arrays of inconsistent shapes.")
    shift = None
    if shift_body is not None:
        try:
            counts = shift_body.get("counts_set_apart", False)
            if not isinstance(counts, bool):
                raise ValueError("counts_set_apart is not true or false")
            shift = ShiftReference(float(shift_body["threshold"]), float(shift_body["cell_quantile"]),
                                   float(shift_body["cell_cut"]), int(shift_body["min_cells"]), shift_body.get("info", {}),
                                   counts_set_apart=counts)
        except Exception:  # noqa: BLE001
            raise OodReferenceError(f"the model's {KEY_OOD} metadata has an unreadable data_shift entry.") from None
    if math.isnan(margin):
        raise OodReferenceError(f"the model's {KEY_OOD} metadata has an invalid reject_margin.")
    colour = _colour_from_body(body["stain_colour"]) if "stain_colour" in body else None
    junk = _junk_from_body(body["junk_rule"], proj.shape[0]) if "junk_rule" in body else None
    return OodReference(mean, proj, centres, classes, threshold, out_name, margin, scales, shift=shift,
                        info=body.get("info", {}), colour=colour, junk=junk)
