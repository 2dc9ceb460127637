"""Analyzer-quality degradation: fewer pixels per cell and harder JPEG compression.

Both training sources deliver large, lightly compressed crops (PBC 360 px, Munich 400 px). A
third hospital's analyzer may export smaller or more compressed JPEGs; the bundled v2 model
lost 3 points on its test split when the crops were re-saved at JPEG quality 60 and 11 points
at half size + quality 75 (ADR 0006). Degrading a share of the training crops the same way,
on the original crop before the shared framing (where a real analyzer's losses happen), teaches
the model that block artifacts and blur are not morphology.
"""
from __future__ import annotations

import numpy as np

SCALE_RANGE = (0.3, 1.0)  # linear size of the re-exported crop
QUALITY_RANGE = (40, 95)  # JPEG quality of the re-export


def degrade(rgb: np.ndarray, scale: float, quality: int | None) -> np.ndarray:
    """The crop as a lower-resolution analyzer would export it: shrunk by `scale` (INTER_AREA,
    like a sensor with larger pixels), then JPEG-encoded at `quality` (None: not re-encoded)
    and decoded."""
    import cv2

    h, w = rgb.shape[:2]
    out = rgb
    if scale < 1.0:
        out = cv2.resize(rgb, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    if quality is None:
        return out
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def random_params(rng: np.random.Generator, n: int) -> list[tuple[float, int]]:
    """n (scale, quality) draws: scale log-uniform (each halving as likely), quality uniform."""
    lo, hi = SCALE_RANGE
    scales = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    quals = rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1, n)
    return [(float(s), int(q)) for s, q in zip(scales, quals)]
