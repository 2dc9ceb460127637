"""The paper's manual quality filter, automated: drop crops with black bands / lost pixels.

Some public crops were damaged in conversion: part of the frame is a flat near-black band.
A stained smear never contains such regions (the darkest nuclei stay well above black), so a
large near-black, near-uniform area is a reliable sign of a damaged file rather than a cell.
"""
from __future__ import annotations

import numpy as np

NEAR_BLACK = 24  # max channel value counted as "black"
BAND_LINE_FRACTION = 0.9  # a row/column is "black" when this fraction of it is black
MIN_BAND_FRACTION = 0.03  # bands covering >= 3% of the rows/columns are rejected
MAX_BLACK_FRACTION = 0.05  # or >= 5% of all pixels black, wherever they are


def black_band_reason(rgb: np.ndarray) -> str | None:
    """Return why the crop looks damaged, or None when it looks fine."""
    black = rgb.max(axis=2) < NEAR_BLACK
    h, w = black.shape
    rows = black.mean(axis=1) >= BAND_LINE_FRACTION
    cols = black.mean(axis=0) >= BAND_LINE_FRACTION
    if rows.sum() >= max(2, MIN_BAND_FRACTION * h) or cols.sum() >= max(2, MIN_BAND_FRACTION * w):
        return f"black band ({int(rows.sum())} rows, {int(cols.sum())} columns near-black)"
    frac = float(black.mean())
    if frac >= MAX_BLACK_FRACTION:
        return f"{frac:.0%} of pixels near-black (lost pixels)"
    return None
