"""How well a model agrees with a lab's verified cells: the numbers `batchwbc evaluate` reports.

Pure functions over label lists, numpy only, no I/O, so every number can be checked by hand
in a test and the workbook / JSON writers only format what is computed here.

Conventions (the same as the training side's metrics, so evaluating the bundled model on its
own test split reproduces the model card):

* Per-class precision, recall and F1 with 0 where a ratio has no denominator (scikit-learn's
  ``zero_division=0``).
* What a run reports: a crop the model does not recognise (ood.UNCLASSIFIED) is an
  *abstention*, in no count of the report. So the primary numbers judge the run's answer:
  coverage (share of cells classified), accuracy over the classified cells, and accuracy (and
  per-class recall) with abstentions counted as misses; the confusion matrix has an
  "unclassified" column. The classifier-only view, which scores an unclassified crop by the
  model's best guess, is kept apart and named so (`classifier`, `classifier_paper10`): once one
  patient read 44 machine blasts of 98 WBC there against 24 of 111 in the report.
* "All classes": accuracy over every evaluated cell; macro-F1 averaged over the classes the
  lab verified at least one cell of (a class nobody labelled has no recall to average).
* "Paper's ten" (catalogue.PAPER_CLASS_IDS): only cells whose *verified* class is one of the
  ten; a prediction outside them (e.g. platelet) counts as an error, and precision is
  computed among those cells - as train/evaluate.py and the published comparison do.
* Calibration (a property of the classifier): confidence = the top calibrated probability,
  judged against the model's best guess; equal-width bins, the first
  [0, 1/B] and the rest (lo, hi]; expected calibration error (ECE) = sum over bins of
  (cells in bin / all cells) x |accuracy - mean confidence| (Guo et al., ICML 2017). 15 bins
  as in train/calibration.py, so the ECE is comparable with the model card's.
* Review: a cell goes to review when its confidence is *below* the threshold, and an
  unclassified crop always does, as in a run.
* Per patient, the machine's and the verified differential over the same cells, each counted
  by the run's own function (differential.summarize, the Summary's code path: unclassified
  crops in no count, erythroblasts, platelets and smudge cells not in the WBC denominator), and per class the Bland-Altman bias and 95% limits of agreement of
  (machine - verified) across patients - the method comparison of CLSI H20-A2 (Bland &
  Altman, Lancet 1986).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from batchwbc.core import catalogue

if TYPE_CHECKING:  # numpy stays lazy: the CLI imports this module's users at start-up
    import numpy as np

#: 15 equal-width bins: the training side's choice (train/calibration.py), so ECEs compare.
DEFAULT_CALIBRATION_BINS = 15
#: Review thresholds tabulated: the useful range of a calibrated top-1 probability.
REVIEW_THRESHOLDS: tuple[float, ...] = tuple(round(0.30 + 0.05 * i, 2) for i in range(14)) + (0.97, 0.99)
#: Bland-Altman limits of agreement: bias +- 1.96 standard deviations of the differences.
LOA_Z = 1.96
NAN = float("nan")
_CONF_SLACK = 1e-4


class EvaluationError(Exception):
    """Inputs that cannot be evaluated; str is one sentence."""


@dataclass(frozen=True)
class ClassMetrics:
    class_id: str
    precision: float
    recall: float
    f1: float
    support: int  # verified cells of this class
    predicted: int  # cells the model called this class


@dataclass(frozen=True)
class Summary:
    """Accuracy and macro-F1 over one set of classes."""

    name: str
    classes: tuple[str, ...]  # the classes macro-F1 averages over
    n: int  # cells whose verified class is in the set
    accuracy: float  # nan when n == 0
    macro_f1: float  # nan when no class of the set was verified
    per_class: tuple[ClassMetrics, ...]


@dataclass(frozen=True)
class Coverage:
    """What share of the cells the run classifies, and how right it is, the way its report counts."""

    n: int  # cells evaluated
    classified: int  # given a class (not unclassified)
    unclassified: int  # abstentions: in no count of the report
    coverage: float  # classified / n (nan when n == 0)
    accuracy_classified: float  # right / classified (nan when nothing is classified)
    accuracy_with_abstentions: float  # right / n: an unclassified crop is a miss


@dataclass(frozen=True)
class ReliabilityBin:
    lo: float
    hi: float
    n: int
    confidence: float  # mean confidence of its cells (nan when empty)
    accuracy: float  # share of its cells predicted right (nan when empty)


@dataclass(frozen=True)
class Calibration:
    ece: float
    bins: tuple[ReliabilityBin, ...]


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    to_review: int  # cells with confidence < threshold
    share_to_review: float
    accepted: int
    accuracy_accepted: float  # nan when nothing is accepted
    errors_to_review: float  # share of all wrong answers that the review catches (nan: no errors)


@dataclass(frozen=True)
class PatientClassRow:
    class_id: str
    verified: int
    verified_pct: float  # % of the verified WBC (nan when it is 0)
    machine: int
    machine_pct: float  # % of the machine's WBC, counted as the run counts (nan when it is 0)

    @property
    def difference(self) -> float:
        """machine - verified, in percentage points."""
        return self.machine_pct - self.verified_pct


@dataclass(frozen=True)
class PatientComparison:
    patient: str
    cells: int
    verified_wbc: int
    machine_wbc: int
    rows: tuple[PatientClassRow, ...]
    machine_unclassified: int = 0  # crops the run leaves unclassified: in no count, as in the report


@dataclass(frozen=True)
class BlandAltman:
    class_id: str
    n: int  # patients with both differentials defined
    bias: float  # mean of machine - verified (percentage points)
    sd: float  # standard deviation of the differences (n - 1); nan below 2 patients
    lower: float  # bias - 1.96 sd
    upper: float  # bias + 1.96 sd
    means: tuple[float, ...]  # per patient (machine + verified) / 2, for the plot
    differences: tuple[float, ...]  # per patient machine - verified


@dataclass(frozen=True)
class Evaluation:
    classes: tuple[str, ...]  # the model's classes: rows of `confusion`, and its columns but the last
    confusion: "np.ndarray"  # [true, run's answer] counts; the last column is "unclassified"
    overall: Summary  # the run's answers: an unclassified crop is a miss
    paper10: Summary
    coverage: Coverage
    classifier: Summary  # classifier only: an unclassified crop scored by the model's best guess
    classifier_paper10: Summary
    calibration: Calibration
    thresholds: tuple[ThresholdRow, ...]
    model_threshold: float | None
    patients: tuple[PatientComparison, ...]
    bland_altman: tuple[BlandAltman, ...]
    cells_without_patient: int

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def columns(self) -> tuple[str, ...]:
        """The confusion matrix's columns: the model's classes, then unclassified."""
        from batchwbc.engine.ood import UNCLASSIFIED

        return (*self.classes, UNCLASSIFIED)


# ------------------------------------------------------------------ confusion and F1

def confusion_matrix(true_idx: Sequence[int], pred_idx: Sequence[int], k: int, columns: int | None = None) -> "np.ndarray":
    """k x columns counts (columns defaults to k), rows = verified class, columns = predicted class."""
    import numpy as np

    cols = k if columns is None else columns
    t = np.asarray(true_idx, dtype=np.int64)
    p = np.asarray(pred_idx, dtype=np.int64)
    if t.shape != p.shape:
        raise EvaluationError("verified and predicted labels differ in number.")
    if t.size and (min(t.min(), p.min()) < 0 or t.max() >= k or p.max() >= cols):
        raise EvaluationError("a label index lies outside the class list.")
    cm = np.zeros((k, cols), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def summarize(cm: "np.ndarray", classes: Sequence[str], subset: Sequence[str], name: str) -> Summary:
    """Accuracy, per-class metrics and macro-F1 over the cells whose verified class is in
    `subset` (every column stays: a prediction outside the subset is an error)."""
    import numpy as np

    idx = [classes.index(c) for c in subset if c in classes]
    rows = cm[idx, :] if idx else np.zeros((0, cm.shape[1]), dtype=np.int64)
    n = int(rows.sum())
    per = []
    for j, i in enumerate(idx):
        tp = int(cm[i, i])
        support = int(rows[j].sum())
        predicted = int(rows[:, i].sum())
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * p * r, p + r)
        per.append(ClassMetrics(classes[i], p, r, f1, support, predicted))
    present = tuple(m.class_id for m in per if m.support > 0)
    accuracy = _ratio(sum(int(cm[i, i]) for i in idx), n) if n else NAN
    macro = float(np.mean([m.f1 for m in per if m.support > 0])) if present else NAN
    return Summary(name, present, n, accuracy, macro, tuple(per))


# ------------------------------------------------------------------ calibration and review

def reliability(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = DEFAULT_CALIBRATION_BINS) -> Calibration:
    """Reliability table and ECE over equal-width confidence bins (see the module docstring)."""
    import numpy as np

    if n_bins < 1:
        raise EvaluationError("calibration needs at least one bin.")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; confidences <= edges[1] (0 included) go to bin 0
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        mc = float(conf[m].mean()) if n else NAN
        acc = float(ok[m].mean()) if n else NAN
        if n:
            ece += n / conf.size * abs(acc - mc)
        bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), n, mc, acc))
    return Calibration(float(ece) if conf.size else NAN, tuple(bins))


def review_tradeoff(confidence: Sequence[float], correct: Sequence[bool],
                    thresholds: Sequence[float] = REVIEW_THRESHOLDS,
                    always: Sequence[bool] | None = None) -> tuple[ThresholdRow, ...]:
    """For each threshold: how many cells a person must look at, and how right the rest are.
    `always` marks cells a run sends to review whatever their confidence (unclassified crops)."""
    import numpy as np

    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    forced = np.zeros(conf.shape, dtype=bool) if always is None else np.asarray(always, dtype=bool)
    n, n_err = conf.size, int((~ok).sum())
    out = []
    for t in sorted(set(float(x) for x in thresholds)):
        review = (conf < t) | forced
        k = int(review.sum())
        accepted = ~review
        out.append(ThresholdRow(
            threshold=t,
            to_review=k,
            share_to_review=_ratio(k, n) if n else NAN,
            accepted=n - k,
            accuracy_accepted=float(ok[accepted].mean()) if n - k else NAN,
            errors_to_review=_ratio(int((review & ~ok).sum()), n_err) if n_err else NAN,
        ))
    return tuple(out)


# ------------------------------------------------------------------ per patient, Bland-Altman

def _pct(count: int, denominator: int) -> float:
    return 100.0 * count / denominator if denominator else NAN


def patient_comparisons(true_ids: Sequence[str], pred_ids: Sequence[str], patients: Sequence[str | None],
                        classes: Sequence[str]) -> tuple[PatientComparison, ...]:
    """Machine vs verified differential for each patient (cells without a patient are left out),
    over the model's WBC classes, in order of first appearance. Both sides are counted by
    differential.summarize, the function behind the report's Summary, so an unclassified crop
    (in `pred_ids`) is in no count here either and a patient's numbers are the report's."""
    from batchwbc.core.differential import summarize as count
    from batchwbc.core.records import CellResult

    wbc = [c for c in classes if catalogue.get(c).counts_in_wbc]
    groups: dict[str, tuple[list[CellResult], list[CellResult]]] = {}
    for t, p, who in zip(true_ids, pred_ids, patients):
        if who is None:
            continue
        v, m = groups.setdefault(who, ([], []))
        v.append(CellResult(who, "", t, 1.0, "", 0.0, False))
        m.append(CellResult(who, "", p, 1.0, "", 0.0, False))

    def pct(x: float | None) -> float:
        return NAN if x is None else x

    out = []
    for who, (v, m) in groups.items():
        dv, dm = count(v), count(m)
        rows = tuple(PatientClassRow(c, dv.counts[c], pct(dv.percent.get(c)), dm.counts[c], pct(dm.percent.get(c)))
                     for c in wbc)
        out.append(PatientComparison(who, len(v), dv.wbc, dm.wbc, rows, dm.unclassified))
    return tuple(out)


def bland_altman(verified: Sequence[float], machine: Sequence[float], class_id: str = "") -> BlandAltman:
    """Bias and 95% limits of agreement of machine - verified over paired values (nan pairs
    dropped); the standard deviation uses n - 1, as Bland and Altman do."""
    import numpy as np

    v = np.asarray(verified, dtype=np.float64)
    m = np.asarray(machine, dtype=np.float64)
    if v.shape != m.shape:
        raise EvaluationError("Bland-Altman needs the same number of verified and machine values.")
    keep = np.isfinite(v) & np.isfinite(m)
    v, m = v[keep], m[keep]
    d = m - v
    n = int(d.size)
    bias = float(d.mean()) if n else NAN
    sd = float(d.std(ddof=1)) if n >= 2 else NAN
    lower, upper = (bias - LOA_Z * sd, bias + LOA_Z * sd) if n >= 2 else (NAN, NAN)
    return BlandAltman(class_id, n, bias, sd, lower, upper, tuple(float(x) for x in (m + v) / 2), tuple(float(x) for x in d))


def bland_altman_by_class(comparisons: Sequence[PatientComparison]) -> tuple[BlandAltman, ...]:
    if not comparisons:
        return ()
    out = []
    for j, row in enumerate(comparisons[0].rows):
        v = [pc.rows[j].verified_pct for pc in comparisons]
        m = [pc.rows[j].machine_pct for pc in comparisons]
        out.append(bland_altman(v, m, row.class_id))
    return tuple(out)


# ------------------------------------------------------------------ everything at once

def coverage(true_ids: Sequence[str], pred_ids: Sequence[str]) -> Coverage:
    """Coverage and the two accuracies of the run's answers (pred_ids may be UNCLASSIFIED)."""
    from batchwbc.engine.ood import UNCLASSIFIED

    n = len(true_ids)
    classified = sum(1 for p in pred_ids if p != UNCLASSIFIED)
    right = sum(1 for t, p in zip(true_ids, pred_ids) if t == p)
    return Coverage(n, classified, n - classified, _ratio(classified, n) if n else NAN,
                    _ratio(right, classified) if classified else NAN, _ratio(right, n) if n else NAN)


