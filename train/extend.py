"""Ways to extend a training set: small, pluggable variants of the "extend" stage.

Why: zoomed-out copies (the scanner-size shortcut, ADR 0005) and degraded copies (a worse
analyzer, ADRs 0006 and 0007) were branches inside the training loop, and the next idea would
have been a third. A variant takes the training set so far and returns it extended (or with
some crops replaced); `variants(config)` lists the ones a run's options ask for, in the order
they apply. A new idea is a new small class here and one line in `variants`.

A variant must keep the first n entries of the set the original training crops in split
order (copies are appended), because a later variant picks crops by their index there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import TrainConfig, TrainingError


@dataclass(frozen=True)
class TrainingSet:
    """uint8 inputs [n,S,S,3] and their catalogue labels; the first entries are the split's
    training crops in order, copies follow. The set owns its arrays (a copy of the decoded
    data), so a variant may replace crops in place instead of copying a gigabyte."""

    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Crops:
    """What a variant may read about the training crops (all in split order); never changed."""

    all_images: np.ndarray  # every decoded crop of the data, uint8 [N,S,S,3]
    index: np.ndarray  # the training crops' rows in all_images
    labels: np.ndarray
    sources: list[str]
    paths: list[str]  # relative to data_root
    data_root: Path  # the original files (absent when the data came packed)
    size: int
    preprocessing: str
    seed: int
    workers: int

    def images(self, pick: np.ndarray | None = None) -> np.ndarray:
        """A copy of the framed training crops (those at positions `pick`, or all)."""
        return self.all_images[self.index if pick is None else self.index[pick]]


class Variant(Protocol):
    def apply(self, ts: TrainingSet, crops: Crops) -> TrainingSet: ...


@dataclass(frozen=True)
class ZoomOut:
    """Add zoomed-out copies (factor low..high, seeded) of one source's training crops."""

    source: str
    low: float
    high: float

    def apply(self, ts: TrainingSet, crops: Crops) -> TrainingSet:
        from .rescale import zoomed_copies

        pick = np.array([i for i, s in enumerate(crops.sources) if s == self.source], dtype=int)
        if len(pick) == 0:
            raise TrainingError(f"--zoom-out-source: no training images come from source {self.source!r}.")
        factors = np.random.default_rng(crops.seed).uniform(self.low, self.high, len(pick))
        print(f"added {len(pick)} zoomed-out copies (x{self.low}-{self.high}) of {self.source} training crops")
        return TrainingSet(np.concatenate([ts.x, zoomed_copies(crops.images(pick), factors)]),
                           np.concatenate([ts.y, crops.labels[pick]]))


@dataclass(frozen=True)
class Degrade:
    """A seeded share of the training crops as a lower-quality, softer or differently stained
    analyzer would export them (train.degrade), replacing those crops or added as copies."""

    share: float
    mode: str = "replace"  # or "add"
    defocus_max: float = 0.0
    recolour_share: float = 0.0

    def apply(self, ts: TrainingSet, crops: Crops) -> TrainingSet:
        pick, x_deg = degraded_copies(crops, self.share, self.defocus_max, self.recolour_share)
        if self.mode == "add":  # keep every clean crop and add the degraded ones
            return TrainingSet(np.concatenate([ts.x, x_deg]), np.concatenate([ts.y, crops.labels[pick]]))
        ts.x[pick] = x_deg  # ts.x starts with the training crops in split order
        return ts


def variants(config: TrainConfig) -> list[Variant]:
    """The variants a run's options ask for, in the order they apply."""
    out: list[Variant] = []
    if config.zoom_out:
        out.append(ZoomOut(*config.zoom_out))
    if config.degrade:
        out.append(Degrade(float(config.degrade), config.degrade_mode, float(config.degrade_defocus or 0.0),
                           float(config.degrade_recolour or 0.0)))
    return out


def extend(crops: Crops, chosen: list[Variant]) -> TrainingSet:
    """The training set: the crops themselves, then each variant in turn."""
    ts = TrainingSet(crops.images(), crops.labels.copy())
    for variant in chosen:
        ts = variant.apply(ts, crops)
    return ts


def degraded_copies(crops: Crops, share: float, defocus_max: float = 0.0,
                    recolour_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(indices, images): a seeded `share` of the training crops, re-decoded from their files,
    degraded like a lower-quality analyzer's export (train.degrade), optionally recoloured like
    another training crop (another stain), and framed again."""
    from concurrent.futures import ThreadPoolExecutor

    from batchwbc.engine.preprocess import decode_rgb, read_bytes, to_model_input

    from .degrade import colour_donors, degrade, lab_stats, random_params, recolour

    paths, root, size = crops.paths, crops.data_root, crops.size
    if not root.is_dir():
        raise TrainingError("--degrade needs the original image files; it cannot work from a packed file.")
    rng = np.random.default_rng(crops.seed + 7)
    pick = np.flatnonzero(rng.random(len(paths)) < share)
    params = random_params(rng, len(pick), defocus_max)
    # drawn after the earlier draws, so runs without recolouring reproduce the earlier ones
    donors = colour_donors(rng, len(pick), crops.sources or [], recolour_share)

    def one(k):
        rgb = decode_rgb(read_bytes(root / paths[pick[k]]))
        if donors[k] >= 0:  # the colour statistics of another whole training crop
            rgb = recolour(rgb, *lab_stats([decode_rgb(read_bytes(root / paths[donors[k]]))]))
        return to_model_input(degrade(rgb, *params[k]), size, crops.preprocessing)

    out = np.empty((len(pick), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(crops.workers or os.cpu_count() or 1) as pool:
        for k, arr in enumerate(pool.map(one, range(len(pick)))):
            out[k] = arr
    what = "scale, JPEG quality" + (f", defocus up to {defocus_max:g} px" if defocus_max > 0 else "")
    what += f", {int((donors >= 0).sum())} recoloured like other crops" if recolour_share > 0 else ""
    print(f"degraded {len(pick)} of {len(paths)} training crops ({what}) before framing")
    return pick, out
