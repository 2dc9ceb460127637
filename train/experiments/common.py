"""What the experiments share: loading a Keras core, decoding a split for it, scoring logits,
and test-time views."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from batchwbc.core import catalogue
from batchwbc.engine.preprocess import CELL_MARGIN

from .. import evalkit
from ..config import resolve_preprocessing


def load_keras(path: str):
    """A saved core (model.keras), without its training configuration."""
    import keras

    import train.layers  # noqa: F401 - custom layers

    return keras.saving.load_model(path, compile=False)


def split_data(data_root: str, split_csv: str, size: int, splits: Sequence[str], model_path: str,
               margin: float = CELL_MARGIN) -> dict[str, tuple[np.ndarray, np.ndarray, list[dict]]]:
    """{split: (uint8 inputs, labels, rows)} for those rows of a split CSV, decoded with the
    contract the model was trained with (its run.json)."""
    contract = resolve_preprocessing(None, model_path)
    out = {}
    for k in splits:
        rows = evalkit.split_rows(split_csv, k)
        x, y = evalkit.decode_rows(data_root, rows, size, contract, margin)
        out[k] = (x, y, rows)
    return out


def predict(model, x: np.ndarray) -> np.ndarray:
    """Logits of a Keras core, 128 crops at a time."""
    return evalkit.predict(model, x, 128)


def accuracy_line(logits: np.ndarray, y: np.ndarray) -> str:
    """'accuracy A, paper-10 B': over all classes and over cells of the paper's ten classes."""
    p = logits.argmax(1)
    paper = y < len(catalogue.PAPER_CLASS_IDS)
    return f"accuracy {np.mean(p == y):.4f}, paper-10 {np.mean(p[paper] == y[paper]):.4f}"


def views(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Logits of the crop, of its horizontal flip and of its three quarter turns."""
    return predict(model, x), predict(model, x[:, :, ::-1]), [predict(model, np.rot90(x, k, axes=(1, 2))) for k in (1, 2, 3)]


def dihedral_logits(model, x: np.ndarray, n_views: int) -> np.ndarray:
    """Mean logits over the crop (n_views=1) or its eight flips and quarter turns (n_views=8)."""
    if n_views == 1:
        return predict(model, x)
    out = [predict(model, np.ascontiguousarray(np.rot90(xf, k, axes=(1, 2))))
           for xf in (x, x[:, :, ::-1]) for k in range(4)]
    return np.mean(out, axis=0)
