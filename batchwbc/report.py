"""Write a run's results as an Excel workbook (for people) and a cells CSV (for software).

Three promises shape this module:
* Atomic: everything is written to a hidden temporary file in the target folder and renamed
  over the old report only when complete, so an interrupted or failed run leaves the previous
  report untouched and no half-written file or temp file behind.
* Text stays text: folder and file names come from the lab's disk, so a name such as
  ``=HYPERLINK(...)`` must never become a live formula. Every string cell is forced to the
  string type (openpyxl would otherwise store a leading "=" as a formula and "#N/A" as an
  error) and names starting with = + - @ also get Excel's quotePrefix, so even editing the
  cell in Excel keeps it text.
* Modest memory: openpyxl's write-only mode streams rows to disk, so 50,000 cells cost little.

Sheets: Summary, Differential, Cells, Review, Errors, Run (see docs/report.md). A few columns
are the technologist's (Verified class with a drop-down, Verified by, Verified on: yellow);
every other one is the machine's (grey) and each row ends with a hidden Check of its values
(batchwbc.rowcheck), so `batchwbc verify` can tell a correction from an accidental edit.
`write_verified_workbook` formats verify's result with the same sheets and checks.
"""
from __future__ import annotations

import csv
import math
import os
import re
import secrets
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from . import catalogue
from .config import Settings
from .differential import NRBC_CLASS, PLATELET_CLASS, Differential
from .flags import CRITICAL, REVIEW, WARNING, worst_severity
from .modelmeta import KEY_TEST_METRICS, KEY_TRAINING_DATA
from .results import THUMBNAIL_PX, CellResult, FileError, RunData
from .rowcheck import CHECK_HEADER, row_check
from .summary import PatientSummary, totals
from .verification import PatientVerification, VerifiedReport, class_choices

if TYPE_CHECKING:
    from .datashift import ShiftDecision


class OutputError(Exception):
    """A report path that cannot be written; str(exc) is one sentence for the user."""


SHEETS = ("Summary", "Differential", "Cells", "Review", "Errors", "Run")
#: Column names of the cells CSV, for software; class columns hold catalogue ids.
CSV_COLUMNS = ("patient", "file", "class", "confidence", "second_class", "second_prob", "review", "review_reason")

WHOLE_PATIENT = "(whole patient folder)"

#: Header fill of the machine's columns (protected: a hidden Check cell per row reveals edits).
PROTECTED_FILL = "D9D9D9"
#: Header and cell fill of the columns a person may edit (Verified class, Verified by, Verified on).
EDITABLE_FILL = "FFF2CC"
EDITABLE_NOTE = ("Yours to fill in. Every other column is the machine's: batchwbc verify refuses a "
                 "workbook in which they were edited.")
#: Excel's limit on an in-line drop-down list (formula1 of a list validation).
DROPDOWN_LIMIT = 255
SIGNED = "signed"  # a style like the severities: green, for a signed patient's status
# Excel's own "bad" red, "neutral" amber and "good" green; light blue for flags only cells in review raise
_FILLS = {CRITICAL: "FFC7CE", WARNING: "FFEB9C", SIGNED: "C6EFCE", REVIEW: "DDEBF7"}
_FONTS = {CRITICAL: "9C0006", WARNING: "9C5700", SIGNED: "006100", REVIEW: "1F4E78"}
#: Between the codes of the Summary's "Flag codes" column: split on it to get the codes.
FLAG_CODE_SEPARATOR = "; "
_FORMULA_START = ("=", "+", "-", "@")
_NEEDS_CELL = (*_FORMULA_START, "#")  # "#N/A" and the other error literals all start with "#"
# Characters XML 1.0 (and so xlsx) cannot hold; file names on Linux may contain them.
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_MAX_CELL_TEXT = 32767  # Excel's limit per cell


# =================================================================== output path checks

