"""`batchwbc info`: what a model file is (version, classes, input, thresholds, training summary).

Human-readable rows by default, the same facts as JSON with --json. The fallbacks it names (the
review threshold without one in the model, MANY_LOW_CONFIDENCE's default) are read from where the
run takes them, so the text cannot drift from what a run does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from batchwbc.engine.model_metadata import (KEY_ADAPTATION, KEY_BACKBONE, KEY_EMBEDDING_OUTPUT, KEY_TEST_METRICS,
                                            KEY_TRAINING_DATA)
from batchwbc.ops import exit_codes

if TYPE_CHECKING:
    from batchwbc.engine.model import Classifier

#: Metadata entries shown as they are stored, with their label.
METADATA_ROWS: tuple[tuple[str, str], ...] = (
    (KEY_BACKBONE, "Backbone"), (KEY_TRAINING_DATA, "Training data"), (KEY_TEST_METRICS, "Test metrics"),
    (KEY_ADAPTATION, "Adapted"), (KEY_EMBEDDING_OUTPUT, "Embedding output"),
)


@dataclass(frozen=True)
class InfoOptions:
    """What `batchwbc info` is asked to show."""

    model_path: Path | None = None  # None: the bundled model
    as_json: bool = False


def model_facts(clf: "Classifier") -> dict[str, Any]:
    """The model's facts for --json (stable keys: scripts read them)."""
    info = clf.info
    return {
        "path": str(info.path), "sha256": info.sha256, "model_version": info.model_version,
        "classes": list(info.classes), "input_size": info.input_size,
        "review_threshold": info.review_threshold, "review_share_pct": info.review_share_pct,
        "temperature": info.temperature, "preprocessing": info.preprocessing, "metadata": info.metadata,
    }


def info_rows(clf: "Classifier") -> list[tuple[str, str]]:
    """The model's facts as (label, text) rows for a person."""
    from batchwbc.core.flags import MANY_LOW_CONFIDENCE, rule_for
    from batchwbc.engine.pipeline import FALLBACK_REVIEW_THRESHOLD

    info, ood = clf.info, clf.ood
    share_default = rule_for(MANY_LOW_CONFIDENCE).default
    rows = [
        ("Model file", str(info.path)),
        ("SHA-256", info.sha256),
        ("Version", info.model_version),
        ("Input", f"{info.input_size}x{info.input_size} RGB uint8"),
        ("Classes", ", ".join(info.classes)),
        ("Review threshold", f"not set ({FALLBACK_REVIEW_THRESHOLD:g} is used)" if info.review_threshold is None
         else f"{info.review_threshold:g}"),
        ("Validation cells to review", f"not recorded ({MANY_LOW_CONFIDENCE} uses {share_default:g}%)"
         if info.review_share_pct is None else f"{info.review_share_pct:g}% ({MANY_LOW_CONFIDENCE}'s default threshold)"),
        ("Temperature", "not recorded" if info.temperature is None else f"{info.temperature:g}"),
        ("Preprocessing", info.preprocessing),
        ("Out-of-distribution", "none: no crop is labelled unclassified, no DATA_SHIFT" if ood is None else
         f"{ood.describe()}; unclassified above {ood.threshold:.4g}"
         + (f"; DATA_SHIFT above {100 * ood.shift.threshold:.1f}% (>= {ood.shift.min_cells} cells)"
            if ood.shift is not None else "")),
    ]
    rows.extend((label, info.metadata[key]) for key, label in METADATA_ROWS if key in info.metadata)
    return rows


def run_info(opts: InfoOptions, write: Callable[[str], None]) -> int:
    """Load the model and write its description; returns the exit code (a model that cannot be
    loaded raises run.JobError, exit code 2)."""
    from batchwbc.commands.run import load_classifier

    clf = load_classifier(str(opts.model_path) if opts.model_path else None, threads=1)
    if opts.as_json:
        write(json.dumps(model_facts(clf), indent=2))
        return exit_codes.OK
    rows = info_rows(clf)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        write(f"{k.ljust(width)}  {v}")
    return exit_codes.OK
