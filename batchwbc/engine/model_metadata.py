"""What a batchwbc ONNX file says about itself: the metadata keys, their validation, ModelInfo.

These names are the contract between `export/` (which writes them) and the runtime (which
refuses a file that lacks them), so a model can never be run with the wrong class order,
input size or preprocessing (ADR 0002). The module imports nothing heavy (no numpy,
onnxruntime, OpenCV or `batchwbc.engine.preprocess`): the report, the results records and export
can name a model without loading an inference stack.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchwbc.core import catalogue

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
KEY_REVIEW_SHARE = "batchwbc.review_share_pct"  # % of validation cells below the review threshold
KEY_TRAINING_DATA = "batchwbc.training_data"  # JSON summary
KEY_TEST_METRICS = "batchwbc.test_metrics"  # JSON summary
KEY_BACKBONE = "batchwbc.backbone"
KEY_EMBEDDING_OUTPUT = "batchwbc.embedding_output"  # name of the second output: the last layer's input
KEY_EMBEDDING_DIM = "batchwbc.embedding_dim"
KEY_ADAPTATION = "batchwbc.adaptation"  # provenance of a model refitted by `batchwbc adapt` (JSON)
KEY_NUMERIC_FORMAT = "batchwbc.numeric_format"  # float32 or int8, and why (written by export, for audit)
#: `batchwbc adapt` names the model it writes PARENT_VERSION + this + date and file hash; the
#: report's warnings read it (from the version the run record keeps) to name the right next step.
ADAPTED_VERSION_MARKER = "+adapted-"


def is_adapted_version(model_version: str) -> bool:
    """True for the version of a model written by `batchwbc adapt` (pure)."""
    return ADAPTED_VERSION_MARKER in (model_version or "")

REQUIRED_KEYS = (KEY_FORMAT, KEY_CLASSES, KEY_INPUT_SIZE, KEY_PREPROCESSING, KEY_MODEL_VERSION)

#: Accepted model input edge in pixels; anything outside is a corrupt or foreign file.
MIN_INPUT_SIZE = 16
MAX_INPUT_SIZE = 1024


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
    review_share_pct: float | None = None  # MANY_LOW_CONFIDENCE's default threshold (config.with_model_defaults)

    def json_field(self, key: str) -> Any:
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw


def _class_list(raw: str) -> list[str] | None:
    """The class ids of KEY_CLASSES, or None unless it is a non-empty JSON list of strings."""
    try:
        classes = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return None
    return classes


def _input_size(raw: str) -> int | None:
    """The input edge of KEY_INPUT_SIZE, or None unless it is a whole number in range."""
    try:
        size = int(raw)
    except ValueError:
        return None
    return size if MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE else None


def parse_metadata(meta: dict[str, str], path: Path, sha256: str, preprocessings: Collection[str]) -> ModelInfo:
    """Validate metadata_props and turn them into a ModelInfo (pure; raises ModelError).

    `preprocessings` are the preprocessing ids this runtime can feed (the keys of
    preprocess.PREPROCESSING_DESCRIPTIONS); they are passed in so this module stays free of
    the image stack.
    """
    name = path.name
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{name} is not a batchwbc model: its metadata lacks {', '.join(missing)}.")
    if meta[KEY_FORMAT] != FORMAT_VERSION:
        raise ModelError(f"{name} uses model format {meta[KEY_FORMAT]!r}; this batchwbc reads format {FORMAT_VERSION}.")
    classes = _class_list(meta[KEY_CLASSES])
    if classes is None:
        raise ModelError(f"{name} has an unreadable class list in its metadata.")
    unknown = [c for c in classes if not catalogue.is_known(c)]
    if unknown:
        raise ModelError(f"{name} predicts classes that batchwbc does not know: {', '.join(unknown)}.")
    if len(set(classes)) != len(classes):
        raise ModelError(f"{name} lists a class twice in its metadata.")
    size = _input_size(meta[KEY_INPUT_SIZE])
    if size is None:
        raise ModelError(f"{name} has an invalid input size {meta[KEY_INPUT_SIZE]!r} in its metadata.")
    if meta[KEY_PREPROCESSING] not in preprocessings:
        raise ModelError(
            f"{name} expects preprocessing {meta[KEY_PREPROCESSING]!r}, which this batchwbc does not provide "
            f"(it provides {', '.join(sorted(preprocessings))})."
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
        review_share_pct=_float(KEY_REVIEW_SHARE),
    )
