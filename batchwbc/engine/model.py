"""Loading a batchwbc ONNX model into onnxruntime: everything the runtime needs is in the file.

The metadata contract (keys, format version, validation, ModelInfo) lives in
`batchwbc.engine.model_metadata`, which imports nothing heavy; this module adds the inference session
and checks that the graph's input and output agree with the metadata.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Re-exported: the metadata contract lives in modelmeta (no heavy imports); callers that
# import these names from batchwbc.engine.model keep working.
from batchwbc.engine.model_metadata import (  # noqa: F401
    FORMAT_VERSION,
    KEY_BACKBONE,
    KEY_CLASSES,
    KEY_FORMAT,
    KEY_EMBEDDING_OUTPUT,
    KEY_INPUT_SIZE,
    KEY_MODEL_VERSION,
    KEY_PREPROCESSING,
    KEY_PREPROCESSING_DESC,
    KEY_REVIEW_THRESHOLD,
    KEY_TEMPERATURE,
    KEY_TEST_METRICS,
    KEY_TRAINING_DATA,
    REQUIRED_KEYS,
    ModelError,
    ModelInfo,
)
from batchwbc.engine.model_metadata import parse_metadata as _parse_metadata
from batchwbc.engine.preprocess import PREPROCESSING_DESCRIPTIONS
from batchwbc.ops.provenance import sha256_of

DEFAULT_MODEL_PATH = Path(__file__).parent.parent / "models" / "batchwbc-wbc13.onnx"  # batchwbc/models/


def parse_metadata(meta: dict[str, str], path: Path, sha256: str) -> ModelInfo:
    """modelmeta.parse_metadata against the preprocessing contracts this runtime provides."""
    return _parse_metadata(meta, path, sha256, PREPROCESSING_DESCRIPTIONS)


class Classifier:
    """An onnxruntime session over a validated batchwbc model."""

    def __init__(self, path: str | os.PathLike | None = None, threads: int = 0, spinning: bool = True):
        """spinning=False stops idle onnxruntime threads from busy-waiting between operators:
        the runtime shares the CPU with decode workers, and spinning threads steal it from them
        (measured in docs/performance.md)."""
        import onnxruntime as ort

        from batchwbc.ops.ort_quiet import quiet_session_options

        p = Path(path) if path is not None else DEFAULT_MODEL_PATH
        if not p.is_file():
            raise ModelError(f"model file {p} does not exist.")
        try:
            sha = sha256_of(p)
        except OSError as exc:
            raise ModelError(f"model file {p} cannot be read ({exc.strerror or exc}).") from None
        opts = quiet_session_options()  # batchwbc.ops.ort_quiet: nothing from onnxruntime on stderr
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
        emb = meta.get(KEY_EMBEDDING_OUTPUT)
        self.embedding_output: str | None = emb if emb in {o.name for o in outputs[1:]} else None
        # The out-of-distribution reference (batchwbc.ood), when the file carries one.
        from batchwbc.engine import ood

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
        """(probabilities, OOD score per crop, verdict per crop: 0 = classified, else why it is
        unclassified as ood.BY_EMBEDDING / ood.BY_COLOUR bits); the last two are None for a model
        without an OOD reference, which then costs nothing extra. The batch itself is what the
        reference's stain-colour envelope, when it has one, looks at."""
        if self.ood is None:
            return self.predict(batch), None, None
        from batchwbc.engine import ood

        probs, emb = self.predict_with_embedding(batch)
        scores, verdicts = ood.verdicts(self.ood, emb, batch)
        return probs, scores, verdicts
