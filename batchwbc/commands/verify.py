"""`batchwbc verify`: from a reviewed workbook to a verified one (and, optionally, labelled data).

The technologist's half of the job: read the Verified class a person chose for each cell
(blank = the machine's class accepted) and the Verified by / Verified on of each patient,
recount every patient from the verified classes with the run's own functions and thresholds,
and write a workbook showing both counts side by side and which patients are signed.
No model is run and nothing heavier than openpyxl is imported. The input workbook is only
read; the output is written atomically; any problem (an unknown class, an edited machine
column, another model's workbook) stops with one sentence each and exit code 2 before
anything is written. A crop missing from --export-labelled is reported and skipped (exit 3).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from batchwbc import __version__
from batchwbc.ops import exit_codes
from batchwbc.commands.run import JobError, check_outputs
from batchwbc.ops.provenance import sha256_of
from batchwbc.engine.model_metadata import is_adapted_version

if TYPE_CHECKING:
    from batchwbc.core.config import Settings
    from batchwbc.outputs.gallery import GalleryRunInfo, SignOff
    from batchwbc.outputs.workbook_reader import ReportContents
    from batchwbc.core.verification import PatientVerification, VerifiedCell
    from batchwbc.outputs.lis.deliver import LisPlan
    from batchwbc.outputs.lis.results import RunFacts

log = logging.getLogger("batchwbc")


@dataclass(frozen=True)
class VerifyOptions:
    """Everything a verification is asked to do; the CLI builds one from its options."""

    report: Path
    out: Path
    reviewer: str = ""  # who ran the verification (Run sheet); patients are signed in the workbook
    model_path: Path | None = None  # when given, the workbook must come from this model
    config_path: Path | None = None  # None: the thresholds recorded in the workbook (its run record)
    export_labelled: Path | None = None
    slides: Path | None = None  # where the crops are now; None: the slides root the run record names
    html_dir: Path | None = None  # also write the HTML gallery of the verified cells here
    # -- LIS (issue 21, batchwbc.outputs.lis): signed patients only
    hl7_dir: Path | None = None  # one ORU^R01 file per signed patient
    mllp: str | None = None  # HOST:PORT: send the --hl7 files over MLLP and await each ACK
    fhir_path: Path | None = None  # one FHIR R4 transaction Bundle per run


def _fail(problems: list[str], report: Path) -> JobError:
    for p in problems:
        log.error("%s", p)
    n = len(problems)
    return JobError(exit_codes.USAGE, f"{report.name} was not verified because of the "
                    f"{'problem' if n == 1 else f'{n} problems'} above; nothing was written and the workbook is unchanged.")


def verify_job(opts: VerifyOptions) -> int:
    """Verify one workbook; returns an exit code, raises JobError for a one-sentence failure."""
    from batchwbc.core.config import ConfigError, load_settings
    from batchwbc.outputs.labelled_export import ExportError, check_export_folder
    from batchwbc.outputs.workbook_reader import ReportReadError, read_report

    # -- fail fast: paths, config, the workbook itself ---------------------------------------
    if opts.out.resolve() == opts.report.resolve():
        raise JobError(exit_codes.USAGE, f"--out must differ from {opts.report.name}: the reviewed workbook is "
                                        "never overwritten, so nothing a person typed can be lost.")
    check_outputs(((opts.out, (".xlsx",)), (opts.fhir_path, (".json",))), opts.html_dir)
    _check_lis(opts)
    if opts.export_labelled is not None:
        try:
            check_export_folder(opts.export_labelled)
        except ExportError as exc:
            raise JobError(exit_codes.USAGE, str(exc)) from None
    if opts.model_path is not None and not opts.model_path.is_file():
        raise JobError(exit_codes.USAGE, f"model file {opts.model_path} does not exist.")
    try:
        settings = load_settings(opts.config_path) if opts.config_path else None
    except ConfigError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None
    try:
        contents = read_report(opts.report)
    except ReportReadError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None

    made_by = contents.record.model_sha256
    if opts.model_path is not None:
        sha = sha256_of(opts.model_path)
        if sha != made_by:
            raise JobError(exit_codes.USAGE, (
                f"{opts.report.name} was made by model {contents.record.model_version or '?'} "
                f"(sha256 {made_by[:12]}...), not by --model {opts.model_path.name} (sha256 {sha[:12]}...); "
                "verify a workbook with the model that made it."))
    if contents.problems:
        raise _fail(contents.problems, opts.report)
    if settings is None:
        try:
            settings = contents.settings()
        except ReportReadError as exc:
            raise JobError(exit_codes.USAGE, str(exc)) from None
        if contents.settings_missing:
            log.warning("the Run sheet does not record %s; the defaults are used (pass --config to set them).",
                        ", ".join(contents.settings_missing))
    return _verify(opts, contents, settings)


def _verify(opts: VerifyOptions, contents: "ReportContents", settings: "Settings") -> int:
    from batchwbc.outputs import workbook
    from batchwbc.outputs.run_record import verified_record
    from batchwbc.core.verification import CarriedShift, VerifiedReport, class_choices, verify_patients

    choices = class_choices(contents.model_classes, [rc.cell.class_id for rc in contents.cells])
    cells, problems = resolve_verified(contents, choices)
    if problems:
        raise _fail(problems, opts.report)
    now = datetime.now().astimezone()
    stamp = now.isoformat(sep=" ", timespec="minutes")
    shifts = {p: CarriedShift(message) for p, message in contents.shifts.items()}
    patients = verify_patients(contents.patients, cells, contents.errors, contents.signoff, settings, stamp, shifts)
    signed = sum(p.signed for p in patients)
    corrected = sum(p.corrected for p in patients)
    if contents.resorted_review:
        log.warning("the Review sheet was re-sorted, so its pictures can no longer be matched to their rows "
                    "safely; the verified workbook lists the review cells without thumbnails.")

    export_rows: list[tuple[str, str]] = []
    code = exit_codes.OK
    if opts.export_labelled is not None:
        code, export_rows = _export(opts, contents, patients, cells)
    rows = verification_rows(opts, patients, cells, now) + export_rows
    lis_plan = None
    if opts.hl7_dir is not None or opts.fhir_path is not None:  # built before the workbook: its Run sheet lists them
        from batchwbc.outputs.lis.deliver import plan_hl7, run_rows

        lis_plan = plan_hl7(patients, settings, _run_facts(contents), contents.model_classes, now)
        rows += run_rows(lis_plan, opts.hl7_dir, opts.fhir_path)
    rep = VerifiedReport(patients=tuple(patients), cells=tuple(cells), errors=tuple(contents.errors),
                         model_classes=contents.model_classes, choices=tuple(choices),
                         run_rows=tuple(_with_settings(contents.run_rows, settings) + rows),
                         model_adapted=is_adapted_version(contents.record.model_version))
    try:
        workbook.write_verified_workbook(rep, settings, opts.out, verified_record(contents.record, settings))
    except (OSError, workbook.OutputError) as exc:
        raise JobError(exit_codes.FAILED, f"the verified workbook could not be written ({str(exc).rstrip('.')}).") from None
    log.info("verified %d patients: %d signed, %d not signed; %d cells corrected; workbook: %s",
             len(patients), signed, len(patients) - signed, corrected, opts.out)
    if opts.html_dir is not None:
        write_verified_gallery(opts, contents, patients)
    for p in patients:
        if not p.signed:
            log.info("patient %s %s", p.patient, p.status)
    if lis_plan is not None:
        code = _send_lis(opts, lis_plan, patients, settings, contents, now) or code
    return code


# -- LIS messages (issue 21): batchwbc.outputs.lis does the work ----------------------------------

def _check_lis(opts: VerifyOptions) -> None:
    """Fail fast, before anything is written: the optional libraries, --mllp's address."""
    if opts.hl7_dir is None and opts.fhir_path is None and opts.mllp is None:
        return
    from batchwbc.outputs.lis import destination_problem

    problem = destination_problem(opts.hl7_dir, opts.mllp, opts.fhir_path)
    if problem is not None:
        raise JobError(exit_codes.USAGE, problem)


