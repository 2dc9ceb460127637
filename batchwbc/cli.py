"""The `batchwbc` command line: options, help text and exit codes; the work is in batchwbc.commands.run.

This layer only turns options into a command's options object (`RunOptions`, `VerifyOptions`,
`EvaluateOptions`, `InfoOptions`), runs it and maps how it ended to an exit code and one sentence
on the terminal, in one place (`_finish`; exit codes: batchwbc/ops/exit_codes.py and
docs/usage.md). Heavy libraries are imported inside the job, so `batchwbc --help` answers
instantly. Options shared by several commands are defined once below as decorators. Each
command has a `short_help` for the top-level list: click would cut its docstring's first
sentence with "..." to fit the line.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from batchwbc import __version__
from batchwbc.ops import exit_codes
from batchwbc.commands.run import RunOptions, run_job
from batchwbc.ops.exit_codes import CommandError
from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE

log = logging.getLogger("batchwbc")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _log_error(sentence: str) -> None:
    log.error("%s", sentence)


def _finish(work: Callable[[], int], *, interrupted: str, unexpected: str,
            say: Callable[[str], None] = _log_error) -> NoReturn:
    """Run a command and exit: the one mapping from how a command ended to an exit code.

    A CommandError (the project's errors: run.JobError, adapt.AdaptError, ...) -> its exit code
    and its sentence; Ctrl-C or SIGTERM -> 130 and `interrupted` ({reason}: what stopped it);
    anything else -> 1 and `unexpected` ({error}: its type and text), the traceback only in the
    log file. One sentence on the terminal, never a traceback."""
    try:
        code = work()
    except CommandError as exc:
        say(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        say(interrupted.format(reason=str(exc) or "Ctrl-C"))
        code = exit_codes.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one sentence for the user, details in the log file
        log.debug("unexpected failure", exc_info=True)
        say(unexpected.format(error=f"{type(exc).__name__}: {exc}"))
        code = exit_codes.FAILED
    sys.exit(code)


# -- options shared by commands (run today; verify, evaluate, adapt later) -------------------

#: --model PATH -> parameter `model_path`
model_option: Decorator = click.option(
    "--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="batchwbc ONNX model to use instead of the bundled batchwbc/models/batchwbc-wbc13.onnx.")
#: --config PATH -> parameter `config_path`
config_option: Decorator = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="TOML file with flag thresholds, reference ranges and the review threshold (see docs/usage.md).")
#: --log-file PATH -> parameter `log_file`
log_file_option: Decorator = click.option(
    "--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Append the run's log lines to this file as well.")
#: --quiet / -q -> parameter `quiet`
quiet_option: Decorator = click.option(
    "--quiet", "-q", is_flag=True, help="Only warnings and errors on the terminal; no progress.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="batchwbc", message="%(prog)s %(version)s")
def main() -> None:
    """Classify white-blood-cell crops, one folder per patient, into an Excel differential.

    Exit codes: 0 all files classified; 1 the run failed (no new report); 2 usage error,
    unusable model/config/output (nothing classified); 3 report written but some files were
    unreadable; 4 no images in the slides folder (previous report untouched, see --allow-empty);
    5 some LIS messages were not delivered (verify; run with [lis] send_preliminary); 130 interrupted (previous report untouched).
    """


@main.command("run", short_help="Classify the crops in SLIDES into an Excel report.")
@click.argument("slides", type=click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Excel workbook to write (.xlsx). Replaced atomically: an earlier report stays intact until the new one is complete.")
@model_option
@config_option
@click.option("--review-threshold", type=click.FloatRange(0.0, 1.0), default=None,
              help="List cells whose calibrated confidence is below this for review (0-1). "
                   "Default: the config's value, else the model's own (chosen on its validation data).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding images in parallel. Default: one per CPU core. 0 decodes in the main process.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Images per model call.")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="SQLite file remembering results per file and model, so a later run only classifies new or changed crops.")
@click.option("--cells-csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every cell's result (patient, file, class, probabilities) to this CSV file.")
@click.option("--summary-csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Summary sheet (one line per patient, with its '; '-separated flag codes) "
                   "to this CSV file, for LIS middleware and scripts.")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write an offline HTML gallery of every cell, by class, into this folder (replaced atomically).")
@log_file_option
@quiet_option
@click.option("--allow-empty", is_flag=True,
              help="Write a report with zero cells when SLIDES holds no images. Without it such a run exits 4 "
                   "and leaves the previous report untouched (an empty folder is usually an unmounted share).")
@click.option("--hl7", "hl7_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Only when the --config's [lis] send_preliminary is true: also write every patient's "
                   "pre-classification as a PRELIMINARY HL7 ORU^R01 (status P) into this folder (docs/lis.md).")
@click.option("--mllp", metavar="HOST:PORT", default=None,
              help="Send the --hl7 preliminary messages over MLLP and wait for each ACK; one already acknowledged "
                   "is not sent again. Exit 5 when some were not delivered.")
def run_command(slides: Path, out: Path, model_path: Path | None, config_path: Path | None,
                review_threshold: float | None, workers: int | None, batch_size: int,
                cache_path: Path | None, cells_csv: Path | None, summary_csv: Path | None, html_dir: Path | None,
                log_file: Path | None,
                quiet: bool, allow_empty: bool, hl7_dir: Path | None, mllp: str | None) -> None:
    """Classify every crop below SLIDES/<patient>/ and write the report to --out.

    SLIDES holds one folder per patient or slide (crops at any depth below it); images
    directly in SLIDES are reported as their own group. Cells below the review threshold
    are listed with a thumbnail for a person to check.
    """
    from batchwbc.ops.logging_setup import LogFileError, setup_logging, stderr_is_terminal
    from batchwbc.ops.output_paths import OutputCollision, check_distinct_outputs

    show_bar = stderr_is_terminal() and not quiet
    try:  # collisions first: a --log-file that is the report must not be appended to
        check_distinct_outputs({"--out": out, "--cells-csv": cells_csv, "--summary-csv": summary_csv,
                                "--cache": cache_path, "--log-file": log_file},
                               {"--model": model_path, "--config": config_path})
        setup_logging(quiet, str(log_file) if log_file else None, show_bar)
    except (OutputCollision, LogFileError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exit_codes.USAGE)
    opts = RunOptions(slides=slides, out=out, model_path=model_path, config_path=config_path,
                      review_threshold=review_threshold, workers=workers, batch_size=batch_size,
                      cache_path=cache_path, cells_csv=cells_csv, summary_csv=summary_csv, show_bar=show_bar, allow_empty=allow_empty,
                      html_dir=html_dir, hl7_dir=hl7_dir, mllp=mllp)
    # A KeyboardInterrupt reaching here came before the job's signal handlers (start-up).
    _finish(lambda: run_job(opts),
            interrupted="interrupted during start-up; nothing was classified and no report was written.",
            unexpected="the run failed unexpectedly ({error}); no report was written.")


@main.command("verify", short_help="Read a reviewed report, write the verified workbook.")
@click.argument("report_path", metavar="REPORT.xlsx",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Verified workbook to write (.xlsx, not REPORT itself). Written atomically.")
@click.option("--reviewer", default="", metavar="NAME",
              help="Who runs this verification, recorded in the Run sheet (patients are signed by the name "
                   "in their Verified by cell).")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Refuse the workbook unless this model file made it (compares SHA-256). The model is not run.")
@config_option
@click.option("--export-labelled", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy every verified cell's crop to DIR/<class_id>/<patient>/ with DIR/labels.csv "
                   "(the input of evaluate and adapt). DIR must be new or empty.")
@click.option("--slides", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Where the crops are now, for --export-labelled and --html (default: the Slides folder in the Run sheet).")
@click.option("--html", "html_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write an offline HTML gallery of the verified cells, by verified class, corrections marked.")
@click.option("--hl7", "hl7_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write one HL7 v2.5.1 ORU^R01 message per SIGNED patient into this folder (docs/lis.md; "
                   "needs pip install 'batchwbc[lis]').")
@click.option("--mllp", metavar="HOST:PORT", default=None,
              help="Send the --hl7 messages to the LIS over MLLP and wait for each ACK; one already acknowledged "
                   "is not sent again. Exit 5 when some were not delivered (they stay in the --hl7 folder).")
@click.option("--fhir", "fhir_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the signed patients as one FHIR R4 transaction Bundle (.json).")
@log_file_option
@quiet_option
def verify_command(report_path: Path, out: Path, reviewer: str, model_path: Path | None, config_path: Path | None,
                   export_labelled: Path | None, slides: Path | None, html_dir: Path | None,
                   hl7_dir: Path | None, mllp: str | None, fhir_path: Path | None, log_file: Path | None,
                   quiet: bool) -> None:
    """Read a reviewed REPORT.xlsx and write the verified differential to --out.

    In the report, choose the class you see in "Verified class" (Cells or Review sheet; blank
    accepts the machine's class) and type your name in the patient's "Verified by" cell
    (Summary). A patient is signed when every review cell has a Verified class and Verified
    by holds a name. Exit codes: 0 verified; 2 the workbook cannot be verified (each problem
    is named, nothing is written); 3 verified, but some crops were missing from the export;
    5 verified, but some signed patients' LIS messages were not delivered.
    """
    from batchwbc.ops.logging_setup import LogFileError, setup_logging
    from batchwbc.commands.verify import VerifyOptions, verify_job

    try:
        setup_logging(quiet, str(log_file) if log_file else None, False)
    except LogFileError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exit_codes.USAGE)
    opts = VerifyOptions(report=report_path, out=out, reviewer=" ".join(reviewer.split()), model_path=model_path,
                         config_path=config_path, export_labelled=export_labelled, slides=slides, html_dir=html_dir,
                         hl7_dir=hl7_dir, mllp=mllp, fhir_path=fhir_path)
    _finish(lambda: verify_job(opts),
            interrupted="interrupted; the verified workbook was not written and the report is unchanged.",
            unexpected="verification failed unexpectedly ({error}); no verified workbook was written.")


@main.command("info", short_help="Show the model's version, classes and thresholds.")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_command(model_path: Path | None, as_json: bool) -> None:
    """Show the model's version, classes, input size, review threshold and training summary."""
    from batchwbc.commands.info import InfoOptions, run_info

    _finish(lambda: run_info(InfoOptions(model_path=model_path, as_json=as_json), click.echo),
            interrupted="interrupted.", unexpected="the model could not be described ({error}).",
            say=lambda sentence: click.echo(f"Error: {sentence}", err=True))


@main.command("evaluate", short_help="Measure the model on a lab's verified cells.")
@click.argument("labelled", type=click.Path(exists=True, file_okay=False, dir_okay=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Excel workbook to write (.xlsx): per-class metrics, confusion, calibration, review threshold, "
                   "per-patient differentials with Bland-Altman limits.")
@model_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the numbers as JSON (accuracy, macro_f1, per_class, ece, ...).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding images in parallel. Default: one per CPU core. 0 decodes in the main process.")
@quiet_option
def evaluate_command(labelled: Path, out: Path, model_path: Path | None, json_path: Path | None,
                     workers: int | None, quiet: bool) -> None:
    """Compare the model with a lab's verified cells in LABELLED/<class_id>/[<patient>/]crop.

    Each crop is classified exactly as `batchwbc run` would classify it. Folders that are not
    classes of the model are counted and skipped; unreadable crops are listed (exit code 3).
    """
    from batchwbc.commands.evaluate import EvaluateOptions, run_evaluate
    from batchwbc.ops.signals import signals_as_interrupt
    from batchwbc.ops.logging_setup import setup_logging, stderr_is_terminal

    show_bar = stderr_is_terminal() and not quiet
    setup_logging(quiet, None, show_bar)
    opts = EvaluateOptions(labelled=labelled, out=out, model_path=model_path, json_path=json_path,
                           workers=workers, show_bar=show_bar)

    def work() -> int:
        with signals_as_interrupt():  # SIGTERM too: the temp files go, the previous EVAL.xlsx stays
            return run_evaluate(opts)

    _finish(work, interrupted="interrupted ({reason}); no evaluation was written and the previous one is untouched.",
            unexpected="the evaluation failed unexpectedly ({error}); nothing was written.")


@main.command("adapt", short_help="Refit the model's last layer to a lab's verified cells.")
@click.argument("labelled", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Adapted model file to write (.onnx); use it with `batchwbc run --model`.")
@model_option
@click.option("--force", is_flag=True, help="Write the model even when it is worse than the original on the cross-validation.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes decoding images. Default: one per CPU core. 0 decodes in the main process.")
def adapt_command(labelled: Path, out: Path, model_path: Path | None, force: bool, workers: int | None) -> None:
    """Refit the model's last layer to the lab's verified cells in LABELLED/<class>/[<patient>/].

    Reports patient-grouped cross-validated accuracy and macro-F1 before and after. Exit 0
    written; 1 not written because the mean of the two is lower than the original's (--force
    writes it anyway) or writing failed; 2 unusable folder or model.
    """
    import os

    # Thousands of tiny matrix products: BLAS threads only contend (25x slower on a busy 2-core PC).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from batchwbc.commands.adapt import next_step, run_adapt
    from batchwbc.ops.logging_setup import setup_logging
    from batchwbc.engine.pipeline import default_workers

    setup_logging(False, None, False)
    if out.suffix.lower() != ".onnx":
        log.error("--out must end in .onnx (got %s).", out.name)
        sys.exit(exit_codes.USAGE)

    def work() -> int:
        try:
            res = run_adapt(labelled, out, model_path, force, default_workers() if workers is None else workers)
        except OSError as exc:
            raise CommandError(f"the adapted model could not be written ({exc}).") from None
        fit = res.fit
        click.echo(f"cells used: {sum(res.counts.values())} in {len(res.counts)} classes, {res.patients} patients "
                   f"({', '.join(f'{k} {v}' for k, v in res.counts.items())}); unreadable skipped: {len(res.unreadable)}")
        click.echo(f"cross-validation ({fit.cv_scheme}):")
        for name, s in (("original", fit.before), ("adapted", fit.after)):
            click.echo(f"  {name:<9} accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}")
        click.echo(f"temperature {fit.temperature:.3f}, review threshold {fit.review_threshold:.2f}, prior strength {fit.alpha:g}")
        if not res.written:
            raise CommandError(f"the adapted model is worse than the original on this cross-validation; {out} was not "
                               "written (--force writes it anyway).")
        if fit.worse:
            log.warning("written although worse than the original (--force).")
        if res.ood_rederived is not None:
            click.echo(_ood_rederived_line(res.ood_rederived))
        if res.colour_rederived is not None:
            click.echo(_colour_rederived_line(res.colour_rederived))
        click.echo(f"wrote {out} (version {res.model_version})")
        click.echo(next_step(out))
        return exit_codes.OK

    _finish(work, interrupted="interrupted; no adapted model was written.",
            unexpected="adaptation failed unexpectedly ({error}); no adapted model was written.")


def _ood_rederived_line(p: dict) -> str:
    """One line on the OOD / DATA_SHIFT thresholds adapt re-derived from the lab's cells."""
    def num(v):
        return "none" if v is None else f"{v:.3g}"

    u = p["unclassified_threshold"]
    line = (f"OOD reference re-derived from {p['lab_cells_scored']} lab cells: unclassified threshold "
            f"{num(u['parent'])} -> {num(u['new'])} (the original left {p['parent_unclassified_lab_cells']} of "
            f"these cells unclassified)")
    b, j = p.get("background_rule"), p.get("junk_check")
    if isinstance(b, dict) and b.get("parent") != b.get("new"):  # moved only beside a not-a-cell rule
        line += f"; reject-centre margin {num(b['parent'])} -> {num(b['new'])} (the not-a-cell rule unchanged)"
    if j:
        line += (f"; junk cut from the lab's crops counted as cells: {j['counted_with_margin_moved']} of {j['junk_crops']} "
                 f"with the margin moved, {j['counted_with_margin_kept']} with it kept")
        if j.get("margin_kept_because"):
            line += f" (margin kept: {j['margin_kept_because']})"
    d = p.get("data_shift")
    if d:
        line += (f"; DATA_SHIFT cut {num(d['cell_cut']['parent'])} -> {num(d['cell_cut']['new'])}, threshold "
                 f"{num(d['threshold']['parent'])} -> {num(d['threshold']['new'])} (the original raised it for "
                 f"{d['parent_raised_data_shift']} of {d['batches_checked']} batches checked)")
    return line


def _colour_rederived_line(p: dict) -> str:
    """One line on what adapt did with the stain-colour envelope (batchwbc.adaptation.colour)."""
    head = (f"stain-colour envelope: the original set {p['parent_outside_lab_cells']} of {p['lab_cells']} lab cells "
            f"apart by colour")
    if p.get("kept_parent_because"):
        return f"{head}; kept unchanged ({p['kept_parent_because'].split(': ', 1)[-1]})"
    t = p["threshold"]
    return (f"{head}; group {p['added_group']!r} added, threshold {t['parent']:.3g} -> {t['new']:.3g}, "
            f"{p['new_outside_lab_cells']} of these cells still outside")


if __name__ == "__main__":  # pragma: no cover
    main()
