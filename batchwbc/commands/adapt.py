"""`batchwbc adapt`: fit a model's last layer to a lab's own verified cells, on the lab PC.

Steps: read LABELLED/<class>/[<patient>/]crop (batchwbc.inputs.labelled_folders), decode every crop with
the model's own contract and run the model once for probabilities and embeddings
(batchwbc.engine.embed), refit the head and its calibration (batchwbc.adaptation.head_fit), compare with the
original model on a patient-grouped cross-validation, re-derive the OOD / DATA_SHIFT
thresholds from the lab's cells where the model has a reference (batchwbc.adaptation.thresholds), widen
its stain-colour envelope by the lab's cells where it has one (batchwbc.adaptation.colour), and write
a new self-describing model (batchwbc.engine.onnx_graph) only when it is not worse there. This module computes and
writes; the CLI formats.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.model import Classifier
    from batchwbc.engine.ood import OodReference

log = logging.getLogger(__name__)

#: Metadata key of the adapted model's provenance (JSON).
from batchwbc.engine.model_metadata import ADAPTED_VERSION_MARKER, KEY_ADAPTATION  # noqa: E402 - re-exported
from batchwbc.ops.exit_codes import USAGE, CommandError  # noqa: E402
#: Below this many usable cells a cross-validated comparison means nothing.
MIN_CELLS = 10


class AdaptError(CommandError):
    """Adaptation cannot start (bad folder, unusable model); str is one sentence. Exit code 2."""

    exit_code = USAGE


@dataclass
class HeadFit:
    """A refitted head and the evidence for it (pure numbers; see adapt_head)."""

    weight: "np.ndarray"  # [D, K], logits = embedding @ weight + bias, probs = softmax(logits / T)
    bias: "np.ndarray"
    temperature: float
    review_threshold: float
    alpha: float  # prior strength of the final fit
    cv_scheme: str
    before: dict  # Scores.as_dict() of the original model on every cell
    after: dict  # ... of the adapted head, out of fold
    review_share_pct: float  # % of the lab's cells (out of fold) below the threshold
    fold_alphas: list[float] = field(default_factory=list)

    @property
    def worse(self) -> bool:
        """Worse than the original on the cross-validation: a lower mean of accuracy and macro-F1.

        One composite, not "either lower": on 50-cell folds one of the two often dips by noise
        while the other gains a lot (benchmarks/adapt_curve.py), and macro-F1 guards the rare
        classes that accuracy alone would let a fit trade away."""
        return (self.after["accuracy"] + self.after["macro_f1"]) < (self.before["accuracy"] + self.before["macro_f1"])


def adapt_head(x: "np.ndarray", y: "np.ndarray", groups: Sequence[str | None] | None, probs_before: "np.ndarray",
               w0: "np.ndarray", b0: "np.ndarray", t0: float, seed: int = 0) -> HeadFit:
    """Refit the head on embeddings x with labels y (class indices); pure computation."""
    import numpy as np

    from batchwbc.adaptation import head_fit as hf
    from batchwbc.core.calibration import review_share_pct

    v0, c0 = w0 / t0, b0 / t0  # tempered space: no data = the original probabilities
    folds, scheme = hf.fold_ids(y, groups, k=5, seed=seed)
    oof, fold_alphas = hf.cross_validated_logits(x, y, groups, v0, c0, folds)
    temperature = hf.fit_temperature(oof, y)
    oof_probs = hf.softmax(oof, temperature)
    threshold = hf.review_threshold(oof_probs, y)
    alpha = hf.choose_alpha(x, y, groups, v0, c0, seed=seed)
    v, c = hf.fit_head(x, y, v0, c0, alpha)
    return HeadFit(
        weight=v, bias=c, temperature=temperature, review_threshold=threshold, alpha=alpha, cv_scheme=scheme,
        before=hf.scores(y, np.asarray(probs_before).argmax(axis=1)).as_dict(),
        after=hf.scores(y, oof.argmax(axis=1)).as_dict(), fold_alphas=fold_alphas,
        review_share_pct=review_share_pct(oof_probs, threshold),
    )


def file_list_sha256(root: Path, paths: Sequence[Path]) -> str:
    """SHA-256 of the sorted relative paths (class/patient/file, '/'-separated, one a line):
    names exactly which labelled files (and labels) a model was adapted on."""
    rel = sorted(Path(p).relative_to(root).as_posix() for p in paths)
    return hashlib.sha256("\n".join(rel).encode("utf-8")).hexdigest()


@dataclass
class AdaptResult:
    fit: HeadFit
    counts: dict[str, int]  # class -> cells used
    unreadable: list[tuple[str, str]]  # (file, reason)
    unknown_folders: dict[str, int]
    patients: int
    model_version: str
    written: bool
    ood_rederived: dict | None = None  # adaptref provenance; None when the parent has no OOD reference
    colour_rederived: dict | None = None  # stain-colour envelope provenance; None when the parent has no envelope


def run_adapt(labelled: Path, out: Path, model_path: Path | None = None, force: bool = False, workers: int = 0,
              seed: int = 0) -> AdaptResult:
    """Read, embed, fit, compare, and write `out` unless the fit is worse (and not forced)."""
    import numpy as np
    import onnx

    from batchwbc.engine.embed import embed_files
    from batchwbc.inputs.labelled_folders import LabelledError, read_labelled
    from batchwbc.engine.model import DEFAULT_MODEL_PATH, Classifier, ModelError
    from batchwbc.engine.model_metadata import KEY_MODEL_VERSION, KEY_REVIEW_SHARE, KEY_REVIEW_THRESHOLD, KEY_TEMPERATURE, KEY_TEST_METRICS
    from batchwbc.engine.onnx_graph import GraphError, head_parameters, replace_head

    path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
    try:
        clf = Classifier(path, threads=max(1, (os.cpu_count() or 1) // 2))
    except ModelError as exc:
        raise AdaptError(str(exc)) from None
    info = clf.info
    if clf.embedding_output is None:
        raise AdaptError(f"{path.name} has no embedding output, which adapt needs; add it with "
                         f"`python -m export.embedding {path} --out NEW.onnx` and adapt NEW.onnx.")
    try:
        proto = onnx.load(str(path))
        w0, b0, t0 = head_parameters(proto)
    except GraphError as exc:
        raise AdaptError(f"{path.name}: {exc}") from None
    try:
        found = read_labelled(labelled, info.classes)
    except LabelledError as exc:
        raise AdaptError(str(exc)) from None
    for name, n in sorted(found.unknown_folders.items()):
        log.warning("folder %s is not a class of the model (%d images skipped); the model's classes: %s.",
                    name, n, ", ".join(info.classes))
    _check_enough(found.class_counts(), labelled)

    log.info("decoding %d labelled crops with the model's contract (%s)", len(found.items), info.preprocessing)
    got = embed_files(clf, [str(it.path) for it in found.items], workers=workers)
    unreadable = [(str(found.items[i].path), reason) for i, reason in got.errors]
    for file, reason in unreadable:
        log.warning("skipped %s: %s", file, reason)
    items = [found.items[i] for i in got.ok]
    from collections import Counter

    counts = Counter(it.class_id for it in items)
    _check_enough(counts, labelled)
    y = np.array([info.classes.index(it.class_id) for it in items])
    groups = [it.patient for it in items]
    log.info("fitting the last layer on %d cells of %d classes", len(y), len(counts))
    fit = adapt_head(got.embeddings.astype(np.float64), y, groups, got.probs, w0, b0, t0, seed=seed)

    file_sha = file_list_sha256(labelled, [it.path for it in items])
    now = datetime.now(timezone.utc)
    version = f"{info.model_version}{ADAPTED_VERSION_MARKER}{now:%Y%m%d}-{file_sha[:8]}"
    result = AdaptResult(fit=fit, counts=dict(sorted(counts.items())), unreadable=unreadable,
                         unknown_folders=dict(found.unknown_folders), patients=len({g for g in groups if g}),
                         model_version=version, written=False)
    if fit.worse and not force:
        return result
    provenance = {
        "parent_model_version": info.model_version,
        "parent_sha256": info.sha256,
        "date": now.isoformat(timespec="seconds"),
        "labelled_folder": Path(labelled).resolve().name,
        "counts_per_class": result.counts,
        "patients": result.patients,
        "files_sha256": file_sha,
        "unreadable_skipped": len(unreadable),
        "cross_validation": {"scheme": fit.cv_scheme, "before": fit.before, "after": fit.after},
        "prior_strength": fit.alpha,
        "forced_although_worse": bool(fit.worse),
        "parent_test_metrics": info.json_field(KEY_TEST_METRICS),
    }
    if clf.ood is not None:
        # The embedding is unchanged, so the parent's centres stay; the lab's verified cells
        # are now validated data, so the thresholds are re-derived from them (adaptref).
        from batchwbc.adaptation.thresholds import PROVENANCE_KEY, rederive
        from batchwbc.engine.ood import KEY_OOD, to_metadata

        junk = _lab_junk(clf, [str(it.path) for it in items], workers, seed) if clf.ood.junk is not None else None
        again = rederive(clf.ood, got.embeddings, groups, seed=seed, junk=junk)
        provenance[PROVENANCE_KEY] = result.ood_rederived = again.provenance
        reference = _with_lab_colour(again.reference, got.colour, provenance["labelled_folder"], provenance, result)
    meta = {
        KEY_MODEL_VERSION: version,
        KEY_TEMPERATURE: f"{fit.temperature:.6f}",
        KEY_REVIEW_THRESHOLD: f"{fit.review_threshold:.2f}",
        KEY_REVIEW_SHARE: f"{fit.review_share_pct:.1f}",
        KEY_TEST_METRICS: json.dumps({"source": "cross-validation on the lab's labelled cells (batchwbc adapt)",
                                      **fit.after}),
        KEY_ADAPTATION: json.dumps(provenance),
    }
    if clf.ood is not None:
        meta[KEY_OOD] = to_metadata(reference)
    # The new head is stored in tempered form: logits = e @ V + c, probs = softmax(logits / T').
    new = replace_head(proto, fit.weight, fit.bias, fit.temperature, meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        onnx.save(new, str(tmp))
        Classifier(tmp, threads=1)  # the file must load as any other batchwbc model
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    result.written = True
    return result


#: Lab crops that junk is cut from for the guard check of rederive: one background corner and one
#: synthetic non-cell each (about 1 s of embedding for Lite0 on 2 cores).
JUNK_DONORS = 100


def _lab_junk(clf: "Classifier", paths: list[str], workers: int, seed: int) -> "np.ndarray":
    """Embeddings of background corners and non-cells cut from a seeded sample of the lab's crops,
    as the export cuts its reject crops (batchwbc.engine.junk_crops)."""
    import numpy as np

    from batchwbc.engine.embed import embed_files
    from batchwbc.engine.junk_crops import decode_background_corner, decode_not_a_cell

    donors = [paths[i] for i in np.random.default_rng(seed + 17).permutation(len(paths))[:JUNK_DONORS]]
    log.info("checking the out-of-distribution guard on %d junk crops cut from the lab's crops", 2 * len(donors))
    parts = [embed_files(clf, donors, workers=workers, decode=d).embeddings for d in (decode_background_corner, decode_not_a_cell)]
    return np.concatenate(parts)


def _with_lab_colour(reference: "OodReference", colour: "np.ndarray", lab_name: str, provenance: dict,
                     result: AdaptResult) -> "OodReference":
    """`reference` with its stain-colour envelope widened by the lab's cells (batchwbc.adaptation.colour);
    records the provenance in `provenance` and `result`, and logs one line when the parent's is kept."""
    import dataclasses

    from batchwbc.adaptation.colour import PROVENANCE_KEY, rederive_colour

    got = rederive_colour(reference.colour, colour, lab_name)
    if got.provenance is None:  # the parent has no envelope: none is made up
        return reference
    if got.kept_because:
        log.warning("%s.", got.kept_because)
    provenance[PROVENANCE_KEY] = result.colour_rederived = got.provenance
    return dataclasses.replace(reference, colour=got.envelope)


def next_step(out: Path) -> str:
    """What to do with the adapted model before a lab relies on it: its cross-validation was
    on the cells it was fitted to, so check it on verified cells of other patients (after an
    adaptation DATA_SHIFT vanished while a third of the crops stayed unclassified: only an
    evaluation on unseen patients shows that). The command is printed ready to paste."""
    import shlex

    model = shlex.quote(str(out))
    return ("next: check the adapted model on verified cells of patients it was not fitted on, before using it: "
            f"batchwbc evaluate OTHER_PATIENTS_LABELLED --model {model} --out EVAL-adapted.xlsx")


def _check_enough(counts, labelled: Path) -> None:
    total = sum(counts.values())
    if total == 0:
        raise AdaptError(f"{labelled} holds no readable crops in folders named after the model's classes.")
    if len(counts) < 2:
        (only,) = counts
        raise AdaptError(f"{labelled} holds cells of one class only ({only}); adapting needs at least two classes.")
    if total < MIN_CELLS:
        raise AdaptError(f"{labelled} holds only {total} usable cells; adapting needs at least {MIN_CELLS}.")
