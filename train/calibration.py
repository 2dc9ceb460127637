"""Temperature scaling, expected calibration error and the review threshold (pure numpy).

The runtime's review list is only honest if probabilities mean what they say, so the
temperature is fitted on validation logits and travels inside the exported graph.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities without overflow: what ensembles add up and NLL fits minimise."""
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels] + 1e-12)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """Minimise validation NLL over T by golden-section search on log T (NLL is unimodal in T)."""
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


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[float, list[dict]]:
    """(ECE, bins): equal-width confidence bins, ECE weighted by bin size."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins, ece = [], 0.0
    for i in range(n_bins):
        m = (conf > edges[i]) & (conf <= edges[i + 1]) if i else (conf >= 0) & (conf <= edges[1])
        n = int(m.sum())
        acc = float(correct[m].mean()) if n else float("nan")
        mc = float(conf[m].mean()) if n else float("nan")
        if n:
            ece += n / len(labels) * abs(acc - mc)
        bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "n": n, "accuracy": acc, "confidence": mc})
    return float(ece), bins


def review_threshold(probs: np.ndarray, labels: np.ndarray, target_accuracy: float = 0.97) -> float:
    """Lowest confidence cut-off t such that validation cells with confidence >= t are at least
    `target_accuracy` correct; cells below t go to a person. Rounded up to 0.01."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    order = np.argsort(-conf)
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(cum_acc >= target_accuracy)
    if len(ok) == 0:
        return 0.99
    t = float(conf[order][ok[-1]])
    return float(min(0.99, np.ceil(t * 100) / 100))
