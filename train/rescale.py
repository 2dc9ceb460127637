"""Magnification matching between sources.

The Munich scanner shows cells ~1.6x larger than the Barcelona CellaVision, and every
myeloblast in the training data is from Munich, so a network can learn "big cell = blast"
(the shortcut probe measured it). Adding zoomed-out copies of one source's training crops,
at the other source's scale, removes that cue while keeping the morphology.
"""
from __future__ import annotations

import numpy as np


def zoom_out(rgb: np.ndarray, factor: float, mode: str = "background") -> np.ndarray:
    """Shrink the crop by `factor` (< 1) and pad back to its size.

    mode="background" pads with the crop's own background colour (median of its outer
    frame); "reflect" mirrors the shrunken crop, which keeps red-cell texture around the cell
    but copies parts of a large cell into the border as ghost fragments. Training uses
    "background"; the shortcut probe reports both, since neither is a real crop.
    """
    import cv2

    h, w = rgb.shape[:2]
    frame = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = tuple(int(v) for v in np.median(frame, axis=0))
    small = cv2.resize(rgb, (max(1, int(round(w * factor))), max(1, int(round(h * factor)))), interpolation=cv2.INTER_AREA)
    top, left = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    pads = (top, h - small.shape[0] - top, left, w - small.shape[1] - left)
    if mode == "reflect":
        return cv2.copyMakeBorder(small, *pads, cv2.BORDER_REFLECT_101)
    return cv2.copyMakeBorder(small, *pads, cv2.BORDER_CONSTANT, value=background)


def parse_spec(spec: str) -> tuple[str, float, float]:
    """'AML-LMU:0.55:0.75' -> (source, low, high)."""
    message = f"--zoom-out-source must look like SOURCE:LOW:HIGH with 0.2 <= LOW <= HIGH <= 1, not {spec!r}."
    try:
        source, lo, hi = spec.rsplit(":", 2)
        lo_f, hi_f = float(lo), float(hi)
    except ValueError:
        raise ValueError(message) from None
    if not source or not 0.2 <= lo_f <= hi_f <= 1.0:
        raise ValueError(message)
    return source, lo_f, hi_f


def zoomed_copies(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    return np.stack([zoom_out(im, f) for im, f in zip(images, factors)]) if len(images) else images[:0]
