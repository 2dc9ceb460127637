"""Refit a model's last layer on a lab's labelled embeddings (pure numpy, no scipy, no TensorFlow).

Why this shape of fit:

* Multinomial logistic regression on the frozen embedding, in the *tempered* logit space
  (V0 = W0 / T0, c0 = b0 / T0), so an adapted head with no data is exactly the original
  model's probabilities.
* An L2 penalty on (V - V0, c - c0) with a fixed total strength `alpha` (a prior: the more
  cells the lab labels, the less the prior weighs), chosen by cross-validation inside the
  training cells only, so a few hundred cells move the layer only as far as they support.
* Class-balanced sample weights, so the lab's commonest class does not decide the fit.
* Columns of classes absent from the training cells are not fitted: they stay at the
  original weights, and those classes keep their original behaviour as far as a softmax
  over the other classes allows.
* Temperature and review threshold are refitted on out-of-fold predictions, with the same
  rules as training (batchwbc/core/calibration.py, shared with train/): golden-section NLL search on log T; lowest
  confidence above which held-out cells are >= 97% correct, rounded up to 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from batchwbc.core.calibration import TARGET_ACCURACY, fit_temperature, log_softmax, nll, review_threshold, softmax  # noqa: F401

#: Prior strengths tried by the inner cross-validation (total penalty, in units of one cell's loss).
ALPHA_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Weight n / (classes present * n_class) per cell: every labelled class counts the same."""
    classes, counts = np.unique(y, return_counts=True)
    per = dict(zip(classes.tolist(), (len(y) / (len(classes) * counts)).tolist()))
    return np.array([per[v] for v in y.tolist()], dtype=np.float64)


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, max_iter: int = 500,
          tol: float = 1e-6, memory: int = 10) -> np.ndarray:
    """Minimise a smooth convex function with L-BFGS and a backtracking (Armijo) line search."""
    x = x0.copy()
    f, g = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        if np.linalg.norm(g) <= tol * max(1.0, np.linalg.norm(x)):
            break
        q = g.copy()
        alphas = []
        for s, yv in zip(reversed(s_hist), reversed(y_hist)):
            a = s @ q / (yv @ s)
            alphas.append(a)
            q -= a * yv
        if s_hist:
            q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
        for (s, yv), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += s * (a - yv @ q / (yv @ s))
        d = -q
        if g @ d >= 0:  # not a descent direction: restart from the gradient
            d, s_hist, y_hist = -g, [], []
        step = 1.0
        while True:
            x_new = x + step * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * (g @ d) or step < 1e-10:
                break
            step *= 0.5
        s, yv = x_new - x, g_new - g
        if s @ yv > 1e-12:
            s_hist.append(s)
            y_hist.append(yv)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = abs(f - f_new) <= tol * max(1.0, abs(f))
        x, f, g = x_new, f_new, g_new
        if converged:
            break
    return x


