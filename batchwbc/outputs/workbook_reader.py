"""Read a batchwbc workbook back (a report or a verified workbook) for `batchwbc verify`.

The run's facts and settings come from the workbook's hidden run record
(batchwbc.outputs.run_record), never from the Run sheet's wording, so those labels are free
to change; only a workbook written before the record (batchwbc 0.1.0) is read by its labels.

What a person may have changed - Verified class, Verified by, Verified on - is read as it
was typed; everything else is the machine's and is checked against each row's hidden Check
cell (batchwbc.outputs.row_checks), so an edit to a class, a confidence or a Run-sheet threshold is
reported, never silently used. Rows are found by their headers, not their positions, and a
column a person adds under a header of their own is ignored. Nothing here writes a file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Sequence

from batchwbc.core.config import DEFAULT_SETTINGS, ConfigError, Settings, settings_from_dict
from batchwbc.outputs.workbook import EDITABLE_COLUMNS, HEADER_ROWS, KNOWN_HEADERS, WHOLE_PATIENT
from batchwbc.core.records import CellResult, FileError
from batchwbc.outputs.row_checks import CHECK_HEADER, edited, written_row
from batchwbc.outputs.run_record import DATA_SHIFT_PREFIX, RecordError, RunRecord, legacy_record, read_record_sheet

#: Run-sheet items added by `batchwbc verify` start with this; a later verify replaces them.
VERIFICATION_PREFIX = "Verification: "
#: Run-sheet items a report without a run record (batchwbc 0.1.0) always has; without them it is not one.
RUN_REQUIRED = ("batchwbc version", "Model sha256", "Model version", "Model classes", "Cells classified")
_MAX_PROBLEMS = 20  # sentences listed before "and N more"
_KEY = re.compile(r"\[([a-z_]+)\.([a-z_]+)\]\s*$")
_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*%?\s*$")


class ReportReadError(Exception):
    """A workbook verify cannot use at all; str is one sentence."""


@dataclass(frozen=True)
class ReadCell:
    """A Cells-sheet line: the machine's result and the Verified class as typed."""

    cell: CellResult
    verified_text: str  # "" when blank
    row: int


@dataclass(frozen=True)
class ReviewLine:
    patient: str
    file: str
    verified_text: str
    row: int


@dataclass
class ReportContents:
    """A workbook as verify needs it; `problems` are one sentence each (edits, lost rows)."""

    path: Path
    run_rows: list[tuple[str, str]]  # the Run sheet, without an earlier verification's rows: shown, never parsed
    record: RunRecord  # the run's facts and settings (the hidden record, or rebuilt from an old Run sheet)
    patients: list[str]  # Summary order
    signoff: dict[str, tuple[str, str]]  # patient -> (Verified by, Verified on) as typed
    cells: list[ReadCell]
    review: list[ReviewLine]
    errors: list[FileError]
    problems: list[str] = field(default_factory=list)
    resorted_review: bool = False  # thumbnails could not be matched safely and were left out
    settings_missing: list[str] = field(default_factory=list)  # keys an old Run sheet lacks (defaults used)

    @property
    def model_classes(self) -> tuple[str, ...]:
        return self.record.model_classes

    @property
    def shifts(self) -> dict[str, str]:
        """patient -> its DATA_SHIFT message as reported (after "Data shift: ")."""
        return dict(self.record.data_shift)

    def settings(self) -> Settings:
        """The thresholds the workbook was made (or last verified) with, validated like a
        config file; raises ReportReadError."""
        try:
            return self.record.settings_object()
        except ConfigError as exc:
            raise ReportReadError(f"{exc.args[0].rstrip('.')}; pass the lab's config file with --config.") from None


