"""Checks on a decoded crop before the model sees it: can it hold a cell, does it carry stain colour?

Why: the model forces every input into one of its classes. A 1x1 pixel or an 8000x3 strip
is not a single-cell crop at all, so it must never be classified or counted: it goes to the
Errors sheet with a reason. A greyscale crop may well show a cell, but the stain colours that
separate eosinophils, basophils and granulocyte stages are gone, so it is classified and
always sent to review (measured in issue 12: greyscale copies of real cells reached only
0.65 accuracy).

These are runtime policies, not part of the preprocessing contract: training never calls them.
The bounds are far from real analyzer crops: the public training data (13,464 crops, three
analyzers) has a shortest side of 359 px and a largest side ratio of 1.41, and a coloured
crop's channel difference (see is_greyscale) is at least 36 grey levels (300 random crops),
against 0 for a greyscale copy (`python benchmarks/crop_checks.py`, docs/operations.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from batchwbc.engine.preprocess import UnreadableImage

if TYPE_CHECKING:
    import numpy as np

#: Shortest side a single-cell crop can have: a leukocyte at the lowest magnification an
#: analyzer exports still spans far more pixels than this.
MIN_SIDE = 32
#: Largest ratio of the longer to the shorter side; analyzer crops are square or nearly so.
MAX_ASPECT = 3.0
#: A crop whose mean |R-G| + |G-B| (0-255 grey levels) is below this has no stain colour:
#: greyscale files, and colour files holding a greyscale picture (+-1 level of independent
#: noise per channel gives about 1.8; real stained crops 36 and more).
GREY_MAX_DIFF = 3.0
#: Review reasons shown in the Cells and Review sheets (docs/report.md).
GREYSCALE_REASON = "greyscale image: stain colour missing"
LOW_CONFIDENCE_REASON = "confidence below the review threshold"


def shape_problem(width: int, height: int) -> str | None:
    """Why a width x height image cannot be a single-cell crop, or None when it can (pure)."""
    if min(width, height) < MIN_SIDE:
        return (f"image is {width}x{height} pixels, too small to hold a cell "
                f"(a crop needs at least {MIN_SIDE} pixels on each side)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (f"image is {width}x{height} pixels, a strip rather than a cell crop "
                f"(its long side is more than {MAX_ASPECT:g} times its short side)")
    return None


def check_crop_shape(rgb: "np.ndarray") -> None:
    """Raise UnreadableImage (the Errors-sheet reason) for a decoded image that cannot be a crop."""
    problem = shape_problem(int(rgb.shape[1]), int(rgb.shape[0]))
    if problem is not None:
        raise UnreadableImage(problem)


def channel_difference(rgb: "np.ndarray") -> float:
    """Mean |R-G| + |G-B| of an HxWx3 uint8 image, in grey levels (0 for a greyscale picture)."""
    import cv2

    r, g, b = cv2.split(rgb)
    return (cv2.norm(r, g, cv2.NORM_L1) + cv2.norm(g, b, cv2.NORM_L1)) / max(1, r.size)


def is_greyscale(rgb: "np.ndarray") -> bool:
    """True when an HxWx3 uint8 image has (near-)equal channels.

    Single-channel files are decoded to three equal channels, so one test covers both them
    and colour files holding a greyscale picture. It runs in the main process on the model
    input; OpenCV's L1 norms keep it at ~30 us per crop (a numpy max/min over the channel
    axis took ~250 us).
    """
    return channel_difference(rgb) < GREY_MAX_DIFF


def review_reasons(confidence: float, threshold: float, image_reason: str = "") -> str:
    """The Review-reason text for a cell: '' when it need not be reviewed (pure)."""
    reasons = [r for r in (image_reason, LOW_CONFIDENCE_REASON if confidence < threshold else "") if r]
    return "; ".join(reasons)