def fit_head(x: np.ndarray, y: np.ndarray, v0: np.ndarray, c0: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted softmax regression logits = x @ V + c, penalised by alpha/2 * |(V, c) - (V0, c0)|^2.

    Only the columns of classes present in y are fitted; the others stay at V0/c0."""
    n, d = x.shape
    k = v0.shape[1]
    cols = np.unique(y)
    idx = np.searchsorted(cols, y)
    w = balanced_weights(y)
    z = np.hstack([x, np.ones((n, 1))])
    theta0 = np.vstack([v0, c0[None, :]])  # [d+1, k]
    fixed_logits = z @ theta0  # logits of the columns that are not fitted
    p0 = theta0[:, cols]

    def fun(flat: np.ndarray) -> tuple[float, np.ndarray]:
        p = flat.reshape(d + 1, len(cols))
        logits = fixed_logits.copy()
        logits[:, cols] = z @ p
        lp = log_softmax(logits)
        loss = -(w * lp[np.arange(n), cols[idx]]).sum()
        resid = np.exp(lp[:, cols])
        resid[np.arange(n), idx] -= 1.0
        grad = z.T @ (resid * w[:, None])
        diff = p - p0
        return float(loss + 0.5 * alpha * (diff * diff).sum()), (grad + alpha * diff).ravel()

    p = lbfgs(fun, p0.ravel()).reshape(d + 1, len(cols))
    theta = theta0.copy()
    theta[:, cols] = p
    return theta[:d], theta[d]


def fold_ids(y: np.ndarray, groups: Sequence[str | None] | None, k: int = 5, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold number per cell and a description: grouped by patient when every cell has one and
    there are at least 3 patients (a patient's cells never sit on both sides), else stratified."""
    rng = np.random.default_rng(seed)
    n = len(y)
    out = np.zeros(n, dtype=int)
    if groups is not None and all(g for g in groups) and len(set(groups)) >= 3:
        names, inverse, sizes = np.unique(np.array(groups), return_inverse=True, return_counts=True)
        k = min(k, len(names))
        order = rng.permutation(len(names))
        order = order[np.argsort(-sizes[order], kind="stable")]  # largest patients first, ties shuffled
        load = np.zeros(k)
        fold_of = np.zeros(len(names), dtype=int)
        for g in order:
            f = int(np.argmin(load))
            fold_of[g] = f
            load[f] += sizes[g]
        return fold_of[inverse], f"{k}-fold grouped by patient ({len(names)} patients)"
    k = max(2, min(k, n))
    start = 0
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        out[members] = (start + np.arange(len(members))) % k
        start += len(members)
    return out, f"{k}-fold stratified by class (no patient folders)"


def brier(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of the probability vector against the one-hot label (lower is better)."""
    p = softmax(logits)
    p[np.arange(len(y)), y] -= 1.0
    return float((p * p).sum(axis=1).mean())


def choose_alpha(x: np.ndarray, y: np.ndarray, groups: Sequence[str | None] | None, v0: np.ndarray, c0: np.ndarray,
                 grid: Sequence[float] = ALPHA_GRID, k: int = 3, seed: int = 0) -> float:
    """Prior strength with the lowest held-out Brier score, by k-fold CV on these cells only.

    Brier rather than log-loss: on an unseen source (DeepAPL, benchmarks/adapt_curve.py) a few
    confidently wrong held-out cells made log-loss always prefer the strongest prior, which
    left most of the accuracy gain on the table; the bounded Brier score does not."""
    folds, _ = fold_ids(y, groups, k, seed)
    scores_ = []
    for alpha in grid:
        oof = np.zeros((len(y), v0.shape[1]))
        for f in np.unique(folds):
            tr, te = folds != f, folds == f
            v, c = fit_head(x[tr], y[tr], v0, c0, alpha)
            oof[te] = x[te] @ v + c
        scores_.append(brier(oof, y))
    return float(grid[int(np.argmin(scores_))])


def cross_validated_logits(x: np.ndarray, y: np.ndarray, groups: Sequence[str | None] | None, v0: np.ndarray,
                           c0: np.ndarray, folds: np.ndarray, grid: Sequence[float] = ALPHA_GRID) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold logits of the adapted head; alpha is chosen inside each training part (nested)."""
    oof = np.zeros((len(y), v0.shape[1]))
    chosen = []
    g = np.array(groups, dtype=object) if groups is not None else None
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        alpha = choose_alpha(x[tr], y[tr], None if g is None else list(g[tr]), v0, c0, grid)
        v, c = fit_head(x[tr], y[tr], v0, c0, alpha)
        oof[te] = x[te] @ v + c
        chosen.append(alpha)
    return oof, chosen


@dataclass(frozen=True)
class Scores:
    accuracy: float
    macro_f1: float  # over the classes present in the labels
    n: int

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "macro_f1": round(self.macro_f1, 4), "n": self.n}


def scores(y: np.ndarray, pred: np.ndarray, classes: Sequence[int] | None = None) -> Scores:
    """Accuracy and macro-F1 over `classes` (default: the classes present in y). A prediction of
    any other class counts as a miss for the true class."""
    labels = np.unique(y) if classes is None else np.asarray(classes)
    f1s = []
    for cls in labels:
        tp = int(((pred == cls) & (y == cls)).sum())
        fp = int(((pred == cls) & (y != cls)).sum())
        fn = int(((pred != cls) & (y == cls)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return Scores(float((pred == y).mean()) if len(y) else float("nan"), float(np.mean(f1s)) if f1s else float("nan"), len(y))
