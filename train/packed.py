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


def pack(data_root: Path, split_csv: Path, out: Path, size: int, quality: int, splits=("train", "val"),
         preprocessing: str | None = None) -> int:
    import cv2

    preprocessing = preprocessing or PREPROCESSING_ID
    rows = evalkit.split_rows(split_csv, splits)
    blobs, labels, sources, paths, assign = [], [], [], [], []
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    for r, rgb in zip(rows, evalkit.iter_inputs(data_root, rows, size, preprocessing)):
        ok, enc = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise PackError(f"OpenCV could not JPEG-encode the crop {r['path']}.")
        blobs.append(enc.tobytes())
        labels.append(catalogue.CLASS_IDS.index(r["class_id"]))
        sources.append(r["source"])
        paths.append(r["path"])
        assign.append(r["split"])
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(out, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.array(labels),
             sources=np.array(sources), paths=np.array(paths), split=np.array(assign), size=np.array(size),
             preprocessing=np.array(preprocessing))
    return len(rows)


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
@contract(PREPROCESSING_ID, "Preprocessing contract, as for python -m train.")
def main(data_root, split_csv, out, size, quality, preprocessing):
    try:
        n = pack(Path(data_root), Path(split_csv), Path(out), size, quality, preprocessing=preprocessing)
    except PackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(USAGE)
    click.echo(f"packed {n} images into {out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
