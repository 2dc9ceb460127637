"""A tiny ONNX model honouring the batchwbc contract, for tests that must not need TensorFlow.

It classifies by mean colour: a linear map from the per-channel mean (scaled to 0..1) to
logits, then softmax. With `colour_classes`, a crop filled with one of the returned colours is
predicted as that class with high confidence, so tests know the right answer in advance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from batchwbc.core import catalogue
from batchwbc.engine import model as bm
from batchwbc.engine.preprocess import PREPROCESSING_DESCRIPTION, PREPROCESSING_ID

# Distinct, saturated colours; class k is predicted for colour COLOURS[k].
COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 0), (128, 0, 128), (0, 128, 128),
    (255, 128, 0),
]


def colour_for(class_id: str, classes=catalogue.CLASS_IDS) -> tuple[int, int, int]:
    return COLOURS[list(classes).index(class_id)]


def build(
    path: str | Path,
    size: int = 32,
    classes=catalogue.CLASS_IDS,
    sharpness: float = 40.0,
    metadata: dict[str, str] | None = None,
    drop_keys: tuple[str, ...] = (),
) -> Path:
    """Write the tiny model to `path` and return it."""
    k = len(classes)
    cols = np.array([COLOURS[i] for i in range(k)], dtype=np.float32) / 255.0  # [k,3]
    # logit_j = -sharpness * ||m - c_j||^2 = sharpness*(2 m.c_j - |c_j|^2) - sharpness*|m|^2 (last term drops in softmax)
    w = (2.0 * sharpness * cols.T).astype(np.float32)  # [3,k]
    b = (-sharpness * (cols**2).sum(axis=1)).astype(np.float32)  # [k]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf", "axes"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "scale"], ["ms"]),
        helper.make_node("MatMul", ["ms", "W"], ["mw"]),
        helper.make_node("Add", ["mw", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.flatten().tolist()),
        helper.make_tensor("B", TensorProto.FLOAT, [k], b.tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_batchwbc",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", k])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="batchwbc-tests")
    m.ir_version = 9
    meta = {
        bm.KEY_FORMAT: bm.FORMAT_VERSION,
        bm.KEY_CLASSES: json.dumps(list(classes)),
        bm.KEY_INPUT_SIZE: str(size),
        bm.KEY_PREPROCESSING: PREPROCESSING_ID,
        bm.KEY_PREPROCESSING_DESC: PREPROCESSING_DESCRIPTION,
        bm.KEY_TEMPERATURE: "1.0",
        bm.KEY_MODEL_VERSION: "tiny-test-1",
        bm.KEY_REVIEW_THRESHOLD: "0.6",
        bm.KEY_TRAINING_DATA: json.dumps({"note": "synthetic test model"}),
        bm.KEY_TEST_METRICS: json.dumps({}),
    }
    meta.update(metadata or {})
    for key in drop_keys:
        meta.pop(key, None)
    onnx.helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    path = Path(path)
    onnx.save(m, str(path))
    return path


#: The tiny model's embedding is its per-channel mean colour scaled to 0..1 (the input of its
#: only dense layer); a pale, red-cell-like colour stands in for "background".
BACKGROUND_COLOUR = (242, 228, 214)


def build_with_ood(path: str | Path, classes=catalogue.CLASS_IDS, size: int = 32, seed: int = 0, **kw) -> Path:
    """The tiny model with an embedding output and an OOD / DATA_SHIFT reference fitted, as
    `python -m export.ood_reference` does, on jittered class colours (training cells), pale
    crops (background corners) and a disjoint jittered sample (held-out cells)."""
    from export import ood_reference
    from batchwbc.engine.onnx_graph import add_embedding_output

    path = Path(build(path, size=size, classes=classes, **kw))
    onnx.save(add_embedding_output(onnx.load(str(path))), str(path))
    rng = np.random.default_rng(seed)
    cols = np.array([COLOURS[i] for i in range(len(classes))], dtype=np.float32) / 255.0

    def sample(n_per_class):
        emb = np.concatenate([c + rng.normal(0, 0.01, (n_per_class, 3)) for c in cols]).astype(np.float32)
        return emb, [c for c in classes for _ in range(n_per_class)]

    ref_emb, ref_labels = sample(40)
    held_emb, held_labels = sample(30)
    bg = (np.array(BACKGROUND_COLOUR, np.float32) / 255.0 + rng.normal(0, 0.01, (60, 3))).astype(np.float32)
    ref = ood_reference.fit_with_thresholds(ref_emb, ref_labels, bg, held_emb, held_labels, ["tiny"] * len(held_emb),
                                            np.random.default_rng(seed + 1), k=3, quantile=0.999)
    ood_reference.write(path, ref, path)
    return path
