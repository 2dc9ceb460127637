"""The cell-centred framing (preprocessing v2): finds the cell, frames it the same way at any
magnification, and falls back to the whole crop when nothing stands out."""
from __future__ import annotations

import random

import numpy as np
import pytest

from batchwbc.engine import preprocess as pp

CREAM = (245, 222, 200)  # CellaVision-like background: blue below green
PINK = (225, 170, 175)  # red cell
PURPLE = (120, 70, 160)  # stained nucleus: blue well above green


def smear(h: int, w: int, cx: int, cy: int, r: int, rbc: bool = True) -> np.ndarray:
    """A synthetic crop: one purple cell of radius r at (cx, cy) among pink red cells."""
    import cv2

    img = np.full((h, w, 3), CREAM, np.uint8)
    if rbc:
        rng = np.random.default_rng(0)
        for _ in range(12):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.circle(img, (x, y), max(3, r // 2), PINK, -1)
    cv2.circle(img, (cx, cy), r, PURPLE, -1)
    return img


@pytest.mark.parametrize("h,w,cx,cy,r", [(360, 363, 181, 180, 60), (400, 400, 230, 170, 80), (300, 500, 250, 150, 40)])
def test_square_is_centred_on_the_cell_and_sized_by_it(h, w, cx, cy, r):
    x0, y0, side = pp.cell_square(smear(h, w, cx, cy, r))
    want = pp.CELL_MARGIN * 2 * r
    assert abs(side - want) <= 0.1 * want, (side, want)
    assert abs((x0 + side / 2) - cx) <= 0.05 * side and abs((y0 + side / 2) - cy) <= 0.05 * side


def test_margin_is_a_parameter_and_the_default_is_the_contracts():
    """`python -m train.experiments margin` passes the margin; it must change the square, and
    leaving it out must frame exactly as the contract does (the runtime never passes it)."""
    img = smear(400, 400, 200, 200, 50)
    _, _, side = pp.cell_square(img)
    assert pp.cell_square(img, pp.CELL_MARGIN) == pp.cell_square(img)
    _, _, narrow = pp.cell_square(img, 1.4)
    assert abs(narrow - 1.4 * 100) <= 10 and narrow < side
    default = pp.to_model_input(img, 32, pp.PREPROCESSING_CELL)
    assert np.array_equal(default, pp.to_model_input(img, 32, pp.PREPROCESSING_CELL, margin=pp.CELL_MARGIN))
    assert not np.array_equal(default, pp.to_model_input(img, 32, pp.PREPROCESSING_CELL, margin=1.4))
    assert np.array_equal(pp.to_model_input(img, 32, pp.PREPROCESSING_WHOLE, margin=1.4),
                          pp.to_model_input(img, 32, pp.PREPROCESSING_WHOLE))


def test_picks_the_central_cell_not_a_bigger_neighbour():
    import cv2

    img = smear(400, 400, 200, 200, 40)
    cv2.circle(img, (40, 40), 60, PURPLE, -1)  # a larger cell cut by the corner
    x0, y0, side = pp.cell_square(img)
    assert abs(x0 + side / 2 - 200) < 12 and abs(y0 + side / 2 - 200) < 12


def test_small_cells_get_the_minimum_square_and_big_ones_the_whole_crop():
    x0, y0, side = pp.cell_square(smear(360, 360, 180, 180, 14))  # platelet-sized
    assert side == round(pp.CELL_MIN_FRACTION * 360)
    x0, y0, side = pp.cell_square(smear(400, 400, 200, 200, 170))  # fills the crop
    assert (x0, y0, side) == (0, 0, 400)


def test_square_is_shifted_inside_for_a_cell_at_the_border():
    h, w = 360, 360
    x0, y0, side = pp.cell_square(smear(h, w, 300, 60, 50, rbc=False))
    assert 0 <= x0 and 0 <= y0 and x0 + side <= w and y0 + side <= h


@pytest.mark.parametrize("img", [np.full((100, 100, 3), 200, np.uint8), np.zeros((8, 8, 3), np.uint8),
                                 np.full((50, 400, 3), CREAM, np.uint8)])
def test_nothing_to_find_means_the_whole_crop(img):
    assert pp.cell_square(img) is None
    out = pp.to_model_input(img, 32, pp.PREPROCESSING_CELL)
    assert np.array_equal(out, pp.to_model_input(img, 32, pp.PREPROCESSING_WHOLE))


def test_framing_cancels_magnification():
    """The same cell shown 0.6x as large (another scanner's magnification) reaches the model
    at the same size: the whole-crop contract let a model learn magnification (model card)."""
    import cv2

    big = smear(400, 400, 200, 200, 90, rbc=False)
    small = np.full_like(big, CREAM)
    shrunk = cv2.resize(big, (240, 240), interpolation=cv2.INTER_AREA)
    small[80:320, 80:320] = shrunk
    a = pp.to_model_input(big, 64, pp.PREPROCESSING_CELL).astype(float)
    b = pp.to_model_input(small, 64, pp.PREPROCESSING_CELL).astype(float)
    whole_a = pp.to_model_input(big, 64, pp.PREPROCESSING_WHOLE).astype(float)
    whole_b = pp.to_model_input(small, 64, pp.PREPROCESSING_WHOLE).astype(float)
    assert np.abs(a - b).mean() < 0.25 * np.abs(whole_a - whole_b).mean()


def test_unknown_contract_is_refused():
    with pytest.raises(ValueError):
        pp.to_model_input(np.zeros((40, 40, 3), np.uint8), 32, "some-other-v9")


def test_real_crops_from_both_scanners_are_found_and_centred(shared_data):
    """Both sources centre the cell in their exports; the framing must find it there."""
    rng = random.Random(7)
    for folder in ("PBC_dataset_normal_DIB/neutrophil", "PBC_dataset_normal_DIB/lymphocyte",
                   "PBC_dataset_normal_DIB/erythroblast", "PBC_dataset_normal_DIB/platelet",
                   "AML-Cytomorphology_LMU/MYO", "AML-Cytomorphology_LMU/NGS"):
        files = sorted(p for p in (shared_data / folder).iterdir() if pp.is_image_name(p.name))
        off_centre = 0
        for f in rng.sample(files, 40):
            rgb = pp.decode_rgb(pp.read_bytes(f))
            box = pp.cell_square(rgb)
            assert box is not None, f
            x0, y0, side = box
            h, w = rgb.shape[:2]
            off_centre += np.hypot(x0 + side / 2 - w / 2, y0 + side / 2 - h / 2) > 0.15 * min(h, w)
        assert off_centre <= 2, (folder, off_centre)


def test_framing_hardly_depends_on_how_loosely_the_analyzer_cropped(shared_data):
    """Cutting 20 % off a real crop's border must not move the cell's square much: the framing
    follows the cell, not the crop (a whole-crop resize would change scale by 25 %)."""
    rng = random.Random(1)
    root = shared_data / "PBC_dataset_normal_DIB"
    files = [p for c in ("neutrophil", "lymphocyte", "monocyte", "ig", "erythroblast") for p in
             rng.sample(sorted((root / c).glob("*.jpg")), 12)]
    diffs = []
    for f in files:
        im = pp.decode_rgb(pp.read_bytes(f))
        h, w = im.shape[:2]
        x0, y0, s = pp.cell_square(im)
        c = int(min(h, w) * 0.8)
        oy, ox = (h - c) // 2, (w - c) // 2
        x1, y1, s1 = pp.cell_square(np.ascontiguousarray(im[oy : oy + c, ox : ox + c]))
        centre = np.hypot(x1 + ox + s1 / 2 - (x0 + s / 2), y1 + oy + s1 / 2 - (y0 + s / 2)) / s
        diffs.append(max(centre, abs(s1 - s) / s))
    assert np.median(diffs) < 0.05, np.median(diffs)
    assert np.mean(np.array(diffs) > 0.15) < 0.2