def check_output_writable(path: str | os.PathLike, suffixes: Sequence[str] | None = None) -> None:
    """Fail early, before hours of classification, if the report could not be written.

    `suffixes` (e.g. (".xlsx",)) optionally also checks the file name's extension.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output {p} is a folder; give a file name inside it instead.")
    if suffixes and p.suffix.lower() not in {s.lower() for s in suffixes}:
        raise OutputError(f"output file {p} must have a name ending in {' or '.join(suffixes)}.")
    folder = p.parent
    if not folder.exists():
        raise OutputError(f"the folder {folder} for the output {p.name} does not exist.")
    if not folder.is_dir():
        raise OutputError(f"{folder} is not a folder, so {p.name} cannot be written there.")
    try:
        probe = _reserve_temp(p)
    except OSError as exc:
        raise OutputError(f"cannot write in the folder {folder} ({exc.strerror or exc}).") from None
    with suppress(OSError):
        os.unlink(probe)
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise OutputError(f"output {p} exists and is not a regular file.")
        try:
            with open(p, "r+b"):
                pass  # opening for update fails on a read-only file or one locked by Excel (Windows)
        except OSError as exc:
            raise OutputError(
                f"the existing file {p} cannot be replaced ({exc.strerror or exc}); "
                "close it if it is open in Excel, or choose another name."
            ) from None


# =================================================================== atomic writing

def _reserve_temp(out: Path) -> Path:
    """Create an empty, uniquely named hidden file next to `out` (same folder: rename is atomic)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return tmp


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_output(out_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path; on success it replaces `out_path`, on ANY failure it is deleted.

    BaseException is caught on purpose: Ctrl-C (KeyboardInterrupt) or SIGTERM turned into an
    exception must still remove the temp file, and then propagate unchanged.
    """
    out = Path(out_path)
    try:
        tmp = _reserve_temp(out)
    except OSError as exc:
        raise OutputError(f"cannot create a file in {out.parent} ({exc.strerror or exc}).") from None
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, out)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            hint = "; close it if it is open in Excel" if isinstance(exc, PermissionError) else ""
            raise OutputError(f"could not write {out} ({exc.strerror or exc}){hint}.") from None
        raise


# =================================================================== cell helpers

def clean_text(value: Any) -> str:
    """Text that an xlsx cell can hold: no XML-illegal characters, within Excel's length limit."""
    return _ILLEGAL_XML.sub("\ufffd", str(value))[:_MAX_CELL_TEXT]


def _number(value: float | int | None) -> float | int | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


class _Sheet:
    """A write-only worksheet plus the styles it reuses; every str goes through `text`."""

    def __init__(self, wb: Any, title: str, columns: Sequence[str], widths: Sequence[float],
                 editable: Sequence[bool] = ()):
        """Headers `columns` plus the hidden Check column; `editable` marks the columns a
        person may change (yellow header with a note) among the machine's (grey header)."""
        from openpyxl.comments import Comment
        from openpyxl.styles import Alignment, Font, PatternFill

        self.ws = wb.create_sheet(title)
        self._Font, self._PatternFill, self._Alignment = Font, PatternFill, Alignment
        from openpyxl.utils import get_column_letter

        headers = [*columns, CHECK_HEADER]
        for i, w in enumerate([*widths, 8], 1):
            self.ws.column_dimensions[get_column_letter(i)].width = w
        self.ws.column_dimensions[get_column_letter(len(headers))].hidden = True
        self.ws.freeze_panes = "A2"
        self.rows = 0
        self.ncols = len(headers)
        self.edit_fill = PatternFill("solid", fgColor=EDITABLE_FILL)
        header_font, header_fill = Font(bold=True), PatternFill("solid", fgColor=PROTECTED_FILL)
        cells = []
        for i, name in enumerate(headers):
            if i < len(editable) and editable[i]:
                # a column style: its empty cells show yellow without one styled cell per row
                self.ws.column_dimensions[get_column_letter(i + 1)].fill = self.edit_fill
                cell = self.text(name, font=header_font, fill=self.edit_fill)
                cell.comment = Comment(EDITABLE_NOTE, "batchwbc", height=90, width=260)
            else:
                cell = self.text(name, font=header_font, fill=header_fill)
            cells.append(cell)
        self.append(cells)

    def text(self, value: Any, **style: Any) -> Any:
        """A string cell that can never be read as a formula, error code or number."""
        from openpyxl.cell import WriteOnlyCell

        s = clean_text(value)
        if not style and not s.startswith(_NEEDS_CELL):
            return s  # fast path: openpyxl types a plain str as text ('s') by itself
        cell = WriteOnlyCell(self.ws, s)
        cell.data_type = "s"  # openpyxl infers 'f' for "=..." and 'e' for "#N/A"
        if s.startswith(_FORMULA_START):
            cell.quotePrefix = True  # Excel keeps it text even when the cell is edited
        for key, val in style.items():
            setattr(cell, key, val)
        return cell

    def number(self, value: float | int | None, fmt: str | None = None, **style: Any) -> Any:
        from openpyxl.cell import WriteOnlyCell

        value = _number(value)
        if fmt is None and not style:
            return value
        cell = WriteOnlyCell(self.ws, value)
        if fmt:
            cell.number_format = fmt
        for key, val in style.items():
            setattr(cell, key, val)
        return cell

    def severity_style(self, severity: str | None) -> dict[str, Any]:
        if severity is None:
            return {}
        return {
            "fill": self._PatternFill("solid", fgColor=_FILLS[severity]),
            "font": self._Font(color=_FONTS[severity], bold=severity == CRITICAL),
        }

    def wrap(self) -> Any:
        return self._Alignment(wrap_text=True, vertical="top")

    def dropdown(self, column: int, rows: int, choices: Sequence[str]) -> None:
        """A drop-down of `choices` on rows 2..rows+1 of a column (Excel and LibreOffice).

        The list is written in-line ("a,b,c"), which both programs read; Excel caps it at
        255 characters, which the catalogue's class ids stay well within (a test holds it).
        """
        from openpyxl.utils import get_column_letter
        from openpyxl.worksheet.datavalidation import DataValidation

        formula = '"' + ",".join(choices) + '"'
        if len(formula) - 2 > DROPDOWN_LIMIT:
            raise ValueError(f"{len(choices)} class ids are too long for an in-line drop-down list")
        letter = get_column_letter(column)
        dv = DataValidation(type="list", formula1=formula, allow_blank=True, showDropDown=False,
                            showErrorMessage=True, errorStyle="stop", errorTitle="Not a class of this model",
                            error="Choose a class from the list, or leave the cell blank to accept "
                                  "the machine's class.",
                            showInputMessage=True, promptTitle="Verified class",
                            prompt="Blank = the machine's class is right. Otherwise choose the class you see.")
        dv.add(f"{letter}2:{letter}{max(rows, 1) + 1}")
        self.ws.data_validations.append(dv)

    def append(self, values: Sequence[Any]) -> None:
        self.ws.append(list(values))
        self.rows += 1

    def filter(self, total_rows: int) -> None:
        """Autofilter on the header; must be set before the sheet is saved (row count known)."""
        from openpyxl.utils import get_column_letter

        self.ws.auto_filter.ref = f"A1:{get_column_letter(self.ncols)}{max(total_rows, 1) + 1}"


def _fit(texts: Iterable[str], minimum: float, maximum: float) -> float:
    longest = max((len(t) for t in texts), default=0)
    return float(min(max(longest + 2, minimum), maximum))


# =================================================================== columns

TEXT = "text"  # a string cell, forced to text (None leaves the cell empty)
NUMBER = "number"  # a number with `fmt` as its Excel number format (None, NaN: empty)
PLAIN = "plain"  # written as is (counts)


def fit(key: Callable[[Any], str], minimum: float, maximum: float) -> Callable[[Sequence[Any]], float]:
    """A column width that fits the longest key(row) text, within [minimum, maximum]."""
    return lambda rows: _fit((key(r) for r in rows), minimum, maximum)


@dataclass(frozen=True)
class Column:
    """One report column: everything about it in one place, so adding a column is one entry.

    `value` turns a sheet's row object into the cell's value; `width` is fixed or computed
    from all rows (see `fit`); `severity` colours the cell by a row's flag severity.
    """

    header: str
    value: Callable[[Any], Any]
    width: float | Callable[[Sequence[Any]], float]
    kind: str = TEXT
    fmt: str | None = None
    severity: Callable[[Any], str | None] | None = None
    wrap: bool = False
    editable: bool = False  # a person may change it (yellow); every other column is protected
    dropdown: bool = False  # editable with a drop-down of the run's class ids

    def width_for(self, rows: Sequence[Any]) -> float:
        return self.width(rows) if callable(self.width) else self.width

    def cell(self, sh: "_Sheet", row: Any) -> Any:
        value = self.value(row)
        if self.kind == PLAIN:
            return value
        style: dict[str, Any] = {}
        if self.editable:
            if value is None or value == "":
                return None  # yellow from the column's style
            style["fill"] = sh.edit_fill
        if self.wrap:
            style["alignment"] = sh.wrap()
        if self.severity is not None:
            style.update(sh.severity_style(self.severity(row)))
        if self.kind == NUMBER:
            return sh.number(value, self.fmt, **style)
        return None if value is None else sh.text(value, **style)


def _write_sheet(wb: Any, title: str, columns: Sequence[Column], rows: Iterable[Any],
                 widths_from: Sequence[Any], autofilter: int | None,
                 choices: Sequence[str] = ()) -> "_Sheet":
    """A sheet with these columns and one line per row; `autofilter` is the row count to
    filter over (None: no filter). `rows` may be a generator (the Review sheet's is);
    `widths_from` holds every row, so its length is the sheet's row count. Drop-down
    columns offer `choices`."""
    sh = _Sheet(wb, title, [c.header for c in columns], [c.width_for(widths_from) for c in columns],
                [c.editable for c in columns])
    if autofilter is not None:
        sh.filter(autofilter)
    for i, col in enumerate(columns, 1):
        if col.dropdown and choices:
            sh.dropdown(i, len(widths_from), choices)
    for row in rows:
        _append(sh, columns, row)
    return sh


def _append(sh: "_Sheet", columns: Sequence[Column], row: Any) -> None:
    """One line, ending with the hidden check of its protected (non-editable) values."""
    cells = [c.cell(sh, row) for c in columns]
    protected = [getattr(v, "value", v) for c, v in zip(columns, cells) if not c.editable]
    sh.append([*cells, row_check(protected, sh.rows + 1)])


def _pct(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _display(class_id: str) -> str:
    """A class's display name; an unknown id (an empty second class) is shown as it is."""
    return catalogue.get(class_id).display if catalogue.is_known(class_id) else class_id


def _worst(s: PatientSummary) -> str | None:
    return worst_severity(list(s.flags))


def _notes(s: PatientSummary) -> str:
    return "; ".join(e.reason for e in s.errors if not e.file)


def _patient(s: PatientSummary) -> str:
    return s.patient


_SUMMARY: tuple[Column, ...] = (
    Column("Patient", _patient, fit(_patient, 12, 40), severity=_worst),
    Column("Cells classified", lambda s: s.differential.n_cells, 10, PLAIN),
    Column("WBC", lambda s: s.differential.wbc, 8, PLAIN),
    Column("Flags", lambda s: "\n".join(f.message for f in s.flags) if s.flags else "none", 70,
           severity=_worst, wrap=True),
    Column("Blasts %", lambda s: _pct(s.differential.blasts_pct), 9, NUMBER, "0.0"),
    Column("IG %", lambda s: _pct(s.differential.ig_pct), 9, NUMBER, "0.0"),
    Column("Band %", lambda s: _pct(s.differential.band_pct), 9, NUMBER, "0.0"),
    Column("Immature %", lambda s: _pct(s.differential.immature_pct), 11, NUMBER, "0.0"),
    Column("NRBC /100 WBC", lambda s: _pct(s.differential.nrbc_per_100_wbc), 10, NUMBER, "0.0"),
    Column("Platelets", lambda s: s.differential.platelets, 10, PLAIN),
    Column("Review cells", lambda s: s.differential.n_review, 10, PLAIN),
    Column("Unclassified", lambda s: s.differential.unclassified, 12, PLAIN),
    Column("Unreadable files", lambda s: s.unreadable_files, 11, PLAIN),
    Column("Notes", _notes, 40, severity=lambda s: WARNING if _notes(s) else None),
    Column("Flag codes", lambda s: FLAG_CODE_SEPARATOR.join(f.code for f in s.flags), 24),
    Column("Verified by", lambda s: None, 16, editable=True),
    Column("Verified on", lambda s: None, 14, editable=True),
)


@dataclass(frozen=True)
class _DiffRow:
    """One Differential line: a patient's count of one class, with its reference range;
    `pre` is the machine's differential when `diff` is a verified one."""

    patient: str
    diff: Differential
    class_id: str
    reference: tuple[float, float] | None
    pre: Differential | None = None

    @property
    def pct(self) -> float | None:
        return self.diff.percent.get(self.class_id)

    def ci(self, i: int) -> float | None:
        ci = self.diff.ci.get(self.class_id)
        return None if ci is None else round(ci[i], 4)

    @property
    def before(self) -> Differential:
        return self.diff if self.pre is None else self.pre


def _range_text(rng: tuple[float, float] | None) -> str:
    return "" if rng is None else f"{rng[0]:g}-{rng[1]:g}"


def _vs_reference(pct: float | None, rng: tuple[float, float] | None) -> str:
    if pct is None or rng is None:
        return ""
    if pct > rng[1] + 1e-9:
        return "above"
    if pct < rng[0] - 1e-9:
        return "below"
    return "within"


def _class_note(r: _DiffRow) -> str:
    if r.class_id == NRBC_CLASS:
        per100 = "" if r.diff.nrbc_per_100_wbc is None else f": {r.diff.nrbc_per_100_wbc:.1f} per 100 WBC"
        return f"not a leukocyte, not in WBC{per100}"
    if r.class_id == PLATELET_CLASS:
        return "not a leukocyte, counted apart"
    return ""


_DIFFERENTIAL: tuple[Column, ...] = (
    Column("Patient", lambda r: r.patient, fit(lambda r: r.patient, 12, 40)),
    Column("Class", lambda r: catalogue.get(r.class_id).display, 22),
    Column("Count", lambda r: r.diff.counts[r.class_id], 8, PLAIN),
    Column("In review", lambda r: r.diff.counts[r.class_id] - r.diff.confident_counts[r.class_id], 9, PLAIN),
    Column("% of WBC", lambda r: _pct(r.pct), 9, NUMBER, "0.0"),
    Column("95% CI low", lambda r: r.ci(0), 10, NUMBER, "0.0"),
    Column("95% CI high", lambda r: r.ci(1), 10, NUMBER, "0.0"),
    Column("Reference range (%)", lambda r: _range_text(r.reference), 18),
    Column("vs. reference", lambda r: _vs_reference(r.pct, r.reference), 12),
    Column("Note", _class_note, 26),
    Column("Class id", lambda r: r.class_id, 22),
)


@dataclass(frozen=True)
class _CellLine:
    """One Cells or Review line: the machine's result and what a person verified."""

    cell: CellResult
    verified: str | None = None  # the Verified class a person set; None = blank
    note: str | None = None  # Review: why no thumbnail is shown; None when one is embedded


_VERIFIED_CLASS = Column("Verified class", lambda r: r.verified, 22, editable=True, dropdown=True)

_CELLS: tuple[Column, ...] = (
    Column("Patient", lambda r: r.cell.patient, fit(lambda r: r.cell.patient, 12, 40)),
    Column("File", lambda r: r.cell.file, fit(lambda r: r.cell.file, 20, 80)),
    Column("Class", lambda r: r.cell.class_id, 22),
    Column("Confidence", lambda r: round(r.cell.confidence, 4), 11, NUMBER, "0.000"),
    Column("Second class", lambda r: r.cell.second_class, 22),
    Column("Second probability", lambda r: round(r.cell.second_prob, 4), 11, NUMBER, "0.000"),
    Column("Review", lambda r: "yes" if r.cell.review else "no", 8),
    Column("Review reason", lambda r: r.cell.review_reason, 36),
    _VERIFIED_CLASS,
)

_REVIEW: tuple[Column, ...] = (
    Column("Thumbnail", lambda r: r.note, THUMBNAIL_PX / 7 + 2),
    Column("Patient", lambda r: r.cell.patient, fit(lambda r: r.cell.patient, 12, 40)),
    Column("File", lambda r: r.cell.file, fit(lambda r: r.cell.file, 20, 80)),
    Column("Class", lambda r: class_display(r.cell.class_id), 22),
    Column("Confidence", lambda r: round(r.cell.confidence, 4), 11, NUMBER, "0.000"),
    Column("Second class", lambda r: _display(r.cell.second_class), 22),
    Column("Second probability", lambda r: round(r.cell.second_prob, 4), 11, NUMBER, "0.000"),
    Column("Review reason", lambda r: r.cell.review_reason, 36),
    _VERIFIED_CLASS,
)

_ERRORS: tuple[Column, ...] = (
    Column("Patient", lambda e: e.patient, fit(lambda e: e.patient, 12, 40)),
    Column("File", lambda e: e.file or WHOLE_PATIENT, fit(lambda e: e.file, 20, 80)),
    Column("Reason", lambda e: e.reason, fit(lambda e: e.reason, 30, 100)),
)

_RUN: tuple[Column, ...] = (
    Column("Item", lambda kv: kv[0], fit(lambda kv: kv[0], 20, 70)),
    Column("Value", lambda kv: kv[1], fit(lambda kv: kv[1], 20, 100)),
)


# -- the verified workbook (batchwbc verify): pre-classified and verified side by side ---------

def _vp(v: PatientVerification) -> str:
    return v.patient


def _flag_text(s: PatientSummary) -> str:
    return "\n".join(f.message for f in s.flags) if s.flags else "none"


def _side_by_side(header: str, get: Callable[[Differential], float | None]) -> tuple[Column, Column]:
    """A measure before and after verification, in two neighbouring columns."""
    return (Column(f"{header} pre-classified", lambda v: _pct(get(v.pre.differential)), 13, NUMBER, "0.0"),
            Column(f"{header} verified", lambda v: _pct(get(v.post.differential)), 11, NUMBER, "0.0"))


_SUMMARY_VERIFIED: tuple[Column, ...] = (
    Column("Patient", _vp, fit(_vp, 12, 40), severity=lambda v: _worst(v.post)),
    Column("Status", lambda v: v.status, 30, severity=lambda v: SIGNED if v.signed else WARNING, wrap=True),
    Column("Verified by", lambda v: v.verified_by or None, 16, editable=True),
    Column("Verified on", lambda v: v.verified_on or None, 16, editable=True),
    Column("Cells classified", lambda v: v.post.differential.n_cells, 10, PLAIN),
    Column("Corrected cells", lambda v: v.corrected, 10, PLAIN),
    Column("Review cells verified", lambda v: f"{v.review_verified} of {v.review_cells}", 12),
    Column("WBC pre-classified", lambda v: v.pre.differential.wbc, 12, PLAIN),
    Column("WBC verified", lambda v: v.post.differential.wbc, 10, PLAIN),
    Column("Flags (verified)", lambda v: _flag_text(v.post), 60, severity=lambda v: _worst(v.post), wrap=True),
    *_side_by_side("Blasts %", lambda d: d.blasts_pct),
    *_side_by_side("IG %", lambda d: d.ig_pct),
    *_side_by_side("Band %", lambda d: d.band_pct),
    *_side_by_side("Immature %", lambda d: d.immature_pct),
    *_side_by_side("NRBC /100 WBC", lambda d: d.nrbc_per_100_wbc),
    Column("Platelets verified", lambda v: v.post.differential.platelets, 10, PLAIN),
    Column("Unclassified pre-classified", lambda v: v.pre.differential.unclassified, 13, PLAIN),
    Column("Unclassified verified", lambda v: v.post.differential.unclassified, 12, PLAIN),
    Column("Flags (pre-classified)", lambda v: _flag_text(v.pre), 60, wrap=True),
    Column("Unreadable files", lambda v: v.post.unreadable_files, 11, PLAIN),
    Column("Notes", lambda v: _notes(v.post), 40, severity=lambda v: WARNING if _notes(v.post) else None),
    Column("Flag codes (verified)", lambda v: FLAG_CODE_SEPARATOR.join(f.code for f in v.post.flags), 24),
)

_DIFFERENTIAL_VERIFIED: tuple[Column, ...] = (
    *_DIFFERENTIAL[:2],
    Column("Pre-classified count", lambda r: r.before.counts[r.class_id], 13, PLAIN),
    Column("Verified count", lambda r: r.diff.counts[r.class_id], 10, PLAIN),
    Column("Change", lambda r: r.diff.counts[r.class_id] - r.before.counts[r.class_id], 8, PLAIN),
    Column("Pre-classified % of WBC", lambda r: _pct(r.before.percent.get(r.class_id)), 13, NUMBER, "0.0"),
    replace(next(c for c in _DIFFERENTIAL if c.header == "% of WBC"), header="Verified % of WBC", width=11),
    *_DIFFERENTIAL[[c.header for c in _DIFFERENTIAL].index("% of WBC") + 1:],
)

SUMMARY_COLUMNS = tuple(c.header for c in _SUMMARY)
DIFFERENTIAL_COLUMNS = tuple(c.header for c in _DIFFERENTIAL)
CELLS_COLUMNS = tuple(c.header for c in _CELLS)
REVIEW_COLUMNS = tuple(c.header for c in _REVIEW)
ERRORS_COLUMNS = tuple(c.header for c in _ERRORS)
RUN_COLUMNS = tuple(c.header for c in _RUN)
SUMMARY_VERIFIED_COLUMNS = tuple(c.header for c in _SUMMARY_VERIFIED)
DIFFERENTIAL_VERIFIED_COLUMNS = tuple(c.header for c in _DIFFERENTIAL_VERIFIED)
#: Every column header batchwbc writes; a column a person adds under another header is ignored.
KNOWN_HEADERS = frozenset(
    c.header for table in (_SUMMARY, _DIFFERENTIAL, _CELLS, _REVIEW, _ERRORS, _RUN, _SUMMARY_VERIFIED,
                           _DIFFERENTIAL_VERIFIED) for c in table)
#: Columns a person may edit, on any sheet; all others are protected by the hidden Check column.
EDITABLE_COLUMNS = tuple(dict.fromkeys(
    c.header for table in (_SUMMARY, _CELLS, _REVIEW, _SUMMARY_VERIFIED) for c in table if c.editable))


# =================================================================== the sheets

def _write_summary(wb: Any, summaries: Sequence[PatientSummary]) -> None:
    _write_sheet(wb, "Summary", _SUMMARY, summaries, summaries, autofilter=len(summaries))


def _shown_classes(classes: Sequence[str], extra: Iterable[str] = ()) -> list[str]:
    """Catalogue order; a class the model cannot predict is not "0%" (unless a person chose it)."""
    wanted = {*classes, *extra}
    return [c for c in catalogue.CLASS_IDS if c in wanted]


def _diff_rows(summaries: Sequence[PatientSummary], shown: Sequence[str], settings: Settings,
               before: Sequence[PatientSummary] | None = None) -> list[_DiffRow]:
    pre = [None] * len(summaries) if before is None else [s.differential for s in before]
    return [
        _DiffRow(s.patient, s.differential, cid,
                 settings.reference_range(cid) if catalogue.get(cid).counts_in_wbc else None, p)
        for s, p in zip(summaries, pre) for cid in shown
    ]


def _write_differential(wb: Any, summaries: Sequence[PatientSummary], classes: Sequence[str],
                        settings: Settings) -> None:
    rows = _diff_rows(summaries, _shown_classes(classes), settings)
    _write_sheet(wb, "Differential", _DIFFERENTIAL, rows, rows, autofilter=len(rows))


def _write_cells(wb: Any, cells: Sequence[CellResult], choices: Sequence[str],
                 verified: Mapping[tuple[str, str], str]) -> None:
    lines = [_CellLine(c, verified.get((c.patient, c.file))) for c in cells]
    _write_sheet(wb, "Cells", _CELLS, lines, lines, autofilter=len(lines), choices=choices)


def _thumbnail(jpeg: bytes) -> Any:
    """An openpyxl Image scaled to THUMBNAIL_PX, or None when the bytes are not a readable image."""
    from openpyxl.drawing.image import Image

    try:
        img = Image(BytesIO(jpeg))
    except Exception:  # noqa: BLE001 - PIL raises several types for bad data
        return None
    scale = THUMBNAIL_PX / max(img.width, img.height, 1)
    img.width, img.height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    return img


def _review_rows(sh: "_Sheet", review: Sequence[_CellLine], limit: int) -> Iterator[_CellLine]:
    """Review lines, in order; each thumbnail is embedded at the row it is about to fill."""
    embedded = 0
    for line in review:
        c = line.cell
        row = sh.rows + 1
        if embedded >= limit:  # checked first: the pipeline keeps no thumbnails past the limit
            note: str | None = f"(not embedded: limit of {limit} images)"
        elif c.thumbnail_jpeg is None:
            note = "(no thumbnail)"
        else:
            img = _thumbnail(c.thumbnail_jpeg)
            if img is None:
                note = "(thumbnail unreadable)"
            else:
                img.anchor = f"A{row}"
                sh.ws.add_image(img)
                sh.ws.row_dimensions[row].height = THUMBNAIL_PX * 0.75 + 4  # points
                embedded += 1
                note = None
        yield replace(line, note=note)


def _write_review(wb: Any, summaries: Sequence[PatientSummary], limit: int, choices: Sequence[str],
                  verified: Mapping[tuple[str, str], str]) -> None:
    """Cells below the review threshold, patient by patient, least confident first.

    Widths fit the review cells; rows are produced while writing because each embedded
    thumbnail is anchored to the row it belongs to."""
    review = [_CellLine(c, verified.get((c.patient, c.file)))
              for s in summaries for c in sorted((c for c in s.cells if c.review), key=lambda c: c.confidence)]
    sh = _write_sheet(wb, "Review", _REVIEW, (), review, autofilter=None, choices=choices)
    for line in _review_rows(sh, review, limit):
        _append(sh, _REVIEW, line)


def class_display(class_id: str) -> str:
    """Display name for the Review sheet; an unclassified crop says why it is there."""
    from .ood import UNCLASSIFIED, UNCLASSIFIED_DISPLAY, UNCLASSIFIED_REASON

    if class_id == UNCLASSIFIED:
        return f"{UNCLASSIFIED_DISPLAY}: {UNCLASSIFIED_REASON}"
    return catalogue.get(class_id).display


def _write_errors(wb: Any, errors: Sequence[FileError]) -> None:
    _write_sheet(wb, "Errors", _ERRORS, errors, errors, autofilter=len(errors))


def _when(t: datetime) -> str:
    return t.isoformat(sep=" ", timespec="seconds")


def _duration(run: RunData) -> str:
    try:
        seconds = max(0, round((run.finished - run.started).total_seconds()))
    except TypeError:  # one timestamp with a time zone, the other without
        return ""
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def run_rows(run: RunData, settings: Settings, summaries: Sequence[PatientSummary]) -> list[tuple[str, str]]:
    """The Run sheet's key/value rows: everything needed to audit or reproduce the report."""
    m = run.model
    t = totals(list(summaries))
    unreadable = sum(1 for e in run.errors if e.file)
    failed = sum(1 for e in run.errors if not e.file)
    rows: list[tuple[str, Any]] = [
        ("Run started", _when(run.started)),
        ("Run finished", _when(run.finished)),
        ("Duration (h:mm:ss)", _duration(run)),
        ("batchwbc version", run.tool_version),
        ("Slides root", run.root),
        ("Model file", str(m.path)),
        ("Model sha256", m.sha256),
        ("Model version", m.model_version),
        ("Model classes", ", ".join(m.classes)),
        ("Model input size (px)", str(m.input_size)),
        ("Model calibration temperature", "" if m.temperature is None else f"{m.temperature:g}"),
        ("Model default review threshold", "" if m.review_threshold is None else f"{m.review_threshold:g}"),
        ("Review threshold used (confidence below it goes to Review)", f"{run.review_threshold:g}"),
        ("Patients", str(t.patients)),
        ("Cells classified", str(len(run.cells))),
        ("WBC classified", str(t.wbc)),
        ("Cells to review", str(t.review_cells)),
        ("Unclassified cells (not recognised as a cell the model knows; in no count)",
         str(sum(x.differential.unclassified for x in summaries))),
        ("Data shift (whole run, compared with the model's own validation data)", _shift_verdict(run.data_shift)),
        ("Unreadable files", str(unreadable)),
        ("Patients that failed as a whole", str(failed)),
        ("Ignored files (hidden or not images)", str(run.ignored_files)),
        ("Percentages", "of WBC = leukocytes only; NRBC reported per 100 WBC; platelets counted apart"),
        ("Confidence intervals", "exact binomial (Clopper-Pearson) 95%, as in Rümke's tables"),
        ("Immature granulocytes (IG)", "promyelocytes + myelocytes + metamyelocytes"),
        ("Immature total", "blasts + IG + band neutrophils"),
        ("Class columns", "Cells sheet and CSV: class ids; Summary, Differential, Review: display names"),
    ]
    rows += _ood_rows(m)
    rows += settings.describe()
    for key in (KEY_TRAINING_DATA, KEY_TEST_METRICS):
        if key in m.metadata:
            rows.append((f"Model metadata {key}", m.metadata[key]))
    rows += [(str(k), str(v)) for k, v in run.extra.items()]
    return rows


def _shift_verdict(shift: "ShiftDecision | None") -> str:
    if shift is None or (not shift.decided and shift.threshold is None):
        return "not checked: the model carries no out-of-distribution reference"
    return f"DATA_SHIFT: {shift.text()}" if shift.raised else shift.text()


def _ood_rows(m) -> list[tuple[str, str]]:
    from .ood import KEY_OOD, OodReferenceError, from_metadata

    try:
        ref = from_metadata(m.metadata)
    except OodReferenceError as exc:
        return [("Out-of-distribution reference", f"unusable: {exc}")]
    if ref is None:
        return [("Out-of-distribution reference", "none in the model file: no crop is labelled unclassified")]
    rows = [("Out-of-distribution reference", f"{ref.describe()} ({KEY_OOD}); unclassified when the score is above "
             f"{ref.threshold:.4g} or it lies nearer a reject centre by more than {ref.reject_margin:.4g}")]
    if ref.shift is not None:
        rows.append(("Data-shift rule", f"DATA_SHIFT when the lower 95% bound of the share of cells scoring above "
                     f"{ref.shift.cell_cut:.4g} exceeds {100 * ref.shift.threshold:.1f}%; no decision under "
                     f"{ref.shift.min_cells} cells"))
    return rows


def _write_run(wb: Any, rows: list[tuple[str, str]]) -> None:
    _write_sheet(wb, "Run", _RUN, rows, rows, autofilter=None)


def _discard_sheet_buffers(wb: Any) -> None:
    """Write-only sheets buffer rows in system temp files; remove them now, not only at exit."""
    for ws in getattr(wb, "_sheets", []):
        rows, writer = getattr(ws, "_rows", None), getattr(ws, "_writer", None)
        with suppress(Exception):
            if rows is not None:
                rows.close()  # finish the row generator first, or it writes to a closed file later
            if writer is not None:
                writer.close()
        out = getattr(writer, "out", None)
        if isinstance(out, str):
            with suppress(OSError):
                os.remove(out)


def write_workbook(run: RunData, summaries: Sequence[PatientSummary], settings: Settings,
                   out_path: str | os.PathLike) -> None:
    """Write the report atomically; the old report survives any failure or interruption.

    `summaries` come from summary.summarize_run(run, settings): this module only formats.
    """
    from openpyxl import Workbook

    wb = Workbook(write_only=True)
    try:
        with atomic_output(out_path) as tmp:
            choices = class_choices(run.model.classes, [c.class_id for c in run.cells])
            _write_summary(wb, summaries)
            _write_differential(wb, summaries, run.model.classes, settings)
            _write_cells(wb, run.cells, choices, {})
            _write_review(wb, summaries, settings.review_max_images, choices, {})
            _write_errors(wb, run.errors)
            _write_run(wb, run_rows(run, settings, summaries))
            wb.save(tmp)
    finally:
        _discard_sheet_buffers(wb)


def write_verified_workbook(rep: VerifiedReport, settings: Settings, out_path: str | os.PathLike) -> None:
    """Write `batchwbc verify`'s workbook atomically: the report's sheets with the verified
    classes kept in place, the Summary and Differential showing pre-classified and verified
    values side by side, and the Run sheet extended by the verification's own rows. It has
    the same Verified columns and checks as a report, so it can be verified again."""
    from openpyxl import Workbook

    pre = [p.pre for p in rep.patients]
    post = [p.post for p in rep.patients]
    verified = {(vc.cell.patient, vc.cell.file): vc.verified for vc in rep.cells if vc.verified}
    cells = [vc.cell for vc in rep.cells]
    wb = Workbook(write_only=True)
    try:
        with atomic_output(out_path) as tmp:
            _write_sheet(wb, "Summary", _SUMMARY_VERIFIED, rep.patients, rep.patients,
                         autofilter=len(rep.patients))
            rows = _diff_rows(post, _shown_classes(rep.model_classes, verified.values()), settings, pre)
            _write_sheet(wb, "Differential", _DIFFERENTIAL_VERIFIED, rows, rows, autofilter=len(rows))
            _write_cells(wb, cells, rep.choices, verified)
            _write_review(wb, pre, settings.review_max_images, rep.choices, verified)
            _write_errors(wb, rep.errors)
            _write_run(wb, list(rep.run_rows))
            wb.save(tmp)
    finally:
        _discard_sheet_buffers(wb)


# =================================================================== CSV

_CSV_GUARD = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_text(value: str) -> str:
    """Protect a text field from spreadsheet formula injection, reversibly.

    A value starting with = + - @ TAB CR gets one leading apostrophe (OWASP's advice), and so
    does a value already starting with an apostrophe; software recovers the original exactly
    by removing ONE leading apostrophe whenever a patient/file field starts with one.
    """
    return "'" + value if value.startswith(_CSV_GUARD) else value


def _csv_value(column: Column, row: Any) -> str:
    """A Summary cell as CSV text: numbers as Python writes them, empty for None/NaN, text
    guarded against formula injection and on one line (Flags' line breaks become ' | ')."""
    value = column.value(row)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if column.kind in (NUMBER, PLAIN) and not isinstance(value, str):
        return str(value)
    return csv_text(str(value).replace("\r\n", "\n").replace("\n", " | "))


def write_summary_csv(summaries: Sequence[PatientSummary], out_path: str | os.PathLike) -> None:
    """The Summary sheet as UTF-8 CSV (no BOM): the same Column table, headers and values (its
    machine columns), one line per patient, for LIS middleware and scripts ("Flag codes" is
    '; '-separated).
    Written atomically: a failure leaves the previous file untouched."""
    columns = [c for c in _SUMMARY if not c.editable]  # Verified by / on are the technologist's, empty now
    with atomic_output(out_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8", errors="replace") as fh:
            writer = csv.writer(fh)
            writer.writerow([c.header for c in columns])
            for s in summaries:
                writer.writerow([_csv_value(c, s) for c in columns])


def write_cells_csv(cells: Iterable[CellResult], out_path: str | os.PathLike) -> None:
    """UTF-8 CSV (no BOM) of every classified cell, one row each; written atomically."""
    with atomic_output(out_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8", errors="replace") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for c in cells:
                writer.writerow([
                    csv_text(c.patient), csv_text(c.file), c.class_id, f"{c.confidence:.4f}",
                    c.second_class, f"{c.second_prob:.4f}", "yes" if c.review else "no", c.review_reason,
                ])
