"""Temperature scaling and the review threshold (pure numpy), shared by training and `adapt`.

The runtime's review list is only honest if probabilities mean what they say, so the
temperature is fitted on held-out logits and travels inside the model; the review threshold
is the lowest confidence above which held-out cells are accurate enough. Training
(train/calibration.py) and `batchwbc adapt` (batchwbc/adaptation/head_fit.py) must apply the same rules,
so they live here, in the runtime package that both can import.
"""
from __future__ import annotations

import numpy as np

#: Share of accepted (not reviewed) cells that must be right: the rule every bundled model used.
TARGET_ACCURACY = 0.97


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities without overflow: what ensembles add up and NLL fits minimise."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """Minimise held-out NLL over T by golden-section search on log T (NLL is unimodal in T)."""
    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def review_threshold(probs: np.ndarray, labels: np.ndarray, target_accuracy: float = TARGET_ACCURACY) -> float:
    """Lowest confidence cut-off t such that held-out cells with confidence >= t are at least
    `target_accuracy` correct; cells below t go to a person. Rounded up to 0.01 (0.99 when no
    such t exists)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(-conf)
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(cum_acc >= target_accuracy)
    if len(ok) == 0:
        return 0.99
    return float(min(0.99, np.ceil(float(conf[order][ok[-1]]) * 100) / 100))


def review_share_pct(probs: np.ndarray, threshold: float) -> float:
    """% of held-out cells whose confidence is below the review threshold as the model file
    stores it (2 decimals): the share MANY_LOW_CONFIDENCE judges a patient against (metadata
    batchwbc.review_share_pct, written by export for a trained model and by adapt)."""
    return float(100.0 * np.mean(probs.max(axis=1) < round(float(threshold), 2)))
