"""One nightly run, from a slides folder to a written report: the layer between CLI and parts.

`run_job(RunOptions)` checks everything that can make a run pointless (config, model,
output paths, lock, cache) before the first crop is decoded, so a mistake costs seconds,
not a night; then it discovers, classifies, summarises each patient once and hands the
summaries to the report. It returns an exit code (batchwbc/ops/exit_codes.py) and raises
`JobError` with one sentence for the user; the CLI only maps those to the terminal.
Heavy modules (numpy, OpenCV, onnxruntime, openpyxl) are imported inside the functions.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from batchwbc import __version__
from batchwbc.ops import exit_codes
from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    from batchwbc.engine.result_cache import ResultCache
    from batchwbc.core.config import Settings
    from batchwbc.inputs.slide_folders import Discovery
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.pipeline import Pipeline, PipelineOutput
    from batchwbc.core.records import RunData
    from batchwbc.core.summary import PatientSummary
    from batchwbc.outputs.lis.deliver import LisPlan

log = logging.getLogger("batchwbc")


class JobError(exit_codes.CommandError):
    """Stop the run with an exit code and one sentence (logged, never a traceback)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return self.code


@dataclass(frozen=True)
class RunOptions:
    """Everything a run is asked to do; the CLI builds one from its options."""

    slides: Path
    out: Path
    model_path: Path | None = None  # None: the bundled model
    config_path: Path | None = None  # None: the built-in defaults
    review_threshold: float | None = None  # None: config, else the model's own
    workers: int | None = None  # None: one decode process per core
    batch_size: int = DEFAULT_BATCH_SIZE
    cache_path: Path | None = None
    cells_csv: Path | None = None
    summary_csv: Path | None = None  # also write the Summary sheet as CSV (for LIS middleware)
    show_bar: bool = False  # a progress bar on the terminal
    allow_empty: bool = False  # a slides folder without images writes an empty report instead of exit 4
    html_dir: Path | None = None  # also write the offline HTML gallery here
    # -- preliminary results to the LIS (issue 21), only when the config's [lis] send_preliminary is true
    hl7_dir: Path | None = None  # one ORU^R01 (status P) file per patient
    mllp: str | None = None  # HOST:PORT: send them and await each ACK


def resolve_review_threshold(cli_value: float | None, config_value: float | None, model_value: float | None) -> tuple[float, str]:
    """--review-threshold > config [review] threshold > model metadata > fallback 0.5."""
    from batchwbc.engine.pipeline import FALLBACK_REVIEW_THRESHOLD

    if cli_value is not None:
        return float(cli_value), "--review-threshold"
    if config_value is not None:
        return float(config_value), "config file"
    if model_value is not None:
        return float(model_value), "model metadata (set from its validation data)"
    return FALLBACK_REVIEW_THRESHOLD, "built-in fallback (the model sets none)"


#: One thread's model time per crop above which the model, not the decoding, is the larger cost:
#: decoding and framing a crop costs ~1 ms of CPU (docs/performance.md); v4 takes 0.55 ms,
#: EfficientNet-Lite0 at 144 px ~3.9.
HEAVY_MODEL_MS = 1.5


