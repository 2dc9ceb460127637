"""Each patient's summary, computed once per run: differential, flags and errors together.

The report formats these records and the job's log line counts from them, so the two can
never disagree about a patient's flags or about which patients exist. Pure: no I/O and no
heavy imports (the layering test holds it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from batchwbc.core.config import Settings
from batchwbc.core.differential import Differential, summarize
from batchwbc.core.flags import DATA_SHIFT, MANY_UNCLASSIFIED, MOSTLY_REVIEW, Flag, evaluate
from batchwbc.core.records import CellResult, FileError, RunData

if TYPE_CHECKING:
    from batchwbc.engine.data_shift import ShiftDecision


@dataclass(frozen=True)
class PatientSummary:
    """One patient's row of the report: what was counted, what it raises, what failed."""

    patient: str
    differential: Differential
    flags: tuple[Flag, ...]  # most severe first, as flags.evaluate returns them
    errors: tuple[FileError, ...]  # unreadable files ('file' set) and whole-folder failures ('file' == '')
    cells: tuple[CellResult, ...]  # this patient's cells, in run order (the Review sheet lists some)

    @property
    def unreadable_files(self) -> int:
        return sum(1 for e in self.errors if e.file)


@dataclass(frozen=True)
class RunTotals:
    """Run-wide sums of the patient summaries, for the Run sheet and the log's summary line."""

    patients: int
    wbc: int
    review_cells: int
    flags: int
    classified: int = 0  # cells given a class (leukocyte or not)
    unclassified: int = 0  # crops read but not recognised as a known cell: in no count


def summarize_run(run: RunData, settings: Settings,
                  shifts: "Mapping[str, ShiftDecision] | None" = None) -> list[PatientSummary]:
    """One summary per patient in report order: the discovered patients first (empty ones
    included), then - defensively, so nobody is dropped - any patient seen only in cells or
    errors. `shifts` are the patients' data-shift decisions (data_shift.decide_all), which
    add DATA_SHIFT to their flags."""
    return summarize_groups(run.patients, run.cells, run.errors, settings, shifts)


def summarize_groups(patients: Sequence[str], cells: Sequence[CellResult], errors: Sequence[FileError],
                     settings: Settings, shifts: "Mapping[str, ShiftDecision] | None" = None) -> list[PatientSummary]:
    """summarize_run's work on plain lists, so `batchwbc verify` can count a report's cells
    with their verified classes through exactly the same functions."""
    cells_by: dict[str, list[CellResult]] = {}
    for c in cells:
        cells_by.setdefault(c.patient, []).append(c)
    errors_by: dict[str, list[FileError]] = {}
    for e in errors:
        errors_by.setdefault(e.patient, []).append(e)
    order = dict.fromkeys([*patients, *cells_by, *errors_by])
    summaries = []
    for patient in order:
        group = tuple(cells_by.get(patient, ()))
        diff = summarize(group)
        summaries.append(PatientSummary(
            patient=patient,
            differential=diff,
            flags=tuple(evaluate(diff, settings, shift=(shifts or {}).get(patient))),
            errors=tuple(errors_by.get(patient, ())),
            cells=group,
        ))
    return summaries


def totals(summaries: list[PatientSummary]) -> RunTotals:
    return RunTotals(
        patients=len(summaries),
        wbc=sum(s.differential.wbc for s in summaries),
        review_cells=sum(s.differential.n_review for s in summaries),
        flags=sum(len(s.flags) for s in summaries),
        classified=sum(s.differential.classified for s in summaries),
        unclassified=sum(s.differential.unclassified for s in summaries),
    )


def run_alert(summaries: Sequence[PatientSummary], run_shift: "ShiftDecision | None" = None,
              adapted: bool = False) -> str | None:
    """The banner over the Summary sheet and the gallery index when the model may not suit the
    images: DATA_SHIFT for the run or any patient, or a patient with many unclassified crops or
    most cells in review. Plain words and the next step, since a flag on line 6 of 7 of one
    patient's Flags cell was missed; None when nothing calls for it. `adapted`: the model was
    written by `batchwbc adapt` (model_metadata.is_adapted_version), which changes the next step."""
    from batchwbc.engine.data_shift import next_step

    def having(*codes: str) -> list[str]:
        return [s.patient for s in summaries if any(f.code in codes for f in s.flags)]

    shifted, unsuited = having(DATA_SHIFT), having(MANY_UNCLASSIFIED, MOSTLY_REVIEW)
    run_raised = run_shift is not None and run_shift.raised
    if not (shifted or unsuited or run_raised):
        return None
    n = len(summaries)
    parts = []
    if run_raised or shifted:
        run_part = (f"{100.0 * run_shift.unusual / run_shift.cells:.0f}% of this run's cells"
                    if run_raised and run_shift is not None and run_shift.cells else "")
        who = f"the cells of {len(shifted)} of {n} {'patient' if n == 1 else 'patients'}" if shifted else ""
        parts.append(f"{' and '.join(p for p in (run_part, who) if p)} are unlike the images the model was "
                     "validated on (DATA_SHIFT)")
    if unsuited:
        parts.append(f"for {len(unsuited)} of {n} {'patient' if n == 1 else 'patients'} the model recognised few "
                     "crops or is unsure of most cells (MANY_UNCLASSIFIED, MOSTLY_REVIEW)")
    return (f"Results unreliable: {'; and '.join(parts)}. Before using these results, {next_step(adapted)}.")


def run_alert_of(run: RunData, summaries: Sequence[PatientSummary]) -> str | None:
    """run_alert for a run: its DATA_SHIFT decision, and the next step for its model as shipped
    or adapted (model_metadata.is_adapted_version). One place, since the Summary banner, the Run
    sheet, the gallery and the LIS notes must say the same."""
    from batchwbc.engine.model_metadata import is_adapted_version

    return run_alert(summaries, run.data_shift, is_adapted_version(run.model.model_version))
