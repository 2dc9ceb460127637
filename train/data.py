"""Read, quality-filter and decode a labelled dataset once into uint8 arrays.

Decoding once (not per epoch) through the shared `batchwbc.engine.preprocess` functions is what
keeps training and runtime pixels identical and a CPU epoch fast.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchwbc.core import catalogue
from batchwbc.inputs.public_datasets import DatasetError, DatasetScan, read_any
from batchwbc.engine.preprocess import PREPROCESSING_ID, UnreadableImage, decode_rgb, read_bytes, to_model_input

from .quality import black_band_reason


@dataclass
class LoadedData:
    images: np.ndarray  # [n,S,S,3] uint8 RGB
    labels: np.ndarray  # [n] int, index into catalogue.CLASS_IDS
    sources: list[str]
    paths: list[str]  # relative to the data root, POSIX
    dropped: list[tuple[str, str]]  # (path, reason)
    scan: DatasetScan
    assigned_split: list[str] | None = None  # set when the data came from a packed file
    patients: list[str | None] | None = None  # patient per image where the layout records it (DeepAPL)


def _load_one(path: Path, size: int, preprocessing: str = PREPROCESSING_ID) -> tuple[np.ndarray | None, str | None]:
    try:
        rgb = decode_rgb(read_bytes(path))
    except UnreadableImage as exc:
        return None, f"unreadable: {exc}"
    reason = black_band_reason(rgb)
    if reason:
        return None, reason
    return to_model_input(rgb, size, preprocessing), None


def load(
    data_root: str | os.PathLike, size: int, workers: int = 0, limit_per_class: int = 0, seed: int = 0,
    preprocessing: str = PREPROCESSING_ID,
) -> LoadedData:
    """Scan `data_root` (any supported layout), decode every usable image at size x size."""
    root = Path(data_root)
    if root.suffix == ".npz" and root.is_file():
        from .packed import unpack

        images, labels, sources, paths, assigned, packed_with = unpack(root)
        if images.shape[1] != size:
            raise DatasetError(f"{root} holds {images.shape[1]}px crops, not {size}px; pack it again with --size {size}.")
        if packed_with != preprocessing:
            raise DatasetError(f"{root} was packed with preprocessing {packed_with}, not {preprocessing}; pack it again or pass --preprocessing {packed_with}.")
        scan = DatasetScan()
        return LoadedData(images, labels, sources, paths, [], scan, assigned)
    scan = read_any(root)
    items = sorted(scan.items, key=lambda it: it.path.as_posix())
    if limit_per_class:
        rng = np.random.default_rng(seed)
        keep = []
        by_class: dict[str, list] = {}
        for it in items:
            by_class.setdefault(it.class_id, []).append(it)
        for cid in sorted(by_class):
            group = by_class[cid]
            pick = sorted(rng.choice(len(group), size=min(limit_per_class, len(group)), replace=False))
            keep.extend(group[i] for i in pick)
        items = keep
    workers = workers or os.cpu_count() or 1
    images = np.empty((len(items), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(items), dtype=bool)
    dropped: list[tuple[str, str]] = []
    rel = [it.path.relative_to(root).as_posix() for it in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL while decoding
        for i, (arr, reason) in enumerate(pool.map(lambda it: _load_one(it.path, size, preprocessing), items)):
            if arr is None:
                dropped.append((rel[i], reason or "unknown"))
            else:
                images[i] = arr
                ok[i] = True
    keep_idx = np.flatnonzero(ok)
    return LoadedData(
        images=images[keep_idx],
        labels=np.array([catalogue.CLASS_IDS.index(items[i].class_id) for i in keep_idx], dtype=np.int64),
        sources=[items[i].source for i in keep_idx],
        paths=[rel[i] for i in keep_idx],
        dropped=dropped,
        scan=scan,
        patients=[items[i].patient for i in keep_idx],
    )


def count_table(labels: np.ndarray, sources: list[str]) -> str:
    """Counts per class and per source as a printable table."""
    srcs = sorted(set(sources))
    head = f"{'class':24s}" + "".join(f"{s:>10s}" for s in srcs) + f"{'total':>8s}"
    lines = [head, "-" * len(head)]
    lab = np.asarray(labels)
    src = np.asarray(sources)
    for k, cid in enumerate(catalogue.CLASS_IDS):
        row = [int(((lab == k) & (src == s)).sum()) for s in srcs]
        lines.append(f"{cid:24s}" + "".join(f"{n:>10d}" for n in row) + f"{sum(row):>8d}")
    tot = [int((src == s).sum()) for s in srcs]
    lines.append(f"{'total':24s}" + "".join(f"{n:>10d}" for n in tot) + f"{sum(tot):>8d}")
    return "\n".join(lines)
