"""Plain records passed from classification to reporting, so the two halves stay independent."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from batchwbc.engine.model_metadata import ModelInfo

#: Group name for images lying directly under the slides root (no patient folder).
#: Angle brackets cannot occur in Windows folder names, so it cannot collide with a patient.
ROOT_GROUP = "<root>"

#: Longest side of a review thumbnail in pixels, made by the pipeline and shown by the report
#: at this size: big enough to see a nucleus in a spreadsheet cell, small enough (~10-20 kB)
#: that thousands of review cells keep the workbook light.
THUMBNAIL_PX = 80


@dataclass(frozen=True)
class CellResult:
    patient: str
    file: str  # POSIX path relative to the slides root
    class_id: str  # a model class, or ood.UNCLASSIFIED (then never counted in the differential)
    confidence: float  # calibrated probability of class_id (of the model's best class when unclassified)
    second_class: str
    second_prob: float
    review: bool  # confidence below the review threshold, or an image that always needs review
    thumbnail_jpeg: bytes | None = None  # small JPEG of the model input, kept for review cells only
    review_reason: str = ""  # why it needs review, '; '-joined ('' when it does not)
    ood_score: float | None = None  # distance from the training cells (batchwbc.ood); None: model has no reference


@dataclass(frozen=True)
class FileError:
    patient: str
    file: str  # POSIX path relative to the slides root ('' for a whole-patient failure)
    reason: str  # one sentence a technologist understands


@dataclass
class RunData:
    root: str
    patients: list[str]  # every group found, in report order, empty ones included
    cells: list[CellResult]
    errors: list[FileError]
    model: ModelInfo
    review_threshold: float
    started: datetime
    finished: datetime
    tool_version: str
    ignored_files: int = 0  # hidden / non-image files skipped by discovery
    extra: dict[str, Any] = field(default_factory=dict)  # more Run-sheet rows (options, cache hits, ...); numbers stay numbers
    data_shift: Any = None  # data_shift.ShiftDecision for the whole run; None: not checked
