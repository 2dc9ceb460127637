"""The `batchwbc` command line: the nightly run, model info, version.

Everything that can make a run pointless (model, config, output path, lock, cache) is
checked before the first crop is decoded, so a mistake costs seconds, not a night. Heavy
libraries are imported inside the commands so `batchwbc --help` answers instantly.
Exit codes are in batchwbc/exitcodes.py and docs/usage.md.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import click

from . import __version__, exitcodes

log = logging.getLogger("batchwbc")


class Abort(Exception):
    """Stop the command with an exit code and one sentence (logged, never a traceback)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def resolve_review_threshold(cli_value: float | None, config_value: float | None, model_value: float | None) -> tuple[float, str]:
    """--review-threshold > config [review] threshold > model metadata > fallback 0.5."""
    from .pipeline import FALLBACK_REVIEW_THRESHOLD

    if cli_value is not None:
        return float(cli_value), "--review-threshold"
    if config_value is not None:
        return float(config_value), "config file"
    if model_value is not None:
        return float(model_value), "model metadata (set from its validation data)"
    return FALLBACK_REVIEW_THRESHOLD, "built-in fallback (the model sets none)"


def inference_threads(cpus: int) -> int:
    """onnxruntime threads for the main process: half the cores, with busy-waiting turned off.

    Decode workers (one per core) and inference share the cores, and decoding is the larger
    cost per crop. Without spinning, idle onnxruntime threads sleep, and decode workers block
    once the bounded queue is full. Busy-waiting threads burned ~1.4 ms of CPU per crop on a
    2-core PC; with the bundled model, 1 inference thread instead of 2 saved a further
    0.08 ms of CPU per crop (docs/performance.md).
    """
    return max(1, cpus // 2)


def load_classifier(model_path: str | None, threads: int):
    from .model import DEFAULT_MODEL_PATH, Classifier, ModelError

    if model_path is None and not DEFAULT_MODEL_PATH.is_file():
        raise Abort(
            exitcodes.USAGE,
            f"the bundled model file {DEFAULT_MODEL_PATH} is missing (this installation has no trained model yet); "
            "pass --model PATH to use another batchwbc ONNX model.",
        )
    try:
        return Classifier(model_path, threads=threads, spinning=False)
    except ModelError as exc:
        raise Abort(exitcodes.USAGE, str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="batchwbc", message="%(prog)s %(version)s")
def main() -> None:
    """Classify white-blood-cell crops, one folder per patient, into an Excel differential.

    Exit codes: 0 all files classified; 1 the run failed (no new report); 2 usage error,
    unusable model/config/output (nothing classified); 3 report written but some files were
    unreadable; 130 interrupted (previous report untouched).
    """


@main.command("run")
@click.argument("slides", type=click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Excel workbook to write (.xlsx). Replaced atomically: an earlier report stays intact until the new one is complete.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="batchwbc ONNX model to use instead of the bundled batchwbc/models/batchwbc-wbc12.onnx.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TOML file with flag thresholds, reference ranges and the review threshold (see docs/usage.md).")
@click.option("--review-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="List cells whose calibrated confidence is below this for review (0-1). "
                   "Default: the config's value, else the model's own (chosen on its validation data).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding images in parallel. Default: one per CPU core. 0 decodes in the main process.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=4, show_default=True,  # = pipeline.DEFAULT_BATCH_SIZE
              help="Images per model call.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite file remembering results per file and model, so a later run only classifies new or changed crops.")
@click.option("--cells-csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every cell's result (patient, file, class, probabilities) to this CSV file.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the run's log lines to this file as well.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on the terminal; no progress.")
def run_command(slides: Path, out: Path, model_path: Path | None, config_path: Path | None,
                review_threshold: float | None, workers: int | None, batch_size: int,
                cache_path: Path | None, cells_csv: Path | None, log_file: Path | None, quiet: bool) -> None:
    """Classify every crop below SLIDES/<patient>/ and write the report to --out.

    SLIDES holds one folder per patient or slide (crops at any depth below it); images
    directly in SLIDES are reported as their own group. Cells below the review threshold
    are listed with a thumbnail for a person to check.
    """
    from .logsetup import LogFileError, setup_logging, stderr_is_terminal

    show_bar = stderr_is_terminal() and not quiet
    try:
        setup_logging(quiet, str(log_file) if log_file else None, show_bar)
    except LogFileError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exitcodes.USAGE)
    try:
        code = _run(slides, out, model_path, config_path, review_threshold, workers, batch_size,
                    cache_path, cells_csv, show_bar)
    except Abort as exc:
        log.error("%s", exc)
        code = exc.code
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed (start-up)
        log.error("interrupted during start-up; nothing was classified and no report was written.")
        code = exitcodes.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one sentence for the user, details in the log file
        log.debug("unexpected failure", exc_info=True)
        log.error("the run failed unexpectedly (%s: %s); no report was written.", type(exc).__name__, exc)
        code = exitcodes.FAILED
    sys.exit(code)


