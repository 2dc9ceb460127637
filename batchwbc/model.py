"""Loading and validating a batchwbc ONNX model: everything the runtime needs is in the file.

The metadata keys defined here are the contract between `export/` (which writes them) and
the runtime (which refuses a file that lacks them), so a model can never be run with the
wrong class order, input size or preprocessing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import catalogue
from .preprocess import PREPROCESSING_DESCRIPTIONS

FORMAT_VERSION = "1"

# metadata_props keys
KEY_FORMAT = "batchwbc.format_version"
KEY_CLASSES = "batchwbc.classes"  # JSON list of class ids, in output order
KEY_INPUT_SIZE = "batchwbc.input_size"  # int S of the [N,S,S,3] uint8 input
KEY_PREPROCESSING = "batchwbc.preprocessing"  # one of preprocess.PREPROCESSING_DESCRIPTIONS
KEY_PREPROCESSING_DESC = "batchwbc.preprocessing_description"
KEY_TEMPERATURE = "batchwbc.temperature"  # already applied in the graph; recorded for audit
KEY_MODEL_VERSION = "batchwbc.model_version"
KEY_REVIEW_THRESHOLD = "batchwbc.review_threshold"  # default confidence cut-off, from validation data
KEY_TRAINING_DATA = "batchwbc.training_data"  # JSON summary
KEY_TEST_METRICS = "batchwbc.test_metrics"  # JSON summary
KEY_BACKBONE = "batchwbc.backbone"

REQUIRED_KEYS = (KEY_FORMAT, KEY_CLASSES, KEY_INPUT_SIZE, KEY_PREPROCESSING, KEY_MODEL_VERSION)

DEFAULT_MODEL_PATH = Path(__file__).parent / "models" / "batchwbc-wbc12.onnx"


class ModelError(Exception):
    """A model file that cannot be used; str(exc) is one sentence for the user."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    classes: tuple[str, ...]
    input_size: int
    model_version: str
    temperature: float | None
    review_threshold: float | None
    preprocessing: str
    metadata: dict[str, str] = field(repr=False)

    def json_field(self, key: str) -> Any:
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def parse_metadata(meta: dict[str, str], path: Path, sha256: str) -> ModelInfo:
    """Validate metadata_props and turn them into a ModelInfo (pure; raises ModelError)."""
    name = path.name
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{name} is not a batchwbc model: its metadata lacks {', '.join(missing)}.")
    if meta[KEY_FORMAT] != FORMAT_VERSION:
        raise ModelError(f"{name} uses model format {meta[KEY_FORMAT]!r}; this batchwbc reads format {FORMAT_VERSION}.")
    try:
        classes = json.loads(meta[KEY_CLASSES])
        assert isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
    except (ValueError, AssertionError):
        raise ModelError(f"{name} has an unreadable class list in its metadata.") from None
    unknown = [c for c in classes if not catalogue.is_known(c)]
    if unknown:
        raise ModelError(f"{name} predicts classes that batchwbc does not know: {', '.join(unknown)}.")
    if len(set(classes)) != len(classes):
        raise ModelError(f"{name} lists a class twice in its metadata.")
    try:
        size = int(meta[KEY_INPUT_SIZE])
        assert 16 <= size <= 1024
    except (ValueError, AssertionError):
        raise ModelError(f"{name} has an invalid input size {meta[KEY_INPUT_SIZE]!r} in its metadata.") from None
    if meta[KEY_PREPROCESSING] not in PREPROCESSING_DESCRIPTIONS:
        raise ModelError(
            f"{name} expects preprocessing {meta[KEY_PREPROCESSING]!r}, which this batchwbc does not provide "
            f"(it provides {', '.join(sorted(PREPROCESSING_DESCRIPTIONS))})."
        )

    def _float(key: str) -> float | None:
        try:
            return float(meta[key]) if key in meta else None
        except ValueError:
            raise ModelError(f"{name} has a non-numeric {key} in its metadata.") from None

    return ModelInfo(
        path=path,
        sha256=sha256,
        classes=tuple(classes),
        input_size=size,
        model_version=meta[KEY_MODEL_VERSION],
        temperature=_float(KEY_TEMPERATURE),
        review_threshold=_float(KEY_REVIEW_THRESHOLD),
        preprocessing=meta[KEY_PREPROCESSING],
        metadata=dict(meta),
    )


