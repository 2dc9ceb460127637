"""Analyzer-quality degradation: fewer pixels per cell and harder JPEG compression.

Both training sources deliver large, lightly compressed crops (PBC 360 px, Munich 400 px). A
third hospital's analyzer may export smaller or more compressed JPEGs; the bundled v2 model
lost 3 points on its test split when the crops were re-saved at JPEG quality 60 and 11 points
at half size + quality 75 (ADR 0006). Degrading a share of the training crops the same way,
on the original crop before the shared framing (where a real analyzer's losses happen), teaches
the model that block artifacts and blur are not morphology. Defocus (an optional Gaussian blur
before the shrink) stands for a slide scanned slightly out of focus: v3 lost 7 points at
sigma 2 px and 28 at 3 px on its test split (`python -m train.robustness`).
"""
from __future__ import annotations

import numpy as np

SCALE_RANGE = (0.3, 1.0)  # linear size of the re-exported crop
QUALITY_RANGE = (40, 95)  # JPEG quality of the re-export


def degrade(rgb: np.ndarray, scale: float, quality: int | None, blur_sigma: float = 0.0) -> np.ndarray:
    """The crop as a lower-quality analyzer would export it: defocused by a Gaussian of
    `blur_sigma` pixels of the original crop (optics come before the sensor), shrunk by `scale`
    (INTER_AREA, like a sensor with larger pixels), then JPEG-encoded at `quality` (None: not
    re-encoded) and decoded."""
    import cv2

    h, w = rgb.shape[:2]
    out = rgb
    if blur_sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigmaX=float(blur_sigma))
    if scale < 1.0:
        out = cv2.resize(out, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
    if quality is None:
        return out
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def lab_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over images of each image's per-channel Lab mean and standard deviation."""
    import cv2

    labs = [cv2.cvtColor(im, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32) for im in images]
    return np.mean([lab.mean(0) for lab in labs], 0), np.mean([lab.std(0) for lab in labs], 0)


def recolour(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Reinhard colour transfer: the crop's per-channel Lab statistics become (mean, std), the
    way a crop would look under another lab's stain and scanner white balance."""
    import cv2

    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    m, s = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0) + 1e-6
    out = (lab - m) / s * std + mean
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def colour_donors(rng: np.random.Generator, n: int, sources: list[str], share: float) -> np.ndarray:
    """For n degraded crops, the index of a training crop whose colours each takes (-1: keep its
    own): a `share` of them, the donor's source drawn uniformly so the rarer source's colours
    (Munich: 12 % of the crops) are handed out as often as the common one's."""
    donors = np.full(n, -1, dtype=int)
    if share <= 0:
        return donors
    by_src: dict[str, np.ndarray] = {}
    for i, src in enumerate(sources):
        by_src.setdefault(src, []).append(i)
    groups = [np.asarray(v) for _, v in sorted(by_src.items())]
    chosen = np.flatnonzero(rng.random(n) < share)
    g = rng.integers(0, len(groups), len(chosen))
    donors[chosen] = [groups[k][rng.integers(0, len(groups[k]))] for k in g]
    return donors


def random_params(rng: np.random.Generator, n: int, defocus_max: float = 0.0) -> list[tuple[float, int, float]]:
    """n (scale, quality, defocus sigma) draws: scale log-uniform (each halving as likely),
    quality uniform; with defocus_max > 0, half the draws are also defocused by a sigma uniform
    in [0.5, defocus_max] pixels. The scale and quality draws do not depend on defocus_max, so
    runs without defocus reproduce the earlier ones."""
    lo, hi = SCALE_RANGE
    scales = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    quals = rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1, n)
    sigmas = np.zeros(n)
    if defocus_max > 0:
        blurred = rng.random(n) < 0.5
        sigmas[blurred] = rng.uniform(0.5, max(0.5, defocus_max), int(blurred.sum()))
    return [(float(s), int(q), float(b)) for s, q, b in zip(scales, quals, sigmas)]
