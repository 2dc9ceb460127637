"""The numbers of `batchwbc evaluate`: hand-checkable cases, and scikit-learn as a second opinion."""
from __future__ import annotations

import math

import numpy as np
import pytest

from batchwbc.core import catalogue
from batchwbc.core.agreement import (
    EvaluationError, bland_altman, confusion_matrix, evaluate, patient_comparisons, reliability,
    review_tradeoff, summarize,
)

L, M, PLT = "lymphocyte", "monocyte", "platelet"


def test_two_by_two_by_hand():
    # verified L L L M M, predicted L L M M L -> [[2, 1], [1, 1]] (and no unclassified crop)
    ev = evaluate([L, L, L, M, M], [L, L, M, M, L], [0.9] * 5, [None] * 5, (L, M))
    assert ev.confusion.tolist() == [[2, 1, 0], [1, 1, 0]] and ev.columns == (L, M, "unclassified")
    lym, mono = ev.overall.per_class
    assert (lym.precision, lym.recall, lym.f1, lym.support, lym.predicted) == pytest.approx((2 / 3, 2 / 3, 2 / 3, 3, 3))
    assert (mono.precision, mono.recall, mono.f1, mono.support, mono.predicted) == pytest.approx((1 / 2, 1 / 2, 1 / 2, 2, 2))
    assert ev.overall.accuracy == pytest.approx(3 / 5)
    assert ev.overall.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ev.n == 5


def test_paper_ten_counts_only_cells_verified_as_one_of_the_ten():
    # a platelet called lymphocyte is no false positive among the paper's ten
    classes = (L, M, PLT)
    ev = evaluate([L, L, PLT, PLT], [L, M, L, PLT], [0.9] * 4, [None] * 4, classes)
    lym = ev.paper10.per_class[0]
    assert ev.paper10.n == 2 and ev.paper10.accuracy == pytest.approx(0.5)
    assert (lym.precision, lym.recall) == pytest.approx((1.0, 0.5))
    assert ev.paper10.classes == (L,)  # monocyte: nobody verified one, so no recall to average
    assert ev.paper10.macro_f1 == pytest.approx(2 / 3)
    # over all classes the platelet called lymphocyte does count against lymphocyte's precision
    assert ev.overall.per_class[0].precision == pytest.approx(0.5)
    assert ev.overall.accuracy == pytest.approx(0.5)
    assert ev.overall.classes == (L, PLT)


def test_a_class_predicted_but_never_verified_has_zero_precision_not_a_crash():
    ev = evaluate([L, L], [M, L], [0.5, 0.5], [None, None], (L, M))
    mono = ev.overall.per_class[1]
    assert (mono.precision, mono.recall, mono.f1, mono.support) == (0.0, 0.0, 0.0, 0)
    assert ev.overall.macro_f1 == pytest.approx(2 / 3)  # lymphocyte only: p 1, r 1/2


def test_agrees_with_scikit_learn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")  # the train extra installs it
    accuracy_score, f1_score = metrics.accuracy_score, metrics.f1_score
    precision_recall_fscore_support = metrics.precision_recall_fscore_support

    rng = np.random.default_rng(7)
    classes = catalogue.CLASS_IDS[:12]
    k = len(classes)
    t = rng.integers(0, k - 1, 700)  # the last class is never verified, only predicted
    p = np.where(rng.random(700) < 0.6, t, rng.integers(0, k, 700))
    ev = evaluate([classes[i] for i in t], [classes[i] for i in p], rng.random(700), [None] * 700, classes)
    pr, rc, f1, sup = precision_recall_fscore_support(t, p, labels=list(range(k)), zero_division=0)
    got = ev.overall.per_class
    assert [m.precision for m in got] == pytest.approx(pr.tolist())
    assert [m.recall for m in got] == pytest.approx(rc.tolist())
    assert [m.f1 for m in got] == pytest.approx(f1.tolist())
    assert [m.support for m in got] == sup.tolist()
    assert ev.overall.accuracy == pytest.approx(accuracy_score(t, p))
    assert ev.overall.macro_f1 == pytest.approx(f1_score(t, p, labels=list(range(k - 1)), average="macro", zero_division=0))
    paper_idx = [classes.index(c) for c in catalogue.PAPER_CLASS_IDS]
    m = np.isin(t, paper_idx)
    assert ev.paper10.accuracy == pytest.approx(accuracy_score(t[m], p[m]))
    assert ev.paper10.macro_f1 == pytest.approx(f1_score(t[m], p[m], labels=paper_idx, average="macro", zero_division=0))


