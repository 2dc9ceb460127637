"""One evaluation kit: a split's rows, decoded under a contract, predicted in batches.

Why one: the experiments, the robustness guard, the packer and the exporter each used to pick
split rows, decode them and predict in batches their own way, and the experiments borrowed
the exporter's loader (an import loop: export imports train). Every evaluation now decodes
through the runtime's own `batchwbc.engine.preprocess` functions here, so a number measured by an
experiment, by `train.robustness` or by the export's parity check is measured on the same
pixels the runtime would see. `export` imports this module; `train` never imports `export`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from batchwbc.core import catalogue
from batchwbc.engine.preprocess import CELL_MARGIN, decode_rgb, read_bytes, to_model_input

Row = dict[str, str]  # a split CSV row: path (relative to the data root), class_id, source, split


def split_rows(split_csv: str | os.PathLike, which: str | Iterable[str]) -> list[Row]:
    """The rows of a split CSV (a run's split.csv, docs/model/test-split.csv) in one or more
    splits ('train', 'val', 'test'), in file order."""
    from .split import read_split_csv

    wanted = {which} if isinstance(which, str) else set(which)
    return [r for r in read_split_csv(Path(split_csv)) if r["split"] in wanted]


def labels(rows: Sequence[Row], classes: Sequence[str] = catalogue.CLASS_IDS) -> np.ndarray:
    """Each row's class as an index into `classes` (the catalogue, or a model's own list)."""
    return np.array([list(classes).index(r["class_id"]) for r in rows], dtype=np.int64)


def decode_raw(data_root: str | os.PathLike, rows: Sequence[Row]) -> list[np.ndarray]:
    """Each row's crop decoded to RGB, not yet framed: for questions that alter the crop
    first (a worse analyzer, another stain, another magnification) and frame it afterwards."""
    root = Path(data_root)
    return [decode_rgb(read_bytes(root / r["path"])) for r in rows]


def frame(images: Iterable[np.ndarray], size: int, contract: str, margin: float = CELL_MARGIN) -> np.ndarray:
    """Decoded RGB crops -> uint8 [n, size, size, 3] model inputs under `contract`."""
    out = [to_model_input(im, size, contract, margin) for im in images]
    return np.stack(out) if out else np.empty((0, size, size, 3), np.uint8)


def iter_inputs(data_root: str | os.PathLike, rows: Sequence[Row], size: int, contract: str,
                margin: float = CELL_MARGIN) -> Iterator[np.ndarray]:
    """Each row's model input, one at a time (what the packer streams without holding them all)."""
    root = Path(data_root)
    for r in rows:
        yield to_model_input(decode_rgb(read_bytes(root / r["path"])), size, contract, margin)


def decode_rows(data_root: str | os.PathLike, rows: Sequence[Row], size: int, contract: str,
                margin: float = CELL_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 model inputs, catalogue labels) for `rows`, decoded exactly as the runtime's
    `prepare_file` does; `margin` only for the framing experiment."""
    x = list(iter_inputs(data_root, rows, size, contract, margin))
    return (np.stack(x) if x else np.empty((0, size, size, 3), np.uint8)), labels(rows)


def predict(model, x: np.ndarray, batch: int = 128) -> np.ndarray:
    """Model outputs for uint8 inputs `x`, `batch` crops at a time.

    `model` is a Keras core (float 0..255 in, logits out), an onnxruntime InferenceSession or a
    `batchwbc.engine.model.Classifier` (uint8 in, calibrated probabilities out); which one is told
    by what it offers, so this module imports neither TensorFlow nor onnxruntime.
    """
    if hasattr(model, "get_inputs") and hasattr(model, "run"):  # onnxruntime.InferenceSession
        name = model.get_inputs()[0].name
        parts = [model.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    elif hasattr(model, "info") and hasattr(model, "predict"):  # batchwbc Classifier
        parts = [model.predict(x[i : i + batch]) for i in range(0, len(x), batch)]
    else:  # a Keras model
        return model.predict(x.astype(np.float32), batch_size=batch, verbose=0)
    if not parts:
        raise ValueError("no crops to predict")
    return np.concatenate(parts)
