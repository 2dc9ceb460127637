"""Crops that are not cells, made from real crops: what the OOD guard is fitted and checked on.

Why here and not in the export alone: the export fits the reject centres and the not-a-cell
rule on them (export/ood_reference.py), and `batchwbc adapt` cuts them from the lab's own crops
to check that the reference it re-derives still sets them apart (batchwbc.adaptation.thresholds).
Both must make them the same way, and adapt runs without the export.

The decode_* functions are `embed_files`' decoders (module level, so worker processes can run
them): read one crop, cut the junk from it with a generator seeded by the path, and frame the
result under the model's contract like any crop.
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.pipeline import Decoded


def background_corner(rgb: "np.ndarray", rng: "np.random.Generator") -> "np.ndarray":
    """A random corner square, a third of the crop's short side (at least 32 px): red cells
    and background, rarely more than a sliver of the leukocyte in the middle."""
    import numpy as np

    h, w = rgb.shape[:2]
    s = max(32, min(h, w) // 3)
    y = 0 if rng.random() < 0.5 else h - s
    x = 0 if rng.random() < 0.5 else w - s
    return np.ascontiguousarray(rgb[y : y + s, x : x + s])


def not_a_cell(rgb: "np.ndarray", rng: "np.random.Generator") -> "np.ndarray":
    """A synthetic non-cell of the donor crop's size: half coloured noise (uniform or normal,
    blurred at a random grain of 0-12 px, with a random mean colour and contrast), half the
    donor cut into a 4x4 to 8x8 grid of tiles and shuffled. Drawn with their own generator
    and parameters, not the noise of the OOD tests, so those tests stay a check."""
    import cv2
    import numpy as np

    h, w = rgb.shape[:2]
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            x = rng.uniform(-1.0, 1.0, (h, w, 3)).astype(np.float32)
        else:
            x = rng.normal(0.0, 0.6, (h, w, 3)).astype(np.float32)
        sigma = float(rng.uniform(0.0, 12.0))
        if sigma > 0.5:
            x = cv2.GaussianBlur(x, (0, 0), sigma)
            x /= max(float(np.abs(x).max()), 1e-6)
        mean = rng.uniform(60, 220, 3).astype(np.float32)
        contrast = float(rng.uniform(20, 110))
        return np.clip(mean + contrast * x, 0, 255).astype(np.uint8)
    n = int(rng.integers(4, 9))
    th, tw = max(1, h // n), max(1, w // n)
    tiles = [rgb[i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(n) for j in range(n)]
    order = rng.permutation(len(tiles))
    rows = [np.concatenate([tiles[order[i * n + j]] for j in range(n)], axis=1) for i in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def _decode_with(make: Callable, path: str, size: int, preprocessing: str | None) -> "Decoded":
    import numpy as np

    from batchwbc.engine.pipeline import Decoded
    from batchwbc.engine.preprocess import PREPROCESSING_ID, UnreadableImage, decode_rgb, read_bytes, to_model_input

    rng = np.random.default_rng(zlib.crc32(str(path).encode("utf-8")))
    try:
        junk = make(decode_rgb(read_bytes(path)), rng)
        return Decoded(to_model_input(junk, size, preprocessing or PREPROCESSING_ID), None, 0, 0)
    except UnreadableImage as exc:
        return Decoded(None, str(exc), 0, 0)
    except Exception as exc:  # noqa: BLE001 - one bad donor crop is skipped, never fatal
        return Decoded(None, f"image could not be decoded ({type(exc).__name__})", 0, 0)


def decode_background_corner(path: str, size: int, preprocessing: str | None = None) -> "Decoded":
    """A background corner of the crop at `path`, as the model input (embed_files' decoder)."""
    return _decode_with(background_corner, path, size, preprocessing)


def decode_not_a_cell(path: str, size: int, preprocessing: str | None = None) -> "Decoded":
    """A synthetic non-cell made from the crop at `path`, as the model input (embed_files' decoder)."""
    return _decode_with(not_a_cell, path, size, preprocessing)
