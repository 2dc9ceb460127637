"""The analyzer-quality degradation used in training (--degrade) and in train.robustness."""
from __future__ import annotations

import numpy as np

from train.degrade import QUALITY_RANGE, SCALE_RANGE, degrade, random_params


def _textured(h=120, w=100):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_identity_when_nothing_is_lost():
    im = _textured()
    assert np.array_equal(degrade(im, 1.0, None), im)


def test_shrinks_and_compresses():
    im = _textured()
    small = degrade(im, 0.5, None)
    assert small.shape == (60, 50, 3) and small.dtype == np.uint8
    q90, q40 = degrade(im, 1.0, 90), degrade(im, 1.0, 40)
    assert q90.shape == im.shape
    err = lambda a: float(np.abs(a.astype(int) - im.astype(int)).mean())  # noqa: E731
    assert 0 < err(q90) < err(q40)  # lower quality loses more


def test_random_params_stay_in_range_and_are_seeded():
    a = random_params(np.random.default_rng(1), 500)
    b = random_params(np.random.default_rng(1), 500)
    assert a == b
    s = np.array([p[0] for p in a])
    q = np.array([p[1] for p in a])
    assert SCALE_RANGE[0] <= s.min() and s.max() <= SCALE_RANGE[1]
    assert QUALITY_RANGE[0] <= q.min() and q.max() <= QUALITY_RANGE[1]
    assert np.mean(s < 0.55) > 0.4  # log-uniform: about half the draws lose at least half the size


def _sharpness(im: np.ndarray) -> float:
    g = im.astype(float).mean(axis=2)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def test_defocus_blurs_more_with_a_larger_sigma():
    im = _textured()
    assert np.array_equal(degrade(im, 1.0, None, 0.0), im)
    s1, s3 = degrade(im, 1.0, None, 1.0), degrade(im, 1.0, None, 3.0)
    assert s1.shape == im.shape and s1.dtype == np.uint8
    assert _sharpness(s3) < _sharpness(s1) < 0.8 * _sharpness(im)


def test_defocus_draws_leave_scale_and_quality_draws_unchanged():
    """A run without defocus must reproduce the earlier --degrade runs (model v3's O)."""
    plain = random_params(np.random.default_rng(3), 400)
    blurred = random_params(np.random.default_rng(3), 400, defocus_max=3.0)
    assert [p[:2] for p in plain] == [p[:2] for p in blurred]
    assert all(p[2] == 0.0 for p in plain)
    sig = np.array([p[2] for p in blurred])
    assert 0.35 < np.mean(sig > 0) < 0.65
    assert sig[sig > 0].min() >= 0.5 and sig.max() <= 3.0


def test_recolour_gives_the_target_lab_statistics():
    from train.degrade import lab_stats, recolour

    rng = np.random.default_rng(5)
    im = np.clip(rng.normal([200, 150, 170], 20, (80, 90, 3)), 0, 255).astype(np.uint8)
    target_mean, target_std = np.array([150.0, 140.0, 120.0]), np.array([30.0, 6.0, 8.0])
    m, s = lab_stats([recolour(im, target_mean, target_std)])
    assert np.all(np.abs(m - target_mean) < 3), m
    assert np.all(np.abs(s - target_std) < 3), s
    m0, _ = lab_stats([im])
    assert np.abs(m0 - target_mean).max() > 10  # it did move


def test_colour_donors_share_and_sources():
    """Donors come from each source about equally often, even when one source is rare."""
    from train.degrade import colour_donors

    sources = ["PBC"] * 900 + ["AML-LMU"] * 100
    none = colour_donors(np.random.default_rng(0), 500, sources, 0.0)
    assert (none == -1).all()
    d = colour_donors(np.random.default_rng(0), 4000, sources, 0.5)
    chosen = d[d >= 0]
    assert 0.45 < len(chosen) / 4000 < 0.55
    from_munich = np.mean([sources[i] == "AML-LMU" for i in chosen])
    assert 0.45 < from_munich < 0.55, from_munich