def inference_threads(cpus: int, model_ms_per_crop: float = 0.0) -> int:
    """onnxruntime threads for the main process, with busy-waiting turned off: half the cores
    for a light model, all of them for a heavy one.

    Decode workers (one per core) and inference share the cores. With a light model decoding
    is the larger cost per crop: without spinning, idle onnxruntime threads sleep, and decode
    workers block once the bounded queue is full; with v4, 1 inference thread instead of 2 saved
    0.08 ms of CPU per crop and ran 554 against 527 crops/s end to end. A heavy model is the
    bottleneck: with Lite0 (3.9 ms per crop) 2 threads ran 258 crops/s against 218 on 2 cores
    (`benchmarks/bench_ideal.py --n 5000`, same session; docs/performance.md). Busy-waiting
    threads burned ~1.4 ms of CPU per crop on a 2-core PC, so spinning stays off either way.
    """
    if model_ms_per_crop > HEAVY_MODEL_MS:
        return max(1, cpus)
    return max(1, cpus // 2)


def one_thread_ms_per_crop(classifier: "Classifier", batch: int = 4) -> float:
    """The model's time per crop on the classifier's threads (one, when deciding): the best of
    three timed batches of blank crops after a warm-up, so a busy moment cannot make a light
    model look heavy (tens of milliseconds, once per run)."""
    import time

    import numpy as np

    s = classifier.info.input_size
    x = np.zeros((batch, s, s, 3), np.uint8)
    classifier.predict(x)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        classifier.predict(x)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / batch


def load_runtime_classifier(model_path: str | None, cpus: int) -> "Classifier":
    """The model for run and evaluate, on as many inference threads as its cost calls for
    (`inference_threads`): timed on one thread, reloaded on more only for a heavy model."""
    classifier = load_classifier(model_path, 1)
    ms = one_thread_ms_per_crop(classifier)
    threads = inference_threads(cpus, ms)
    log.debug("model: %.2f ms per crop on one thread; %d inference thread%s", ms, threads, "" if threads == 1 else "s")
    return classifier if threads == 1 else load_classifier(model_path, threads)


def check_outputs(outputs: "Sequence[tuple[Path | None, tuple[str, ...]]]", html_dir: Path | None = None) -> None:
    """Refuse, before any work, an output file that cannot be written with its suffix, or an
    --html folder that is neither new, empty nor an earlier gallery (one sentence, exit 2).
    Shared by run, verify and evaluate so each output is judged the same way."""
    from batchwbc.outputs import workbook

    for path, suffixes in outputs:
        if path is None:
            continue
        try:
            workbook.check_output_writable(path, suffixes)
        except workbook.OutputError as exc:
            raise JobError(exit_codes.USAGE, str(exc)) from None
    if html_dir is not None:
        from batchwbc.outputs.gallery import GalleryError, check_target

        try:
            check_target(html_dir)
        except GalleryError as exc:
            raise JobError(exit_codes.USAGE, str(exc)) from None


def check_preliminary(opts: RunOptions, settings: "Settings") -> None:
    """Fail fast on --hl7/--mllp: the lab's opt-in first, then the address, the folder, the extra.

    A pre-classification is not a result (docs/lis.md), so `run` sends one only where a lab
    decided it in its config; an option alone must never start sending unverified values."""
    if opts.hl7_dir is None and opts.mllp is None:
        if settings.lis.send_preliminary:
            log.warning("the config's [lis] send_preliminary is true but no --hl7 DIR was given, so no preliminary "
                        "results are sent.")
        return
    flag = "--hl7" if opts.hl7_dir is not None else "--mllp"
    if not settings.lis.send_preliminary:
        raise JobError(exit_codes.USAGE, f"run {flag} sends unverified preliminary results, which only a config with "
                                        "send_preliminary = true in its [lis] table enables (docs/lis.md).")
    from batchwbc.outputs.lis import destination_problem

    problem = destination_problem(opts.hl7_dir, opts.mllp)
    if problem is not None:
        raise JobError(exit_codes.USAGE, problem)


def plan_preliminary(opts: RunOptions, run: "RunData", summaries: "Sequence[PatientSummary]",
                     settings: "Settings") -> "LisPlan":
    """Every patient's preliminary message, from the summaries the workbook shows, with the
    Summary sheet's banner (and its alert line, if any) as the first NTEs."""
    from batchwbc.core.summary import run_alert_of
    from batchwbc.outputs.lis.deliver import plan_preliminary as plan
    from batchwbc.outputs.lis.results import RunFacts
    from batchwbc.outputs.workbook import BANNER

    info = run.model
    facts = RunFacts(__version__, info.path.name, info.model_version, info.sha256, run.started)
    banner = [BANNER, run_alert_of(run, summaries) or ""]
    return plan(summaries, settings, facts, run.model.classes, datetime.now().astimezone(), banner, run.finished)


def send_preliminary(opts: RunOptions, plan: "LisPlan", settings: "Settings") -> int:
    """Write the preliminary messages to --hl7 (atomically) and send them over --mllp, after the
    workbook: a LIS that is down must not cost the night's report. NOT_DELIVERED when a patient's
    message could not be built or was not acknowledged; each one is in the log with its reason."""
    from batchwbc.outputs.lis.deliver import deliver_to, write_messages

    if opts.hl7_dir is None:
        return exit_codes.OK
    for patient, reason in plan.failed:
        log.error("LIS: patient %s: no preliminary result was sent: %s", patient, reason)
    try:
        write_messages(opts.hl7_dir, plan.messages)
    except OSError as exc:
        raise JobError(exit_codes.FAILED, f"the preliminary LIS messages could not be written to {opts.hl7_dir} "
                                         f"({exc.strerror or exc}); the report was written.") from None
    log.info("LIS: %d preliminary HL7 messages (status P) in %s", len(plan.messages), opts.hl7_dir)
    undelivered = list(plan.failed) + deliver_to(opts.mllp, opts.hl7_dir, plan.messages, settings.lis.ack_timeout_s)
    if undelivered:
        log.error("LIS: the preliminary results of %d patients were not delivered (%s); see the lines above.",
                  len(undelivered), ", ".join(p for p, _ in undelivered))
        return exit_codes.NOT_DELIVERED
    return exit_codes.OK


def load_classifier(model_path: str | None, threads: int) -> "Classifier":
    """The model to run, or JobError(USAGE) with the reason it cannot be used."""
    from batchwbc.engine.model import DEFAULT_MODEL_PATH, Classifier, ModelError

    if model_path is None and not DEFAULT_MODEL_PATH.is_file():
        raise JobError(
            exit_codes.USAGE,
            f"the bundled model file {DEFAULT_MODEL_PATH} is missing (this installation has no trained model yet); "
            "pass --model PATH to use another batchwbc ONNX model.",
        )
    try:
        return Classifier(model_path, threads=threads, spinning=False)
    except ModelError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None


class RunState:
    """Where the run is, for the one line an interrupted run leaves in the log."""

    def __init__(self) -> None:
        self.pipeline: "Pipeline | None" = None
        self.stage = "start-up"
        self.report_written = False  # the workbook is in place; only the --html gallery was still being written
        self.sending = False  # the workbook is in place; preliminary LIS messages were being sent

    def where(self) -> str:
        """'after 1234 of 5000 cells', 'while looking for images', ..."""
        p = self.pipeline
        if p is not None and self.stage == "classifying":
            return f"after {p.done} of {p.total} cells"
        if p is not None:
            return f"after all {p.total} cells were classified, while {self.stage}"
        return f"while {self.stage}" if self.stage != "start-up" else "during start-up"

    def outcome(self) -> str:
        if self.sending:
            return "the report was written; preliminary LIS messages not yet acknowledged stay in the --hl7 folder"
        if self.report_written:
            return "the report was written; the previous HTML gallery is untouched"
        return "no report was written and the previous one is untouched"


@dataclass(frozen=True)
class _Prepared:
    """What the fail-fast checks produced, for the classification that follows."""

    settings: "Settings"
    classifier: "Classifier"
    threshold: float
    threshold_source: str
    workers: int


def run_job(opts: RunOptions) -> int:
    """Run the whole job; returns an exit code, raises JobError for a one-sentence failure."""
    import os

    from batchwbc.core import config as config_mod
    from batchwbc.engine.pipeline import default_workers

    started = datetime.now().astimezone()
    t0 = time.monotonic()
    log.info("batchwbc %s: classifying %s into %s", __version__, opts.slides, opts.out)

    # -- everything that can fail fast, before any crop is touched --------------------------
    try:
        settings = config_mod.load_settings(opts.config_path)
    except config_mod.ConfigError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None
    check_preliminary(opts, settings)
    n_workers = default_workers() if opts.workers is None else opts.workers
    classifier = load_runtime_classifier(str(opts.model_path) if opts.model_path else None, os.cpu_count() or 1)
    info = classifier.info
    settings = config_mod.with_model_defaults(settings, info.review_share_pct)
    threshold, threshold_source = resolve_review_threshold(opts.review_threshold, settings.review_threshold,
                                                           info.review_threshold)
    check_outputs(((opts.out, (".xlsx",)), (opts.cells_csv, (".csv",)), (opts.summary_csv, (".csv",))),
                  opts.html_dir)
    log.info("model %s (version %s, sha256 %s...), review threshold %.3g from %s",
             info.path.name, info.model_version, info.sha256[:12], threshold, threshold_source)
    prepared = _Prepared(settings, classifier, threshold, threshold_source, n_workers)

    from batchwbc.ops.signals import RunInterrupted, signals_as_interrupt
    from batchwbc.ops.run_lock import LockedError, RunLock

    with ExitStack() as stack:
        try:
            stack.enter_context(RunLock(opts.out))
        except LockedError as exc:
            raise JobError(exit_codes.USAGE, str(exc)) from None
        cache = None
        if opts.cache_path is not None:
            from batchwbc.engine.result_cache import CacheError, ResultCache

            try:
                cache = stack.enter_context(ResultCache(opts.cache_path, info.sha256))
            except CacheError as exc:
                raise JobError(exit_codes.USAGE, str(exc)) from None
        stack.enter_context(signals_as_interrupt())
        state = RunState()
        try:
            return _classify_and_report(opts, prepared, cache, started, t0, state)
        except RunInterrupted as exc:
            log.error("interrupted (%s) %s; %s.", exc.signal_name, state.where(), state.outcome())
            return exit_codes.INTERRUPTED
        except KeyboardInterrupt:
            log.error("interrupted %s; %s.", state.where(), state.outcome())
            return exit_codes.INTERRUPTED


def _classify_and_report(opts: RunOptions, prep: _Prepared, cache: "ResultCache | None",
                         started: datetime, t0: float, state: RunState) -> int:
    from batchwbc.outputs import workbook
    from batchwbc.inputs.slide_folders import DiscoveryError
    from batchwbc.inputs.sources import find_crops
    from batchwbc.ops.logging_setup import Progress
    from batchwbc.engine.pipeline import Pipeline, PipelineError
    from batchwbc.core.records import RunData
    from batchwbc.engine.data_shift import decide_all, log_line
    from batchwbc.engine.model_metadata import is_adapted_version
    from batchwbc.core.summary import summarize_run, totals

    info = prep.classifier.info
    state.stage = "looking for images"
    try:
        found = find_crops(opts.slides)  # the slide-folder layout (inputs/sources.py lists the sources)
    except DiscoveryError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None
    log.info("found %d %s in %d patient %s (%d other %s ignored)",
             len(found.crops), "crop" if len(found.crops) == 1 else "crops", len(found.patients),
             "folder" if len(found.patients) == 1 else "folders", found.ignored_total,
             "file" if found.ignored_total == 1 else "files")
    if not found.crops and not opts.allow_empty:
        raise JobError(exit_codes.NO_INPUT, f"no images found below {opts.slides} (an empty folder or an unmounted share?); "
                                           "no report was written and the previous one is untouched (--allow-empty writes an empty report).")
    if not found.crops:
        log.warning("no images found below %s; the report will list the patients with zero cells.", opts.slides)

    with Progress(len(found.crops), opts.show_bar) as progress:
        pipe = Pipeline(info.input_size, prep.classifier, prep.threshold, workers=prep.workers,
                        batch_size=opts.batch_size, cache=cache, progress=progress,
                        max_thumbnails=prep.settings.review_max_images)
        state.pipeline = pipe
        state.stage = "classifying"
        try:
            result = pipe.run(found.crops)
        except PipelineError as exc:
            raise JobError(exit_codes.FAILED, f"{exc}") from None

    errors = list(found.errors) + list(result.errors)
    shifts, run_shift = decide_all(info.metadata, result.cells)
    run = RunData(
        root=str(opts.slides), patients=list(found.patients), cells=result.cells, errors=errors, model=info,
        review_threshold=prep.threshold, started=started, finished=datetime.now().astimezone(),
        tool_version=__version__, ignored_files=found.ignored_total,
        extra=run_sheet_rows(opts, prep, found, result, cache), data_shift=run_shift,
    )
    summaries = summarize_run(run, prep.settings, shifts)
    shift_line = log_line(shifts, run_shift, is_adapted_version(info.model_version))
    if shift_line:
        log.warning("%s", shift_line)
    lis_plan = None
    if opts.hl7_dir is not None:  # built before the workbook, so its Run sheet says what is sent
        from dataclasses import replace

        from batchwbc.outputs.lis.deliver import preliminary_rows

        lis_plan = plan_preliminary(opts, run, summaries, prep.settings)
        run = replace(run, extra={**run.extra, **preliminary_rows(lis_plan, opts.hl7_dir, opts.mllp)})

    state.stage = "writing the report"
    try:
        workbook.write_workbook(run, summaries, prep.settings, opts.out)
        if opts.cells_csv is not None:
            workbook.write_cells_csv(run.cells, opts.cells_csv)
        if opts.summary_csv is not None:
            workbook.write_summary_csv(summaries, opts.summary_csv, run.model.classes)
    except (OSError, workbook.OutputError) as exc:
        raise JobError(exit_codes.FAILED, f"the report could not be written ({str(exc).rstrip('.')}).") from None

    if opts.html_dir is not None:
        state.stage, state.report_written = "writing the HTML gallery", True
        write_html_gallery(run, summaries, opts.slides, opts.html_dir)
    t = totals(summaries)
    log.info(
        "summary: %d patients, %d crops read (%d classified, %d unclassified), %d unreadable, %d for review, "
        "%d flags raised, %.1f s; report: %s",
        len(found.patients), len(run.cells), t.classified, t.unclassified, len(errors), t.review_cells,
        t.flags, time.monotonic() - t0, opts.out,
    )
    code = exit_codes.OK
    if errors:
        log.warning("%d %s could not be classified; see the Errors sheet.", len(errors),
                    "file or folder" if len(errors) == 1 else "files or folders")
        code = exit_codes.PARTIAL
    if lis_plan is not None:  # after the report: its exit code wins over PARTIAL, as verify's does
        state.stage, state.report_written, state.sending = "sending preliminary results to the LIS", True, True
        code = send_preliminary(opts, lis_plan, prep.settings) or code
    return code


def write_html_gallery(run: "RunData", summaries: "list[PatientSummary]", slides: Path, html_dir: Path) -> None:
    """The --html gallery, written after the workbook: a failure here leaves the workbook written."""
    from dataclasses import replace

    from batchwbc.outputs.gallery import GalleryError, GalleryRunInfo, write_gallery
    from batchwbc.core.summary import run_alert_of

    t = time.monotonic()
    by_patient = {s.patient: s for s in summaries}
    cells_by: dict[str, list] = {p: [] for p in by_patient}
    for cell in run.cells:
        cells_by.setdefault(cell.patient, []).append(cell)
    try:
        info = replace(GalleryRunInfo.from_run(run), alert=run_alert_of(run, summaries))
        res = write_gallery(html_dir, list(by_patient), cells_by, by_patient, info, slides)
    except GalleryError as exc:
        raise JobError(exit_codes.FAILED, f"{str(exc).rstrip('.')}; the workbook was written.") from None
    log.info("HTML gallery: %d patient pages, %d cells, %d thumbnails, %.1f s; open %s",
             res.pages, res.cells, res.thumbnails, time.monotonic() - t, Path(html_dir) / "index.html")


def run_sheet_rows(opts: RunOptions, prep: _Prepared, found: "Discovery", result: "PipelineOutput",
                   cache: "ResultCache | None") -> dict[str, Any]:
    """The run's own Run-sheet rows (options, what happened, where and how it ran), after the
    report's standard ones; counts are numbers, so the Run sheet stores them as numbers."""
    from batchwbc.ops.provenance import provenance_rows

    rows: dict[str, Any] = {
        "Slides folder": str(Path(opts.slides).resolve()),
        "Review threshold source": prep.threshold_source,
        "Decode workers": prep.workers,
        "Batch size": opts.batch_size,
        "Crops found": len(found.crops),
    }
    for reason, n in sorted(found.ignored.items()):
        rows[f"Ignored: {reason}"] = n
    if cache is not None:
        rows["Result cache"] = f"{cache.path} ({result.cached} results reused, {result.decoded} crops decoded)"
    if result.pool_restarts:
        rows["Worker crashes recovered"] = result.pool_restarts
    rows.update(provenance_rows(opts.config_path))
    return rows