def test_reliability_by_hand():
    cal = reliability([0.95, 0.95, 0.55, 0.55], [True, False, True, True], n_bins=10)
    assert len(cal.bins) == 10
    top, mid = cal.bins[9], cal.bins[5]
    assert (top.n, top.accuracy, top.confidence) == (2, 0.5, pytest.approx(0.95))
    assert (mid.n, mid.accuracy, mid.confidence) == (2, 1.0, pytest.approx(0.55))
    assert cal.ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert sum(b.n for b in cal.bins) == 4 and math.isnan(cal.bins[0].accuracy)


def test_reliability_bin_edges_are_lo_exclusive_hi_inclusive():
    cal = reliability([0.0, 0.1, 0.2, 1.0], [True] * 4, n_bins=10)
    assert [b.n for b in cal.bins] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]


def test_perfectly_calibrated_cells_have_zero_ece():
    conf = [0.75] * 4
    assert reliability(conf, [True, True, True, False]).ece == pytest.approx(0.0)


def test_review_tradeoff_by_hand():
    rows = {r.threshold: r for r in review_tradeoff([0.2, 0.5, 0.8, 0.9], [False, True, False, True], (0.5, 0.6, 0.95))}
    r = rows[0.6]
    assert (r.to_review, r.share_to_review, r.accepted, r.accuracy_accepted, r.errors_to_review) == (2, 0.5, 2, 0.5, 0.5)
    assert rows[0.5].to_review == 1  # strictly below the threshold, as in a run
    assert rows[0.95].accepted == 0 and math.isnan(rows[0.95].accuracy_accepted)


def test_model_threshold_is_one_of_the_tabulated_rows():
    ev = evaluate([L, M], [L, M], [0.5, 0.9], [None, None], (L, M), model_threshold=0.8123)
    assert 0.8123 in [r.threshold for r in ev.thresholds]
    assert [r.threshold for r in ev.thresholds] == sorted(r.threshold for r in ev.thresholds)


def test_patient_differential_uses_the_wbc_denominator():
    # P1 verified: L L M + a platelet -> WBC 3; machine: L M M L -> WBC 4 (the platelet called L)
    comps = patient_comparisons([L, L, M, PLT, L], [L, M, M, L, L], ["P1", "P1", "P1", "P1", None], (L, M, PLT))
    assert len(comps) == 1
    pc = comps[0]
    assert (pc.patient, pc.cells, pc.verified_wbc, pc.machine_wbc) == ("P1", 4, 3, 4)
    rows = {r.class_id: r for r in pc.rows}
    assert set(rows) == {L, M}  # platelets are not part of the differential
    assert (rows[L].verified_pct, rows[L].machine_pct) == pytest.approx((200 / 3, 50.0))
    assert rows[M].difference == pytest.approx(50.0 - 100 / 3)


def test_bland_altman_known_bias_and_limits():
    ba = bland_altman([10, 20, 30, 40], [12, 21, 33, 40], "x")
    sd = math.sqrt((0.5**2 + 0.5**2 + 1.5**2 + 1.5**2) / 3)
    assert (ba.n, ba.bias, ba.sd) == (4, pytest.approx(1.5), pytest.approx(sd))
    assert (ba.lower, ba.upper) == (pytest.approx(1.5 - 1.96 * sd), pytest.approx(1.5 + 1.96 * sd))
    assert ba.means == pytest.approx((11, 20.5, 31.5, 40))


def test_bland_altman_drops_undefined_pairs_and_needs_two_for_limits():
    ba = bland_altman([10, float("nan")], [12, 5])
    assert (ba.n, ba.bias) == (1, 2.0) and math.isnan(ba.sd) and math.isnan(ba.upper)


def test_bland_altman_across_patients_in_evaluate():
    true = [L, L, M, M] + [L, M, M, M]
    pred = [L, L, L, M] + [L, M, M, M]  # P1 machine L 75% vs 50%; P2 25% vs 25%
    ev = evaluate(true, pred, [0.9] * 8, ["P1"] * 4 + ["P2"] * 4, (L, M))
    ba = {b.class_id: b for b in ev.bland_altman}
    assert ba[L].differences == pytest.approx((25.0, 0.0)) and ba[L].bias == pytest.approx(12.5)
    assert ba[M].bias == pytest.approx(-12.5)
    assert ev.cells_without_patient == 0