def _run_facts(contents: "ReportContents") -> "RunFacts":
    from batchwbc.outputs.lis.results import RunFacts

    from batchwbc.outputs.run_record import started_at

    rec = contents.record
    return RunFacts(__version__, Path(rec.model_file).name, rec.model_version, rec.model_sha256, started_at(rec))


def _send_lis(opts: VerifyOptions, plan: "LisPlan", patients: Sequence["PatientVerification"],
              settings: "Settings", contents: "ReportContents", now: datetime) -> int:
    """Write the messages and the bundle, send over MLLP; NOT_DELIVERED when a signed patient
    did not reach the LIS (not built, or not acknowledged). The workbook is already written."""
    from batchwbc.outputs.lis import LisError
    from batchwbc.outputs.lis.deliver import deliver_to, write_messages

    for patient in plan.unsigned:
        log.info("LIS: patient %s is not signed and was not sent", patient)
    for patient, reason in plan.failed:
        log.error("LIS: patient %s was not sent: %s", patient, reason)
    undelivered = list(plan.failed)
    try:
        if opts.hl7_dir is not None:
            write_messages(opts.hl7_dir, plan.messages)
            log.info("LIS: %d HL7 messages in %s", len(plan.messages), opts.hl7_dir)
        if opts.fhir_path is not None:
            from batchwbc.outputs.lis import fhir
            from batchwbc.outputs.workbook import atomic_output

            built = {m.patient for m in plan.messages}
            bundle = fhir.build_bundle([p for p in patients if p.patient in built], settings, _run_facts(contents),
                                       contents.model_classes, now)
            fhir.validate(bundle)
            with atomic_output(opts.fhir_path) as tmp:
                Path(tmp).write_text(fhir.dumps(bundle), encoding="utf-8")
            log.info("LIS: FHIR bundle of %d patients: %s", len(built), opts.fhir_path)
    except LisError as exc:
        raise JobError(exit_codes.FAILED, f"{str(exc).rstrip('.')}; the verified workbook was written.") from None
    except OSError as exc:
        raise JobError(exit_codes.FAILED, f"the LIS messages could not be written ({exc.strerror or exc}); "
                                         "the verified workbook was written.") from None
    if opts.hl7_dir is not None:
        undelivered += deliver_to(opts.mllp, opts.hl7_dir, plan.messages, settings.lis.ack_timeout_s)
    if undelivered:
        log.error("LIS: %d signed patients were not delivered (%s); see the lines above.",
                  len(undelivered), ", ".join(p for p, _ in undelivered))
        return exit_codes.NOT_DELIVERED
    return exit_codes.OK


