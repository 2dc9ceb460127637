"""Temperature scaling, expected calibration error and the review threshold (pure numpy).

The runtime's review list is only honest if probabilities mean what they say, so the
temperature is fitted on validation logits and travels inside the exported graph.
"""
from __future__ import annotations

import numpy as np

# The temperature and threshold rules are shared with `batchwbc adapt`, so they live in the runtime.
from batchwbc.core.calibration import fit_temperature, log_softmax, nll, review_threshold, softmax  # noqa: F401


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