def _run(slides: Path, out: Path, model_path: Path | None, config_path: Path | None,
         review_threshold: float | None, workers: int | None, batch_size: int,
         cache_path: Path | None, cells_csv: Path | None, show_bar: bool) -> int:
    import os

    from . import config as config_mod
    from . import report
    from .pipeline import default_workers

    started = datetime.now().astimezone()
    t0 = time.monotonic()
    log.info("batchwbc %s: classifying %s into %s", __version__, slides, out)

    # -- everything that can fail fast, before any crop is touched --------------------------
    try:
        settings = config_mod.load_settings(config_path)
    except config_mod.ConfigError as exc:
        raise Abort(exitcodes.USAGE, str(exc)) from None
    n_workers = default_workers() if workers is None else workers
    classifier = load_classifier(str(model_path) if model_path else None, inference_threads(os.cpu_count() or 1))
    info = classifier.info
    threshold, threshold_source = resolve_review_threshold(review_threshold, settings.review_threshold, info.review_threshold)
    for path, suffixes in ((out, (".xlsx",)), (cells_csv, (".csv",))):
        if path is None:
            continue
        try:
            report.check_output_writable(path, suffixes)
        except report.OutputError as exc:
            raise Abort(exitcodes.USAGE, str(exc)) from None
    log.info("model %s (version %s, sha256 %s...), review threshold %.3g from %s",
             info.path.name, info.model_version, info.sha256[:12], threshold, threshold_source)

    from .interrupt import RunInterrupted, signals_as_interrupt
    from .runlock import LockedError, RunLock

    with ExitStack() as stack:
        try:
            lock = stack.enter_context(RunLock(out))
        except LockedError as exc:
            raise Abort(exitcodes.USAGE, str(exc)) from None
        cache = None
        if cache_path is not None:
            from .cache import CacheError, ResultCache

            try:
                cache = stack.enter_context(ResultCache(cache_path, info.sha256))
            except CacheError as exc:
                raise Abort(exitcodes.USAGE, str(exc)) from None
        stack.enter_context(signals_as_interrupt())
        state = _RunState()
        try:
            return _classify_and_report(slides, out, cells_csv, classifier, settings, threshold, threshold_source,
                                        n_workers, batch_size, cache, show_bar, started, t0, state)
        except RunInterrupted as exc:
            log.error("interrupted (%s) %s; no report was written and the previous one is untouched.",
                      exc.signal_name, state.where())
            return exitcodes.INTERRUPTED
        except KeyboardInterrupt:
            log.error("interrupted %s; no report was written and the previous one is untouched.", state.where())
            return exitcodes.INTERRUPTED


class _RunState:
    """Where the run is, for the one line an interrupted run leaves in the log."""

    def __init__(self) -> None:
        self.pipeline = None
        self.stage = "start-up"

    def where(self) -> str:
        """'after 1234 of 5000 cells', 'while looking for images', ..."""
        p = self.pipeline
        if p is not None and self.stage == "classifying":
            return f"after {p.done} of {p.total} cells"
        if p is not None:
            return f"after all {p.total} cells were classified, while {self.stage}"
        return f"while {self.stage}" if self.stage != "start-up" else "during start-up"


