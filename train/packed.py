"""Pack the train/val part of a split into one compact file, for training on another machine.

A GPU machine lent for a few minutes cannot see ../shared, and the decoded uint8 arrays are
~0.5 GB. The packed file holds the crops *after* the shared preprocessing (SxS RGB), JPEG
re-encoded (4:4:4, quality 90: mean absolute pixel error ~2.5/255, below the colour jitter
used in training). Test images are never packed, and final calibration and evaluation are
always recomputed from the original files with the exact runtime preprocessing.

    python -m train.packed --data ../shared/data --split runs/NAME/split.csv --out pack.npz
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from batchwbc.core import catalogue
from batchwbc.ops.exit_codes import USAGE
from batchwbc.engine.preprocess import PREPROCESSING_ID, PREPROCESSING_WHOLE

from . import evalkit
from .options import contract, data_folder, split_csv


class PackError(Exception):
    """A crop that cannot be packed; str is one sentence (the CLI prints it and exits 2)."""


ENCODINGS = ("jpeg", "webp")


def encode(rgb: np.ndarray, encoding: str, quality: int, name: str = "a crop") -> bytes:
    """One crop as JPEG (4:4:4) or WebP bytes. Measured on 300 crops at 144 px: JPEG 4:4:4
    quality 90, 7.6 kB and a mean pixel error of 1.8/255; WebP quality 90, 4.0 kB and 2.4/255;
    WebP 85 about 3.2 kB. WebP makes a whole training set fit one trip to a lent GPU machine,
    but it stores colour at half resolution (ADR 0013: train on it, then polish on originals)."""
    import cv2

    if encoding == "webp":
        ext, params = ".webp", [cv2.IMWRITE_WEBP_QUALITY, quality]
    elif encoding == "jpeg":
        ext, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    else:
        raise PackError(f"unknown encoding {encoding!r} (choose {' or '.join(ENCODINGS)}).")
    ok, enc = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise PackError(f"OpenCV could not {encoding}-encode the crop {name}.")
    return enc.tobytes()


def write(out: Path, images: np.ndarray, labels, sources: list[str], paths: list[str], split: list[str], preprocessing: str,
          encoding: str = "webp", quality: int = 90, note: str = "") -> int:
    """Write crops (uint8 [n,S,S,3], already through the shared preprocessing) and their rows
    into one .npz that `unpack` (and `python -m train --data FILE.npz`) reads."""
    if not len(images) == len(labels) == len(sources) == len(paths) == len(split):
        raise PackError("the crops and their labels, sources, paths and splits differ in number.")
    blobs = [encode(rgb, encoding, quality, p) for rgb, p in zip(images, paths)]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(out, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.asarray(labels),
             sources=np.array(sources), paths=np.array(paths), split=np.array(split), size=np.array(images.shape[1]),
             preprocessing=np.array(preprocessing), note=np.array(note))
    return len(images)


def pack(data_root: Path, split_csv: Path, out: Path, size: int, quality: int, splits=("train", "val"),
         preprocessing: str | None = None, encoding: str = "jpeg") -> int:
    """Pack the rows of a split CSV (its train and val rows), decoded with the shared preprocessing."""
    preprocessing = preprocessing or PREPROCESSING_ID
    rows = evalkit.split_rows(split_csv, splits)
    images = np.empty((len(rows), size, size, 3), np.uint8)
    for i, rgb in enumerate(evalkit.iter_inputs(data_root, rows, size, preprocessing)):
        images[i] = rgb
    return write(out, images, [catalogue.CLASS_IDS.index(r["class_id"]) for r in rows], [r["source"] for r in rows],
                 [r["path"] for r in rows], [r["split"] for r in rows], preprocessing, encoding, quality)


def unpack(path: Path):
    """-> (images uint8 [n,S,S,3], labels, sources, paths, split, preprocessing id)."""
    import cv2

    z = np.load(path)
    buf, off = z["jpeg"], z["offsets"]
    size = int(z["size"])
    images = np.empty((len(off) - 1, size, size, 3), np.uint8)
    for i in range(len(off) - 1):
        images[i] = cv2.cvtColor(cv2.imdecode(buf[off[i] : off[i + 1]], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return images, z["labels"].astype(np.int64), [str(s) for s in z["sources"]], [str(p) for p in z["paths"]], [str(s) for s in z["split"]], \
        (str(z["preprocessing"]) if "preprocessing" in z.files else PREPROCESSING_WHOLE)  # packed before v2 existed


@click.command(context_settings={"show_default": True})
@data_folder
@split_csv
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@click.option("--size", type=int, default=128)
@click.option("--quality", type=int, default=85)
@click.option("--encoding", type=click.Choice(ENCODINGS), default="jpeg", help="webp: about half the size at the same pixel error.")
@contract(PREPROCESSING_ID, "Preprocessing contract, as for python -m train.")
def main(data_root, split_csv, out, size, quality, encoding, preprocessing):
    try:
        n = pack(Path(data_root), Path(split_csv), Path(out), size, quality, preprocessing=preprocessing, encoding=encoding)
    except PackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(USAGE)
    click.echo(f"packed {n} images into {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