def resolve_verified(contents: "ReportContents", choices: Sequence[str]) -> tuple[list["VerifiedCell"], list[str]]:
    """Each cell with the class id a person chose (Cells or Review sheet), and one sentence per
    value that is not a class of this model or that the two sheets disagree on."""
    from batchwbc.core.verification import VerifiedCell, resolve_class

    problems: list[str] = []
    listed = ", ".join(choices)

    def resolve(sheet: str, row: int, text: str) -> str:
        if not text:
            return ""
        cid = resolve_class(text, choices)
        if cid is None:
            problems.append(f"{sheet} sheet row {row}: Verified class {text!r} is not a class of this model "
                            f"(choose one of: {listed}; or leave it blank to accept the machine's class).")
            return ""
        return cid

    from_review: dict[tuple[str, str], str] = {}
    row_of: dict[tuple[str, str], int] = {}
    for line in contents.review:
        from_review[(line.patient, line.file)] = resolve("Review", line.row, line.verified_text)
        row_of[(line.patient, line.file)] = line.row
    known = {(rc.cell.patient, rc.cell.file) for rc in contents.cells}
    for key, row in row_of.items():
        if key not in known:
            problems.append(f"Review sheet row {row}: patient {key[0]}, file {key[1]} is not in the Cells sheet.")
    cells = []
    for rc in contents.cells:
        key = (rc.cell.patient, rc.cell.file)
        a = resolve("Cells", rc.row, rc.verified_text)
        b = from_review.get(key, "")
        if a and b and a != b:
            problems.append(f"patient {key[0]}, file {key[1]}: Verified class is {a} in the Cells sheet (row {rc.row}) "
                            f"but {b} in the Review sheet (row {row_of[key]}); make them agree or clear one.")
        cells.append(VerifiedCell(rc.cell, a or b))
    return cells, problems


def _with_settings(run_rows: Sequence[tuple[str, str]], settings: "Settings") -> list[tuple[str, str]]:
    """The report's Run rows, with the threshold rows stating the thresholds actually used."""
    now = dict(settings.describe())
    return [(k, now.get(k, v)) for k, v in run_rows]


def verification_rows(opts: VerifyOptions, patients: Sequence["PatientVerification"], cells: Sequence["VerifiedCell"],
                      now: datetime) -> list[tuple[str, str]]:
    """The Run sheet's `Verification: ...` rows: when, by whom, from what, with what result."""
    from batchwbc.outputs.workbook_reader import VERIFICATION_PREFIX as V

    signed = sum(p.signed for p in patients)
    return [
        (f"{V}verified at", now.isoformat(sep=" ", timespec="seconds")),
        (f"{V}run by (--reviewer)", opts.reviewer or "(not given)"),
        (f"{V}batchwbc version", __version__),
        (f"{V}from workbook", str(opts.report.resolve())),
        (f"{V}thresholds from", f"--config {opts.config_path}" if opts.config_path else "those the workbook records"),
        (f"{V}patients signed", f"{signed} of {len(patients)}"),
        (f"{V}cells with a Verified class", str(sum(bool(vc.verified) for vc in cells))),
        (f"{V}cells corrected", str(sum(vc.corrected for vc in cells))),
        (f"{V}rules", "a blank Verified class accepts the machine's class; a patient is signed when every "
                      "review cell has a Verified class and Verified by holds a name"),
    ]