def _text(value: Any) -> str:
    """What a person typed, as text: dates as ISO dates, numbers without a trailing .0."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        if value.time() == time(0, 0):
            return value.date().isoformat()
        return value.isoformat(sep=" ", timespec="minutes")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return " ".join(str(value).split())


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0  # only reachable after an edit, which the row check has already reported


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


class _Sheet:
    """One sheet's header and checked rows."""

    def __init__(self, wb: Any, name: str, required: Sequence[str], problems: list[str]):
        if name not in wb.sheetnames:
            raise ReportReadError(f"the workbook has no {name} sheet, so it is not a complete batchwbc report.")
        ws = wb[name]
        self.ws = ws
        header_row = _header_row(ws, name, (*required, CHECK_HEADER))
        rows = ws.iter_rows(min_row=header_row, values_only=True)
        header = [("" if h is None else str(h)) for h in next(rows, ())]
        missing = [h for h in (*required, CHECK_HEADER) if h not in header]
        if missing:
            raise ReportReadError(
                f"the {name} sheet lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                "it was changed, or the workbook was not written by this batchwbc version.")
        check_at = header.index(CHECK_HEADER)
        protected = [i for i, h in enumerate(header)
                     if h in KNOWN_HEADERS and h not in EDITABLE_COLUMNS and i != check_at]
        names = [header[i] for i in protected]
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.written: dict[int, int | None] = {}  # current row -> row it was written at
        for n, values in enumerate(rows, start=header_row + 1):
            values = list(values) + [None] * (len(header) - len(values))
            if all(v is None or v == "" for v in values):
                continue
            check = values[check_at]
            bad = edited(names, [values[i] for i in protected], check)
            if bad is None:
                problems.append(
                    f"{name} sheet row {n} has no valid check value, so it was typed in or pasted, or a "
                    "column was inserted or deleted; only the yellow columns may be changed.")
            elif bad:
                problems.append(
                    f"{name} sheet row {n}: the machine's {_plural(len(bad), 'column', 'columns')} "
                    f"{', '.join(bad)} {_plural(len(bad), 'was', 'were')} edited; only the yellow columns "
                    f"({', '.join(EDITABLE_COLUMNS)}) may be changed.")
            self.written[n] = written_row(check)
            self.rows.append((n, {h: v for h, v in zip(header, values) if h}))


def _header_row(ws: Any, name: str, wanted: Sequence[str]) -> int:
    """The row holding a sheet's headers: workbook.HEADER_ROWS for this version's workbooks (the
    Summary's row 1 is a banner), else row 1 (a workbook from before the banner); the first of
    them holding every wanted header, or HEADER_ROWS' row when none does (the caller names
    what is missing)."""
    expected = HEADER_ROWS.get(name, 1)
    for row in dict.fromkeys((expected, 1)):
        values = next(ws.iter_rows(min_row=row, max_row=row, values_only=True), ())
        if all(h in {"" if v is None else str(v) for v in values} for h in wanted):
            return row
    return expected


def read_report(path: str | os.PathLike) -> ReportContents:
    """Read and check a workbook; raises ReportReadError when it cannot be used at all."""
    from openpyxl import load_workbook

    p = Path(path)
    if not p.is_file():
        raise ReportReadError(f"{p} does not exist or is not a file.")
    try:
        wb = load_workbook(p, data_only=True)  # not read-only: the Review thumbnails are needed
    except OSError as exc:
        raise ReportReadError(f"{p.name} cannot be read ({exc.strerror or exc}).") from None
    except Exception as exc:  # noqa: BLE001 - zip, XML and openpyxl errors all mean "not readable"
        raise ReportReadError(f"{p.name} is not an Excel workbook batchwbc can read ({type(exc).__name__}).") from None
    try:
        return _read(wb, p)
    finally:
        wb.close()


#: The sheets of `batchwbc evaluate`'s workbook (evaluation_report.SHEETS, not imported: that
#: module loads the plotting side) that a run's report never has.
_EVALUATION_SHEETS = {"Per class", "Confusion", "Calibration", "Review threshold", "Bland-Altman"}


def _read(wb: Any, p: Path) -> ReportContents:
    problems: list[str] = []
    if _EVALUATION_SHEETS <= set(wb.sheetnames):
        raise ReportReadError(
            f"{p.name} is a validation workbook written by `batchwbc evaluate` (model agreement with verified cells), "
            "not a run's report; `batchwbc verify` takes the REPORT.xlsx written by `batchwbc run`.")
    if "Run" not in wb.sheetnames:
        raise ReportReadError(f"{p.name} has no Run sheet, so it is not a batchwbc report.")
    try:
        record = read_record_sheet(wb, p.name)
    except RecordError as exc:
        raise ReportReadError(str(exc)) from None
    run_sheet = _Sheet(wb, "Run", ("Item", "Value"), problems)
    run_rows = [(_text(r.get("Item")), _text_keep(r.get("Value"))) for _, r in run_sheet.rows]
    run = dict(run_rows)
    missing = [k for k in RUN_REQUIRED if k not in run]
    if record is None and missing:
        raise ReportReadError(
            f"the Run sheet of {p.name} lacks {', '.join(missing)}, so it is not a batchwbc report.")
    run_rows = [(k, v) for k, v in run_rows if not k.startswith(VERIFICATION_PREFIX)]

    summary = _Sheet(wb, "Summary", ("Patient", "Verified by", "Verified on"), problems)
    patients, signoff, shifts = [], {}, {}
    for _, r in summary.rows:
        patient = _text_keep(r.get("Patient"))
        patients.append(patient)
        signoff[patient] = (_text(r.get("Verified by")), _text(r.get("Verified on")))
        if record is None:  # a workbook without a run record: its DATA_SHIFT flags as worded
            flags = _text_keep(r.get("Flags (verified)", r.get("Flags"))).splitlines()
            shift = next((f for f in flags if f.startswith(DATA_SHIFT_PREFIX)), None)
            if shift is not None:
                shifts[patient] = shift[len(DATA_SHIFT_PREFIX):]
    settings_missing: list[str] = []
    if record is None:
        data, settings_missing = _settings_data(run_rows)
        record = legacy_record(run, data, shifts)

    cells_sheet = _Sheet(wb, "Cells", ("Patient", "File", "Class", "Confidence", "Second class",
                                       "Second probability", "Review", "Verified class"), problems)
    cells: list[ReadCell] = []
    seen: dict[tuple[str, str], int] = {}
    for n, r in cells_sheet.rows:
        c = CellResult(
            patient=_text_keep(r.get("Patient")), file=_text_keep(r.get("File")),
            class_id=_text(r.get("Class")), confidence=_number(r.get("Confidence")),
            second_class=_text(r.get("Second class")), second_prob=_number(r.get("Second probability")),
            review=_text(r.get("Review")).lower() == "yes", review_reason=_text_keep(r.get("Review reason")),
        )
        key = (c.patient, c.file)
        if key in seen:
            problems.append(f"Cells sheet row {n} repeats the cell of row {seen[key]} "
                            f"(patient {c.patient}, file {c.file}); rows may not be copied.")
            continue
        seen[key] = n
        cells.append(ReadCell(c, _text(r.get("Verified class")), n))
    # rows of the Cells sheet: the crops read, since the count of cells classified leaves out unclassified crops
    expected = record.crops_read
    if expected > len(cells):
        problems.append(f"the Cells sheet lists {len(cells)} cells but the report classified {expected}: "
                        "rows were deleted; start again from the original report.")

    review_sheet = _Sheet(wb, "Review", ("Patient", "File", "Verified class"), problems)
    review = [ReviewLine(_text_keep(r.get("Patient")), _text_keep(r.get("File")), _text(r.get("Verified class")), n)
              for n, r in review_sheet.rows]
    resorted = any(review_sheet.written.get(line.row) != line.row for line in review)
    if not resorted:
        cells = _with_thumbnails(review_sheet.ws, review, cells)

    errors_sheet = _Sheet(wb, "Errors", ("Patient", "File", "Reason"), problems)
    errors = []
    for _, r in errors_sheet.rows:
        file = _text_keep(r.get("File"))
        errors.append(FileError(_text_keep(r.get("Patient")), "" if file == WHOLE_PATIENT else file,
                                _text_keep(r.get("Reason"))))

    if len(problems) > _MAX_PROBLEMS:
        more = len(problems) - _MAX_PROBLEMS
        problems = problems[:_MAX_PROBLEMS] + [f"... and {more} more {_plural(more, 'problem', 'problems')} like these."]
    return ReportContents(path=p, run_rows=run_rows, record=record, patients=patients, signoff=signoff, cells=cells,
                          review=review, errors=errors, problems=problems, resorted_review=resorted,
                          settings_missing=settings_missing)


def _text_keep(value: Any) -> str:
    """A machine-written name or value exactly as stored (spaces kept); '' for an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _with_thumbnails(ws: Any, review: Sequence[ReviewLine], cells: list[ReadCell]) -> list[ReadCell]:
    """The review cells get back the thumbnail embedded in their row (the sheet is in its
    written order, so each picture still sits beside the row it was placed at)."""
    from dataclasses import replace

    by_row = {line.row: (line.patient, line.file) for line in review}
    pictures: dict[tuple[str, str], bytes] = {}
    for img in getattr(ws, "_images", []):
        anchor = getattr(getattr(img, "anchor", None), "_from", None)
        key = by_row.get(anchor.row + 1) if anchor is not None else None
        if key is not None:
            pictures[key] = img._data()
    return [replace(rc, cell=replace(rc.cell, thumbnail_jpeg=pictures[(rc.cell.patient, rc.cell.file)]))
            if (rc.cell.patient, rc.cell.file) in pictures else rc for rc in cells]


def settings_from_run(run_rows: Sequence[tuple[str, str]]) -> tuple[Settings, list[str]]:
    """The thresholds a workbook without a run record was made with, rebuilt from its Run
    sheet's "[table.key]" rows through the config loader (so they are validated like a config
    file); also the keys the sheet does not record, for which the defaults are used."""
    data, missing = _settings_data(run_rows)
    try:
        return settings_from_dict(data, "the Run sheet"), missing
    except ConfigError as exc:
        raise ReportReadError(f"{exc.args[0].rstrip('.')}; pass the lab's config file with --config.") from None


def _settings_data(run_rows: Sequence[tuple[str, str]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The config document an old Run sheet's "[table.key]" rows state, and the keys it lacks."""
    data: dict[str, dict[str, Any]] = {}
    for item, value in run_rows:
        m = _KEY.search(item)
        if m is None:
            continue
        table, key = m.groups()
        parsed = _setting_value(table, value)
        if parsed is not None:
            data.setdefault(table, {})[key] = parsed
    expected = [m.groups() for item, _ in DEFAULT_SETTINGS.describe() if (m := _KEY.search(item))]
    missing = [f"{t}.{k}" for t, k in expected if k not in data.get(t, {}) and not (t, k) == ("review", "threshold")]
    return data, missing


def _setting_value(table: str, value: str) -> Any:
    text = value.strip()
    if table == "reference_ranges":
        if text == "none":
            return []
        m = _RANGE.match(text)
        return [float(m.group(1)), float(m.group(2))] if m else text
    if text == "model default":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text  # settings_from_dict names the key and the bad value
