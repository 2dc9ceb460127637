"""Magnification matching used against the scanner-size shortcut."""
from __future__ import annotations

import numpy as np
import pytest

from train.rescale import parse_spec, zoom_out


def test_zoom_out_shrinks_the_cell_and_keeps_the_frame():
    img = np.full((128, 128, 3), 230, np.uint8)
    yy, xx = np.mgrid[:128, :128]
    img[(yy - 64) ** 2 + (xx - 64) ** 2 < 40**2] = (80, 30, 120)  # a round "cell", radius 40
    out = zoom_out(img, 0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    dark = (out[..., 0] < 150).sum()
    assert 0.2 * (img[..., 0] < 150).sum() < dark < 0.35 * (img[..., 0] < 150).sum()  # area ~ factor^2
    assert out[64, 64, 0] < 150  # still centred


def test_spec_parsing():
    assert parse_spec("AML-LMU:0.55:0.75") == ("AML-LMU", 0.55, 0.75)
    for bad in ["AML-LMU", "AML-LMU:0.8:0.5", "AML-LMU:0:1", "x:a:b"]:
        with pytest.raises(ValueError, match="SOURCE:LOW:HIGH"):
            parse_spec(bad)