def evaluate(true_ids: Sequence[str], pred_ids: Sequence[str], confidence: Sequence[float],
             patients: Sequence[str | None], classes: Sequence[str], model_threshold: float | None = None,
             n_bins: int = DEFAULT_CALIBRATION_BINS, guess_ids: Sequence[str] | None = None) -> Evaluation:
    """All of `batchwbc evaluate`'s numbers from per-cell verified class, the run's answer
    (a class, or ood.UNCLASSIFIED), confidence and patient (None: no patient folder).
    `guess_ids` is the model's best class for every cell (for an unclassified crop, the class
    it would have said), for the classifier-only view and the calibration; it defaults to
    `pred_ids`, which then may not hold UNCLASSIFIED."""
    from batchwbc.engine.ood import UNCLASSIFIED

    classes = tuple(classes)
    n = len(true_ids)
    guess_ids = pred_ids if guess_ids is None else guess_ids
    if not (len(pred_ids) == len(confidence) == len(patients) == len(guess_ids) == n):
        raise EvaluationError("the per-cell lists differ in length.")
    pos = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c in (*true_ids, *guess_ids) if c not in pos}
                     | {c for c in pred_ids if c not in pos and c != UNCLASSIFIED})
    if unknown:
        raise EvaluationError(f"labels outside the model's classes: {', '.join(unknown)}.")
    for x in confidence:
        # float32 softmax may land a hair above 1; nan fails every comparison and is refused
        if not (-_CONF_SLACK <= x <= 1.0 + _CONF_SLACK):
            raise EvaluationError("a confidence lies outside 0..1.")
    k = len(classes)
    true_idx = [pos[c] for c in true_ids]
    cm = confusion_matrix(true_idx, [pos.get(c, k) for c in pred_ids], k, k + 1)
    guess_cm = confusion_matrix(true_idx, [pos[c] for c in guess_ids], k)
    guess_right = [t == g for t, g in zip(true_ids, guess_ids)]
    run_right = [t == p for t, p in zip(true_ids, pred_ids)]
    thresholds = REVIEW_THRESHOLDS
    if model_threshold is not None and math.isfinite(model_threshold):
        thresholds = (*thresholds, float(model_threshold))
    comparisons = patient_comparisons(true_ids, pred_ids, patients, classes)
    return Evaluation(
        classes=classes,
        confusion=cm,
        overall=summarize(cm, classes, classes, "all classes"),
        paper10=summarize(cm, classes, catalogue.PAPER_CLASS_IDS, "paper's ten classes"),
        coverage=coverage(true_ids, pred_ids),
        classifier=summarize(guess_cm, classes, classes, "all classes, classifier only"),
        classifier_paper10=summarize(guess_cm, classes, catalogue.PAPER_CLASS_IDS, "paper's ten classes, classifier only"),
        calibration=reliability(confidence, guess_right, n_bins),
        thresholds=review_tradeoff(confidence, run_right, thresholds, [p == UNCLASSIFIED for p in pred_ids]),
        model_threshold=model_threshold,
        patients=comparisons,
        bland_altman=bland_altman_by_class(comparisons),
        cells_without_patient=sum(1 for p in patients if p is None),
    )
