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

from . import __version__, exitcodes

if TYPE_CHECKING:  # results -> model imports numpy; `batchwbc --help` stays light
    from .results import FileError
    from .evaluation import Evaluation
    from .labelled import LabelledSet
    from .model import Classifier, ModelInfo

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
    """Refuse a folder that cannot give a meaningful evaluation (raises job.JobError, exit 2)."""
    from .job import JobError

    counts = labelled.class_counts()
    if not counts:
        hint = (f" (only folders that are not classes of the model: {', '.join(sorted(labelled.unknown_folders))})"
                if labelled.unknown_folders else "")
        raise JobError(exitcodes.USAGE, f"no labelled crops found in {root}{hint}; it needs one sub-folder per class id "
                                     "of the model (as `batchwbc info` lists them) holding the verified crops.")
    if len(counts) < 2:
        (only,) = counts
        raise JobError(exitcodes.USAGE, f"every labelled crop in {root} is of one class ({only}); an evaluation needs "
                                     "verified cells of at least two classes.")


def predict_labelled(labelled: "LabelledSet", root: Path, classifier: "Classifier", workers: int,
                     batch_size: int, progress=None) -> LabelledPredictions:
    """Classify every labelled crop through the run's Pipeline; unreadable crops are listed."""
    from .discovery import Crop
    from .pipeline import Pipeline
    from .results import FileError

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
    from .ood import UNCLASSIFIED

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


def run_evaluate(labelled_root: Path, out: Path, model_path: Path | None, json_path: Path | None,
                 workers: int | None, show_bar: bool, batch_size: int | None = None) -> int:
    """The whole command; returns the exit code (usage problems raise job.JobError)."""
    import os

    from . import evaluation, evaluation_report, report
    from .job import JobError, check_outputs, inference_threads, load_classifier
    from .labelled import LabelledError, read_labelled
    from .logsetup import Progress
    from .pipeline import DEFAULT_BATCH_SIZE, PipelineError, default_workers

    started = datetime.now().astimezone()
    t0 = time.monotonic()
    check_outputs(((out, (".xlsx",)), (json_path, (".json",))))
    classifier = load_classifier(str(model_path) if model_path else None, inference_threads(os.cpu_count() or 1))
    info = classifier.info
    try:
        labelled = read_labelled(labelled_root, info.classes)
    except LabelledError as exc:
        raise JobError(exitcodes.USAGE, str(exc)) from None
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
        raise JobError(exitcodes.FAILED, str(exc)) from None
    if not preds.true_ids:
        raise JobError(exitcodes.FAILED, f"none of the {len(labelled.items)} labelled crops could be decoded; "
                                      "no evaluation was written.")
    result: Evaluation = evaluation.evaluate(preds.true_ids, preds.pred_ids, preds.confidence, preds.patients,
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
        plots_note = evaluation_report.write_workbook(result, run, out)
        if json_path is not None:
            evaluation_report.write_json(result, run, json_path)
    except (OSError, report.OutputError) as exc:
        raise JobError(exitcodes.FAILED, f"the evaluation could not be written ({str(exc).rstrip('.')}).") from None
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
        return exitcodes.PARTIAL
    return exitcodes.OK


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"