def _classify_and_report(slides, out, cells_csv, classifier, settings, threshold, threshold_source,
                         n_workers, batch_size, cache, show_bar, started, t0, state: _RunState) -> int:
    from . import differential, flags, report
    from .discovery import DiscoveryError, discover
    from .logsetup import Progress
    from .pipeline import Pipeline, PipelineError
    from .results import RunData

    info = classifier.info
    state.stage = "looking for images"
    try:
        found = discover(slides)
    except DiscoveryError as exc:
        raise Abort(exitcodes.USAGE, str(exc)) from None
    n_groups = len(found.patients)
    log.info("found %d crops in %d patient folders (%d other files ignored)",
             len(found.crops), n_groups, found.ignored_total)
    if not found.crops:
        log.warning("no images found below %s; the report will list the patients with zero cells.", slides)

    with Progress(len(found.crops), show_bar) as progress:
        pipe = Pipeline(info.input_size, classifier, threshold, workers=n_workers, batch_size=batch_size,
                        cache=cache, progress=progress, max_thumbnails=settings.review_max_images)
        state.pipeline = pipe
        state.stage = "classifying"
        try:
            result = pipe.run(found.crops)
        except PipelineError as exc:
            raise Abort(exitcodes.FAILED, f"{exc}") from None

    errors = list(found.errors) + list(result.errors)
    extra = {
        "Slides folder": str(Path(slides).resolve()),
        "Review threshold source": threshold_source,
        "Decode workers": str(n_workers),
        "Batch size": str(batch_size),
        "Crops found": str(len(found.crops)),
    }
    for reason, n in sorted(found.ignored.items()):
        extra[f"Ignored: {reason}"] = str(n)
    if cache is not None:
        extra["Result cache"] = f"{cache.path} ({result.cached} results reused, {result.decoded} crops decoded)"
    if result.pool_restarts:
        extra["Worker crashes recovered"] = str(result.pool_restarts)
    run = RunData(
        root=str(slides), patients=list(found.patients), cells=result.cells, errors=errors, model=info,
        review_threshold=threshold, started=started, finished=datetime.now().astimezone(),
        tool_version=__version__, ignored_files=found.ignored_total, extra=extra,
    )

    state.stage = "writing the report"
    try:
        report.write_workbook(run, settings, out)
        if cells_csv is not None:
            report.write_cells_csv(run.cells, cells_csv)
    except (OSError, report.OutputError) as exc:
        raise Abort(exitcodes.FAILED, f"the report could not be written ({str(exc).rstrip('.')}).") from None

    from .datashift import decide_all, log_line

    shifts, run_shift = decide_all(info.metadata, run.cells)
    n_flags = _count_flags(run, settings, differential, flags, shifts)
    shift_line = log_line(shifts, run_shift)
    if shift_line:
        log.warning("%s", shift_line)
    n_review = sum(c.review for c in run.cells)
    log.info(
        "summary: %d patients, %d cells classified, %d unreadable, %d for review, %d flags raised, %.1f s; report: %s",
        n_groups, len(run.cells), len(errors), n_review, n_flags, time.monotonic() - t0, out,
    )
    if errors:
        log.warning("%d %s could not be classified; see the Errors sheet.", len(errors),
                    "file or folder" if len(errors) == 1 else "files or folders")
        return exitcodes.PARTIAL
    return exitcodes.OK


def _count_flags(run, settings, differential, flags, shifts=None) -> int:
    by_patient: dict[str, list] = {p: [] for p in run.patients}
    for cell in run.cells:
        by_patient.setdefault(cell.patient, []).append(cell)
    shifts = shifts or {}
    return sum(len(flags.evaluate(differential.summarize(cells), settings, shifts.get(p)))
               for p, cells in by_patient.items())


@main.command("info")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model to describe instead of the bundled one.")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_command(model_path: Path | None, as_json: bool) -> None:
    """Show the model's version, classes, input size, review threshold and training summary."""
    import json

    try:
        clf = load_classifier(str(model_path) if model_path else None, threads=1)
    except Abort as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.code)
    info = clf.info
    if as_json:
        click.echo(json.dumps({
            "path": str(info.path), "sha256": info.sha256, "model_version": info.model_version,
            "classes": list(info.classes), "input_size": info.input_size,
            "review_threshold": info.review_threshold, "temperature": info.temperature,
            "preprocessing": info.preprocessing, "metadata": info.metadata,
        }, indent=2))
        return
    rows = [
        ("Model file", str(info.path)),
        ("SHA-256", info.sha256),
        ("Version", info.model_version),
        ("Input", f"{info.input_size}x{info.input_size} RGB uint8"),
        ("Classes", ", ".join(info.classes)),
        ("Review threshold", "not set (0.5 is used)" if info.review_threshold is None else f"{info.review_threshold:g}"),
        ("Temperature", "not recorded" if info.temperature is None else f"{info.temperature:g}"),
        ("Preprocessing", info.preprocessing),
        ("Out-of-distribution", "none: no crop is labelled unclassified, no DATA_SHIFT" if clf.ood is None else
         f"{clf.ood.describe()}; unclassified above {clf.ood.threshold:.4g}"
         + (f"; DATA_SHIFT above {100 * clf.ood.shift.threshold:.1f}% (>= {clf.ood.shift.min_cells} cells)"
            if clf.ood.shift is not None else "")),
    ]
    for key, label in (("batchwbc.backbone", "Backbone"), ("batchwbc.training_data", "Training data"),
                       ("batchwbc.test_metrics", "Test metrics")):
        if key in info.metadata:
            rows.append((label, info.metadata[key]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":  # pragma: no cover
    main()
