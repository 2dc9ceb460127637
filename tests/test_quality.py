"""The automated black-band / lost-pixel filter on synthetic crops."""
from __future__ import annotations

import numpy as np

from train.quality import black_band_reason


def smear(h=120, w=120, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (230, 200, 190)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    nucleus = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 5) ** 2
    img[nucleus] = (70, 30, 110)  # dark purple nucleus: dark but not black
    return img


def test_clean_crop_passes():
    assert black_band_reason(smear()) is None


def test_black_rows_band_is_rejected():
    img = smear()
    img[-10:] = 0
    assert "black band" in black_band_reason(img)


def test_black_column_band_is_rejected_even_if_narrow():
    img = smear()
    img[:, :5] = 3
    assert "black band" in black_band_reason(img)


def test_scattered_lost_pixels_are_rejected():
    img = smear()
    rng = np.random.default_rng(1)
    mask = rng.random(img.shape[:2]) < 0.08
    img[mask] = 0
    assert "near-black" in black_band_reason(img)


def test_a_few_dark_pixels_are_tolerated():
    img = smear()
    img[50:52, 50:52] = 0
    assert black_band_reason(img) is None