class Classifier:
    """An onnxruntime session over a validated batchwbc model."""

    def __init__(self, path: str | os.PathLike | None = None, threads: int = 0, spinning: bool = True):
        """spinning=False stops idle onnxruntime threads from busy-waiting between operators:
        the runtime shares the CPU with decode workers, and spinning threads steal it from them
        (measured in docs/performance.md)."""
        import onnxruntime as ort

        p = Path(path) if path is not None else DEFAULT_MODEL_PATH
        if not p.is_file():
            raise ModelError(f"model file {p} does not exist.")
        try:
            sha = file_sha256(p)
        except OSError as exc:
            raise ModelError(f"model file {p} cannot be read ({exc.strerror or exc}).") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise ModelError(f"{p.name} is not a valid ONNX model (corrupt, truncated or another format).") from None
        meta = dict(sess.get_modelmeta().custom_metadata_map)
        info = parse_metadata(meta, p, sha)
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise ModelError(f"{p.name} does not take one uint8 [N,S,S,3] image tensor as input.")
        shape = inputs[0].shape
        if any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (info.input_size, info.input_size, 3))):
            raise ModelError(f"{p.name} has input shape {shape}, which disagrees with its metadata size {info.input_size}.")
        if len(outputs) < 1 or len(outputs[0].shape) != 2:
            raise ModelError(f"{p.name} does not return an [N, classes] probability tensor.")
        n_out = outputs[0].shape[1]
        if isinstance(n_out, int) and n_out != len(info.classes):
            raise ModelError(f"{p.name} returns {n_out} scores but its metadata lists {len(info.classes)} classes.")
        self.info = info
        self._sess = sess
        self._input = inputs[0].name
        self._output = outputs[0].name
        # Set when the file exposes its last layer's input (onnxgraph.add_embedding_output).
        emb = meta.get("batchwbc.embedding_output")
        self.embedding_output: str | None = emb if emb in {o.name for o in outputs[1:]} else None
        # The out-of-distribution reference (batchwbc.ood), when the file carries one.
        from . import ood

        try:
            self.ood = ood.from_metadata(meta)
        except ood.OodReferenceError as exc:
            raise ModelError(f"{p.name}: {exc}") from None
        if self.ood is not None:
            widths = {o.name: o.shape[1] for o in outputs if len(o.shape) == 2}
            width = widths.get(self.ood.embedding_output, -1)
            if self.embedding_output != self.ood.embedding_output or (isinstance(width, int) and width != self.ood.dim):
                raise ModelError(f"{p.name} carries an out-of-distribution reference but no matching embedding output.")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [N,S,S,3] RGB -> float32 [N, classes] calibrated probabilities."""
        if batch.dtype != np.uint8:
            raise ValueError("model input must be uint8")
        (probs,) = self._sess.run([self._output], {self._input: batch})
        return np.asarray(probs, dtype=np.float32)

    def predict_with_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, embeddings [N, D]) in one pass; `batchwbc adapt` needs both.
        `predict` keeps requesting the probabilities only, so a nightly run pays nothing."""
        if batch.dtype != np.uint8:
            raise ValueError("model input must be uint8")
        if self.embedding_output is None:
            raise ModelError(f"{self.info.path.name} has no embedding output; add it with "
                             f"`python -m export.embedding {self.info.path} --out NEW.onnx`.")
        probs, emb = self._sess.run([self._output, self.embedding_output], {self._input: batch})
        return np.asarray(probs, dtype=np.float32), np.asarray(emb, dtype=np.float32)

    def predict_scored(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(probabilities, OOD score per crop, unclassified yes/no per crop); the last two are
        None for a model without an OOD reference, which then costs nothing extra."""
        if self.ood is None:
            return self.predict(batch), None, None
        from . import ood

        probs, emb = self.predict_with_embedding(batch)
        scores, flagged = ood.score_and_flag(self.ood, emb)
        return probs, scores, flagged