def test_bad_inputs_are_one_sentence():
    with pytest.raises(EvaluationError, match="outside the model's classes"):
        evaluate([L], ["nonsense"], [0.5], [None], (L, M))
    with pytest.raises(EvaluationError, match="differ in length"):
        evaluate([L, M], [L], [0.5], [None], (L, M))
    with pytest.raises(EvaluationError, match="outside 0..1"):
        evaluate([L], [L], [float("nan")], [None], (L, M))
    with pytest.raises(EvaluationError, match="outside 0..1"):
        evaluate([L], [L], [1.5], [None], (L, M))
    with pytest.raises(EvaluationError):
        confusion_matrix([0, 2], [0, 1], 2)
    # float32 rounding just above 1 is a top bin cell, not an error
    assert evaluate([L], [L], [1.0000001], [None], (L, M)).calibration.bins[-1].n == 1


def test_summary_over_an_absent_subset_is_nan_not_an_error():
    cm = confusion_matrix([0], [0], 2)
    s = summarize(cm, (PLT, "erythroblast"), catalogue.PAPER_CLASS_IDS, "paper")
    assert s.n == 0 and math.isnan(s.accuracy) and math.isnan(s.macro_f1) and s.per_class == ()


def test_ece_is_the_training_sides_ece():
    """The model card's ECE comes from train.calibration; evaluate must report the same number,
    bin edges included (confidences exactly on an edge are part of the random draw)."""
    from train.calibration import reliability as train_reliability

    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(5, 0.4), 400)
    probs[:20, 0] = np.round(probs[:20, 0] * 15) / 15  # some confidences on bin edges
    labels = rng.integers(0, 5, 400)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    ece, bins = train_reliability(probs, labels)
    got = reliability(conf, correct)
    assert got.ece == pytest.approx(ece)
    assert [b.n for b in got.bins] == [b["n"] for b in bins]


# ---------------------------------------------------------------- issue 19: measure what `run` reports

U = "unclassified"


def test_unclassified_is_an_abstention_not_the_best_guess():
    """Evaluate once scored an unclassified crop as the model's best guess; a run counts it
    nowhere. Coverage, accuracy over classified cells and accuracy with abstentions as misses."""
    true = [L, L, L, L, M, M]
    run = [L, L, U, U, M, L]
    guess = [L, L, L, M, M, L]
    ev = evaluate(true, run, [0.9] * 6, [None] * 6, (L, M), guess_ids=guess)
    cov = ev.coverage
    assert (cov.n, cov.classified, cov.unclassified) == (6, 4, 2)
    assert cov.coverage == pytest.approx(4 / 6)
    assert cov.accuracy_classified == pytest.approx(3 / 4)
    assert cov.accuracy_with_abstentions == pytest.approx(3 / 6) == pytest.approx(ev.overall.accuracy)
    assert ev.confusion.tolist() == [[2, 0, 2], [1, 1, 0]]
    lym = ev.overall.per_class[0]
    assert lym.recall == pytest.approx(2 / 4) and lym.precision == pytest.approx(2 / 3)  # abstention: a miss
    assert ev.classifier.accuracy == pytest.approx(4 / 6)  # the secondary, classifier-only view
    with pytest.raises(EvaluationError):
        evaluate(true, run, [0.9] * 6, [None] * 6, (L, M))  # no best guess for an unclassified crop


def test_patient_differential_counts_like_the_report():
    """The Summary's own function: unclassified crops are in no count and not in WBC (one
    patient read 44 machine blasts of 98 WBC in evaluate, 24 of 111 in the report)."""
    B = "myeloblast"
    true = [B, B, L, L, L]
    run = [B, U, L, L, U]
    guess = [B, B, L, L, B]
    (pc,) = evaluate(true, run, [0.9] * 5, ["P"] * 5, (L, B), guess_ids=guess).patients
    assert pc.machine_wbc == 3 and pc.machine_unclassified == 2 and pc.verified_wbc == 5
    row = {r.class_id: r for r in pc.rows}
    assert row[B].machine == 1 and row[B].machine_pct == pytest.approx(100 / 3)


def test_review_tradeoff_sends_unclassified_crops_to_review_whatever_their_confidence():
    ev = evaluate([L, L, M], [L, U, M], [0.95, 0.99, 0.95], [None] * 3, (L, M), model_threshold=0.9,
                  guess_ids=[L, L, M])
    at = next(r for r in ev.thresholds if r.threshold == 0.9)
    assert at.to_review == 1 and at.accepted == 2 and at.accuracy_accepted == pytest.approx(1.0)