def _export(opts: VerifyOptions, contents: "ReportContents", patients: Sequence["PatientVerification"],
            cells: Sequence["VerifiedCell"]) -> tuple[int, list[tuple[str, str]]]:
    """Copy the verified cells' crops; PARTIAL when some were missing (each one logged)."""
    from batchwbc.outputs.labelled_export import ExportError, export_labelled
    from batchwbc.outputs.workbook_reader import VERIFICATION_PREFIX as V

    root = _crops_root(opts, contents)
    try:
        result = export_labelled(patients, cells, root, opts.export_labelled, opts.reviewer)
    except ExportError as exc:
        raise JobError(exit_codes.USAGE, str(exc)) from None
    except OSError as exc:
        raise JobError(exit_codes.FAILED, f"the labelled export to {opts.export_labelled} failed "
                                         f"({exc.strerror or exc}); the verified workbook was not written.") from None
    for sentence in result.missing:
        log.warning("%s", sentence)
    log.info("exported %d verified cells to %s", result.exported, opts.export_labelled)
    rows = [(f"{V}labelled export", f"{opts.export_labelled} ({result.exported} cells from {root}; "
                                    f"{len(result.missing)} crops missing)")]
    return (exit_codes.PARTIAL if result.missing else exit_codes.OK), rows


def _crops_root(opts: VerifyOptions, contents: "ReportContents") -> Path:
    return opts.slides or Path(contents.record.slides_root)


def gallery_run_info(contents: "ReportContents") -> "GalleryRunInfo":
    """The run facts the gallery prints, as the workbook's run record holds them."""
    from batchwbc.outputs.gallery import GalleryRunInfo
    from batchwbc.outputs.run_record import started_at

    rec = contents.record
    return GalleryRunInfo(started_at(rec) or datetime.now().astimezone(), rec.batchwbc_version, rec.slides_root,
                          Path(rec.model_file).name, rec.model_version, rec.model_sha256, rec.review_threshold,
                          contents.model_classes, title="batchwbc verified cell gallery")


def gallery_signoffs(patients: Sequence["PatientVerification"]) -> dict[str, "SignOff"]:
    """Each patient's sign-off for the gallery index, exactly as the verified workbook states it.

    Decided here, where verification already knows it (PatientVerification.signed, and the
    Verified on it stamped for a signed patient left undated), so the gallery only prints it.
    An unsigned patient's reason is its Summary Status without the leading "not signed: ".
    """
    from batchwbc.outputs.gallery import SignOff

    out: dict[str, SignOff] = {}
    for p in patients:
        if p.signed:
            out[p.patient] = SignOff(True, p.verified_by, p.verified_on)
        else:
            out[p.patient] = SignOff(False, reason=p.status.removeprefix("not signed: "))
    return out


def write_verified_gallery(opts: VerifyOptions, contents: "ReportContents",
                           patients: Sequence["PatientVerification"]) -> None:
    """The --html gallery of the verified cells (each under its verified class, corrections
    marked, each patient's sign-off on the index), written after the workbook: a failure
    here leaves the workbook written."""
    import time
    from dataclasses import replace

    from batchwbc.outputs.gallery import GalleryError, write_gallery
    from batchwbc.core.summary import run_alert

    t = time.monotonic()
    by_patient = {p.patient: p.post for p in patients}
    cells_by = {p.patient: list(p.post.cells) for p in patients}
    machine = {(c.patient, c.file): c.class_id for p in patients for c in p.pre.cells}
    corrected = {key: cid for p in patients for c in p.post.cells
                 if (cid := machine[(key := (c.patient, c.file))]) != c.class_id}
    info = replace(gallery_run_info(contents),
                   alert=run_alert(list(by_patient.values()), adapted=is_adapted_version(contents.record.model_version)))
    try:
        res = write_gallery(opts.html_dir, list(by_patient), cells_by, by_patient, info,
                            _crops_root(opts, contents), corrected=corrected,
                            signoffs=gallery_signoffs(patients))
    except GalleryError as exc:
        raise JobError(exit_codes.FAILED, f"{str(exc).rstrip('.')}; the verified workbook was written.") from None
    log.info("HTML gallery: %d patient pages, %d cells, %d thumbnails, %.1f s; open %s",
             res.pages, res.cells, res.thumbnails, time.monotonic() - t, Path(opts.html_dir) / "index.html")
