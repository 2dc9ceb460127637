"""The OpenCV training augmentation (train/cvaugment.py): the geometry it claims, the stain
jitter's ranges, and the batches Keras is fed."""
from __future__ import annotations

import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from train import cvaugment  # noqa: E402


def _crop(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _warp(img: np.ndarray, angle: float, zoom: float, flip: bool) -> np.ndarray:
    m = cvaugment.geometry_matrix(img.shape[0], angle, zoom, flip)
    return cv2.warpAffine(img, m, img.shape[:2][::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def test_identity_mirror_and_quarter_turn():
    img = _crop()
    np.testing.assert_array_equal(_warp(img, 0.0, 1.0, False), img)
    np.testing.assert_array_equal(_warp(img, 0.0, 1.0, True), img[:, ::-1])
    quarter = _warp(img, math.pi / 2, 1.0, False)
    assert any(np.abs(quarter.astype(int) - np.rot90(img, k).astype(int)).max() <= 1 for k in (1, 3))
    assert not np.array_equal(quarter, img)


def test_zoom_scales_about_the_centre():
    size = 65
    img = np.zeros((size, size, 3), np.uint8)
    img[28:37, 28:37] = 255  # a 9-px square in the middle
    bigger = _warp(img, 0.0, 2.0, False)
    area = lambda a: int((a[..., 0] > 127).sum())  # noqa: E731
    assert 3.0 * area(img) < area(bigger) < 5.0 * area(img)
    ys, xs = np.nonzero(bigger[..., 0] > 127)
    assert abs(ys.mean() - 32) < 1 and abs(xs.mean() - 32) < 1


def test_strength_zero_is_the_crop_as_float():
    batch = np.stack([_crop(seed=i) for i in range(3)])
    out = cvaugment.augment_batch(batch, np.random.default_rng(0), 0.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, batch.astype(np.float32))


def test_stain_jitter_stays_in_range_and_varies_per_image():
    grey = np.full((200, 8, 8, 3), 128, np.uint8)
    out = cvaugment.stain_jitter(grey, np.random.default_rng(1), 1.0)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    means = out.mean(axis=(1, 2, 3))
    assert means.std() > 5  # brightness, contrast and gamma differ per image
    # every pixel of one image moves together: one draw per image, not per pixel
    assert float(out.std(axis=(1, 2)).max()) < 1e-3
    # gain is per channel: grey becomes tinted
    assert float(np.abs(out[..., 0] - out[..., 2]).max()) > 5


def test_refuses_a_float_batch():
    with pytest.raises(ValueError):
        cvaugment.augment_batch(np.zeros((2, 8, 8, 3), np.float32), np.random.default_rng(0), 1.0)


def test_batches_cover_every_crop_once_per_epoch_and_reshuffle():
    pytest.importorskip("keras")
    n = 37
    x = np.stack([np.full((16, 16, 3), i, np.uint8) for i in range(n)])
    y = np.arange(n)
    ds = cvaugment.batches(x, y, None, 8, 0.0, seed=3)
    assert len(ds) == 5

    def epoch():
        seen = []
        for i in range(len(ds)):
            xb, yb = ds[i]
            assert xb.dtype == np.float32 and xb.shape[1:] == (16, 16, 3)
            np.testing.assert_array_equal(xb[:, 0, 0, 0], yb)  # images stay with their labels
            seen.extend(yb.tolist())
        ds.on_epoch_end()
        return seen

    first, second = epoch(), epoch()
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second
    weighted = cvaugment.batches(x, y, np.linspace(0, 1, n).astype(np.float32), 8, 1.0, seed=3)
    xb, yb, wb = weighted[0]
    np.testing.assert_allclose(wb, np.linspace(0, 1, n)[yb], rtol=1e-6)


def test_augmented_batches_are_reproducible_for_a_seed():
    pytest.importorskip("keras")
    x = np.stack([_crop(seed=i) for i in range(10)])
    a = cvaugment.batches(x, np.arange(10), None, 4, 1.0, seed=5)[1][0]
    b = cvaugment.batches(x, np.arange(10), None, 4, 1.0, seed=5)[1][0]
    c = cvaugment.batches(x, np.arange(10), None, 4, 1.0, seed=6)[1][0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
