"""`batchwbc evaluate`: classify a lab's verified crops exactly as a run would and report the
agreement.

The crops go through the run's own Pipeline (decode workers, the model's recorded
preprocessing contract, batched onnxruntime), so the numbers describe what `batchwbc run`
would have said about these cells - not a second, subtly different decoder. Everything that
can make the evaluation pointless (outputs, model, the labelled folder) is checked before the
first crop is decoded. Exit codes: 0 evaluated, 1 failed (nothing written), 2 usage (bad
folder, model or output), 3 written but some crops were unreadable, 130 interrupted.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from batchwbc import __version__
from batchwbc.ops import exit_codes

if TYPE_CHECKING:  # results -> model imports numpy; `batchwbc --help` stays light
    from batchwbc.core.records import FileError
    from batchwbc.core.agreement import Evaluation
    from batchwbc.inputs.labelled_folders import LabelledSet
    from batchwbc.engine.model import Classifier, ModelInfo

log = logging.getLogger("batchwbc")


@dataclass
class LabelledPredictions:
    """One entry per crop that could be classified, in the labelled folder's order."""

    true_ids: list[str] = field(default_factory=list)
    pred_ids: list[str] = field(default_factory=list)  # the run's answer: a class, or ood.UNCLASSIFIED
    guess_ids: list[str] = field(default_factory=list)  # the model's best class, also for an unclassified crop
    confidence: list[float] = field(default_factory=list)
    patients: list[str | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # relative to the labelled folder
    errors: "list[FileError]" = field(default_factory=list)  # unreadable crops (patient = class folder)
    unclassified: int = 0  # crops beyond the model's OOD reference: abstentions, as in a run


@dataclass
class EvaluationRun:
    """What the report shows besides the metrics: where the numbers come from."""

    labelled_root: str
    model: "ModelInfo"
    started: datetime
    finished: datetime
    tool_version: str
    found: Counter  # class id -> crops found
    unknown_folders: Counter  # folder name -> crops skipped
    skipped: Counter  # reason -> files skipped (hidden, not an image)
    errors: "list[FileError]"
    extra: dict[str, str] = field(default_factory=dict)


def check_labelled(labelled: "LabelledSet", root: Path) -> None:
    """Refuse a folder that cannot give a meaningful evaluation (raises run.JobError, exit 2)."""
    from batchwbc.commands.run import JobError

    counts = labelled.class_counts()
    if not counts:
        hint = (f" (only folders that are not classes of the model: {', '.join(sorted(labelled.unknown_folders))})"
                if labelled.unknown_folders else "")
        raise JobError(exit_codes.USAGE, f"no labelled crops found in {root}{hint}; it needs one sub-folder per class id "
                                     "of the model (as `batchwbc info` lists them) holding the verified crops.")
    if len(counts) < 2:
        (only,) = counts
        raise JobError(exit_codes.USAGE, f"every labelled crop in {root} is of one class ({only}); an evaluation needs "
                                     "verified cells of at least two classes.")


def predict_labelled(labelled: "LabelledSet", root: Path, classifier: "Classifier", workers: int,
                     batch_size: int, progress=None) -> LabelledPredictions:
    """Classify every labelled crop through the run's Pipeline; unreadable crops are listed."""
    from batchwbc.inputs.slide_folders import Crop
    from batchwbc.engine.pipeline import Pipeline
    from batchwbc.core.records import FileError

    crops, by_rel = [], {}
    for item in labelled.items:
        rel = Path(item.path).relative_to(root).as_posix()
        crops.append(Crop(item.patient or "", rel, str(item.path)))
        by_rel[rel] = item
    # threshold 0: nothing is "for review" inside the pipeline, so it makes no thumbnails;
    # the review trade-off is computed from the confidences afterwards.
    pipe = Pipeline(classifier.info.input_size, classifier, 0.0, workers=workers, batch_size=batch_size,
                    progress=progress)
    result = pipe.run(crops)
    from batchwbc.engine.ood import UNCLASSIFIED

    out = LabelledPredictions()
    for cell in result.cells:
        item = by_rel[cell.file]
        out.true_ids.append(item.class_id)
        # An unclassified crop keeps the model's best class as its second class (pipeline). The
        # primary metrics judge the run's answer (an abstention, in no count of the report); the
        # best class feeds only the classifier-only view and the calibration.
        unclassified = cell.class_id == UNCLASSIFIED
        out.unclassified += unclassified
        out.pred_ids.append(cell.class_id)
        out.guess_ids.append(cell.second_class if unclassified else cell.class_id)
        out.confidence.append(float(cell.confidence))
        out.patients.append(item.patient)
        out.files.append(cell.file)
    out.errors = [FileError(by_rel[e.file].class_id, e.file, e.reason) for e in result.errors]
    return out


@dataclass(frozen=True)
class EvaluateOptions:
    """Everything an evaluation is asked to do; the CLI builds one from its options (as for run
    and verify), so a new option is one field here and one click option."""

    labelled: Path  # LABELLED/<class_id>/[<patient>/]crop
    out: Path  # the evaluation workbook (.xlsx)
    model_path: Path | None = None  # None: the bundled model
    json_path: Path | None = None  # also the numbers as JSON
    workers: int | None = None  # None: one decode process per core
    show_bar: bool = False
    batch_size: int | None = None  # None: the run's default


def run_evaluate(opts: EvaluateOptions) -> int:
    """The whole command; returns the exit code (usage problems raise run.JobError)."""
    labelled_root, out, model_path, json_path = opts.labelled, opts.out, opts.model_path, opts.json_path
    workers, show_bar, batch_size = opts.workers, opts.show_bar, opts.batch_size
    import os

    from batchwbc.core import agreement
    from batchwbc.outputs import evaluation_workbook, workbook
    from batchwbc.commands.run import JobError, check_outputs, load_runtime_classifier
    from batchwbc.inputs.labelled_folders import LabelledError, read_labelled
    from batchwbc.ops.logging_setup import Progress
    from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE, PipelineError, default_workers

    started = datetime.now().astimezone()
    t0 = time.monotonic()
    check_outputs(((out, (".xlsx",)), (json_path, (".json",))))
    classifier = load_runtime_classifier(str(model_path) if model_path else None, os.cpu_count() or 1)
    info = classifier.info
    try:
        labelled = read_labelled(labelled_root, info.classes)
    except LabelledError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None
    check_labelled(labelled, labelled_root)
    found = labelled.class_counts()
    log.info("batchwbc %s: evaluating model %s (version %s) on %d verified crops of %d classes in %s",
             __version__, info.path.name, info.model_version, len(labelled.items), len(found), labelled_root)
    if labelled.unknown_folders:
        n_unknown = sum(labelled.unknown_folders.values())
        log.warning("skipped %d %s in folders that are not classes of the model (%s); `batchwbc info` lists its classes.",
                    n_unknown, "crop" if n_unknown == 1 else "crops",
                    ", ".join(f"{k}: {v}" for k, v in sorted(labelled.unknown_folders.items())))

    n_workers = default_workers() if workers is None else workers
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    try:
        with Progress(len(labelled.items), show_bar) as progress:
            preds = predict_labelled(labelled, labelled_root, classifier, n_workers, batch_size, progress)
    except PipelineError as exc:
        raise JobError(exit_codes.FAILED, str(exc)) from None
    if not preds.true_ids:
        raise JobError(exit_codes.FAILED, f"none of the {len(labelled.items)} labelled crops could be decoded; "
                                      "no evaluation was written.")
    result: Evaluation = agreement.evaluate(preds.true_ids, preds.pred_ids, preds.confidence, preds.patients,
                                             info.classes, model_threshold=info.review_threshold,
                                             guess_ids=preds.guess_ids)
    run = EvaluationRun(
        labelled_root=str(Path(labelled_root).resolve()), model=info, started=started,
        finished=datetime.now().astimezone(), tool_version=__version__, found=found,
        unknown_folders=labelled.unknown_folders, skipped=labelled.skipped, errors=preds.errors,
        extra={"Decode workers": str(n_workers), "Batch size": str(batch_size),
               "Unclassified crops (not recognised as a cell the model knows; abstentions, as in a run)":
                   str(preds.unclassified)},
    )
    try:
        plots_note = evaluation_workbook.write_workbook(result, run, out)
        if json_path is not None:
            evaluation_workbook.write_json(result, run, json_path)
    except (OSError, workbook.OutputError) as exc:
        raise JobError(exit_codes.FAILED, f"the evaluation could not be written ({str(exc).rstrip('.')}).") from None
    if plots_note:
        log.warning("%s", plots_note)
    cov = result.coverage
    log.info("evaluated %d cells as a run reports them: %s classified, accuracy %s over the classified cells and %s "
             "with unclassified crops as misses, macro-F1 %s (paper's ten: %s / %s), ECE %s; %.1f s; workbook: %s",
             result.n, _pct(cov.coverage), _fmt(cov.accuracy_classified), _fmt(cov.accuracy_with_abstentions),
             _fmt(result.overall.macro_f1), _fmt(result.paper10.accuracy), _fmt(result.paper10.macro_f1),
             _fmt(result.calibration.ece), time.monotonic() - t0, out)
    if preds.errors:
        log.warning("%d labelled %s could not be read and %s left out; see the Run sheet.", len(preds.errors),
                    "crop" if len(preds.errors) == 1 else "crops", "is" if len(preds.errors) == 1 else "are")
        return exit_codes.PARTIAL
    return exit_codes.OK


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"

