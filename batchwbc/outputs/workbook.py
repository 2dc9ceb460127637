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

Sheets: Summary, Differential, Cells, Review, Errors, Run (see docs/report.md), and the
hidden _record that `batchwbc verify` reads (batchwbc.outputs.run_record). A few columns
are the technologist's (Verified class with a drop-down, Verified by, Verified on: yellow);
every other one is the machine's (grey) and each row ends with a hidden Check of its values
(batchwbc.outputs.row_checks), so `batchwbc verify` can tell a correction from an accidental edit.
`write_verified_workbook` formats verify's result with the same sheets, checks and layout.
Every sheet is also laid out for paper (`_print_setup`, `row_height`): landscape, one page
wide, header rows repeated, rows as tall as their wrapped text, a Review row as tall as its
thumbnail and each patient's Review rows from a new page; the hidden Check column is left out of
the printed width. The Summary, too wide to be read at one page width, prints at 75 % in column
blocks with the Patient column repeated (`block_layout`).
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

from batchwbc.core import catalogue
from batchwbc.core.config import Settings
from batchwbc.core.differential import NRBC_CLASS, PLATELET_CLASS, Differential
from batchwbc.core.flags import CRITICAL, NOTE, POSSIBLE_CRITICAL, REVIEW, UNRELIABLE, WARNING, worst_severity
from batchwbc.engine.model_metadata import KEY_TEST_METRICS, KEY_TRAINING_DATA
from batchwbc.core.records import THUMBNAIL_PX, CellResult, FileError, RunData
from batchwbc.outputs.row_checks import CHECK_HEADER, row_check
from batchwbc.outputs.run_record import write_record_sheet, record_of_run
from batchwbc.core.summary import PatientSummary, run_alert, run_alert_of, totals
from batchwbc.core.thumbnail_quota import fair_quota
from batchwbc.core.verification import PatientVerification, VerifiedReport, class_choices

if TYPE_CHECKING:
    from batchwbc.engine.data_shift import ShiftDecision
    from batchwbc.outputs.run_record import RunRecord


class OutputError(Exception):
    """A report path that cannot be written; str(exc) is one sentence for the user."""


SHEETS = ("Summary", "Differential", "Cells", "Review", "Errors", "Run")
#: The row holding each sheet's column headers: the Summary's row 1 is the banner.
HEADER_ROWS = {name: 2 if name == "Summary" else 1 for name in SHEETS}
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
# Excel's own "bad" red, "neutral" amber and "good" green; light blue for warnings only cells in
# review raise; a possible critical finding orange-red and bold (urgent: confirm it first);
# UNRELIABLE (DATA_SHIFT and its kin) violet and bold, a colour no other flag has; LOW_WBC grey.
_FILLS = {CRITICAL: "FFC7CE", POSSIBLE_CRITICAL: "F8CBAD", UNRELIABLE: "E4D2F0", WARNING: "FFEB9C",
          SIGNED: "C6EFCE", REVIEW: "DDEBF7", NOTE: "EDEDED"}
_FONTS = {CRITICAL: "9C0006", POSSIBLE_CRITICAL: "C00000", UNRELIABLE: "5B1F7A", WARNING: "9C5700",
          SIGNED: "006100", REVIEW: "1F4E78", NOTE: "404040"}
#: Severities written in bold: what must be read first.
_BOLD = (CRITICAL, POSSIBLE_CRITICAL, UNRELIABLE)
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
    """A write-only worksheet plus the styles it reuses; every str goes through `text`.

    Layout for screen and paper in one place: an optional banner row above the header, a
    wrapped bold header row as tall as its longest header needs, frozen panes and print titles
    below/at the header, and a landscape page fitted to one page width (see `_print_setup`) or,
    with `blocks`, printed in column blocks (see `_print_in_blocks`).
    Each row ends with the hidden Check column (see `_append`)."""

    def __init__(self, wb: Any, title: str, columns: Sequence[str], widths: Sequence[float],
                 editable: Sequence[bool] = (), banner: str | None = None, banner_severity: str = WARNING,
                 blocks: BlockLayout | None = None):
        """Headers `columns` plus the hidden Check column; `editable` marks the columns a
        person may change (yellow header with a note) among the machine's (grey header);
        `banner` is a merged row above the headers (the header row is then row 2), coloured
        like `banner_severity`; `blocks` prints the sheet in column blocks (`block_layout`)
        instead of one page wide."""
        from openpyxl.comments import Comment
        from openpyxl.styles import Alignment, Font, PatternFill
        from openpyxl.utils import get_column_letter

        self.ws = wb.create_sheet(title)
        self._Font, self._PatternFill, self._Alignment = Font, PatternFill, Alignment
        # style objects and the cell styles made of them, built once per sheet (see _style)
        self._objects: dict[Any, Any] = {}
        self._styles: dict[tuple, tuple[Any, tuple]] = {}
        headers = [*columns, CHECK_HEADER]
        self.widths = list(widths)  # the printed columns' widths (the Check column is not printed)
        for i, w in enumerate([*widths, 8], 1):
            self.ws.column_dimensions[get_column_letter(i)].width = w
        self.ws.column_dimensions[get_column_letter(len(headers))].hidden = True
        self.rows = 0
        self.ncols = len(headers)
        self.nprinted = len(columns)
        self.tall_rows = False  # True: some rows are taller than one line, so cells align to the top
        self._column_index = {name: i for i, name in enumerate(columns, 1)}
        self.header_row = 1 if banner is None else 2
        self.ws.freeze_panes = f"A{self.header_row + 1}"
        # before the first row is written; the hidden Check column prints nowhere (Excel and
        # LibreOffice leave hidden columns out of the page and of the fit to its width)
        _print_setup(self.ws, title, self.header_row)
        self.blocks = blocks
        if blocks is not None:
            _print_in_blocks(self.ws, blocks)
        self.edit_fill = PatternFill("solid", fgColor=EDITABLE_FILL)
        if banner is not None:
            self._banner(banner, banner_severity)
        header_font, header_fill = Font(bold=True), PatternFill("solid", fgColor=PROTECTED_FILL)
        header_align = Alignment(wrap_text=True, vertical="bottom")
        self.set_height(row_height(zip(columns, widths), bold=True))
        cells = []
        for i, name in enumerate(headers):
            if i < len(editable) and editable[i]:
                # a column style: its empty cells show yellow without one styled cell per row
                self.ws.column_dimensions[get_column_letter(i + 1)].fill = self.edit_fill
                cell = self.text(name, font=header_font, fill=self.edit_fill, alignment=header_align)
                cell.comment = Comment(EDITABLE_NOTE, "batchwbc", height=90, width=260)
            else:
                cell = self.text(name, font=header_font, fill=header_fill, alignment=header_align)
            cells.append(cell)
        self.append(cells)

    def _banner(self, text: str, severity: str = WARNING) -> None:
        """One merged, bold row across the printed columns, amber (or the colour of `severity`):
        read first on screen and on paper. A sheet printed in column blocks gets the banner once
        per block, centred, so every printed page carries it whole (a single merge would print
        on the first block's pages only, cut off after its first words on the others)."""
        from openpyxl.utils import get_column_letter

        style = {"font": self._Font(bold=True, size=12, color=_FONTS[severity]),
                 "fill": self._PatternFill("solid", fgColor=_FILLS[severity]),
                 "alignment": self._Alignment(wrap_text=True, vertical="center",
                                              horizontal=None if self.blocks is None else "center")}
        starts = [0, *([] if self.blocks is None else self.blocks.starts)]
        # In column blocks, column A (Patient) is repeated at the left of every printed page, row 1
        # included: a banner merged from A1 printed a clipped piece of its first words there on the
        # other blocks' pages. So there the first block's banner starts at column B, and A1 is only colour.
        if len(starts) > 1 and starts[1] > 1:
            starts[0] = 1
        spans = list(zip(starts, [*starts[1:], self.nprinted]))  # [first, end) of each merged banner
        widths = [sum(self.widths[a:b]) * 11 / 12 for a, b in spans]  # 12 pt: wider than the 11 pt unit
        texts = [banner_for_width(text, w) for w in widths]
        self.set_height(max(22.0, row_height(list(zip(texts, widths)), bold=True, line_pt=_BANNER_LINE_PT) or 0.0))
        by_start = dict(zip(starts, texts))
        cells = [self.text(by_start[i], **style) if i in by_start else self.text("", fill=style["fill"])
                 for i in range(self.nprinted)]
        self.append(cells)
        for a, b in spans:
            if b - a > 1:
                self.ws.merged_cells.add(f"{get_column_letter(a + 1)}{self.rows}:{get_column_letter(b)}{self.rows}")

    def set_height(self, points: float | None) -> None:
        """The height of the row about to be appended (None: the default, one line)."""
        if points is not None:
            self.ws.row_dimensions[self.rows + 1].height = points

    def text(self, value: Any, **style: Any) -> Any:
        """A string cell that can never be read as a formula, error code or number."""
        from openpyxl.cell import WriteOnlyCell

        s = clean_text(value)
        if not style and not s.startswith(_NEEDS_CELL):
            return s  # fast path: openpyxl types a plain str as text ('s') by itself
        cell = WriteOnlyCell(self.ws, s)
        cell.data_type = "s"  # openpyxl infers 'f' for "=..." and 'e' for "#N/A"
        if s.startswith(_FORMULA_START):
            style["quotePrefix"] = True  # Excel keeps it text even when the cell is edited
        self._style(cell, style)
        return cell

    def number(self, value: float | int | None, fmt: str | None = None, **style: Any) -> Any:
        from openpyxl.cell import WriteOnlyCell

        value = _number(value)
        if fmt is None and not style:
            return value
        cell = WriteOnlyCell(self.ws, value)
        if fmt:
            style["number_format"] = fmt
        self._style(cell, style)
        return cell

    def _style(self, cell: Any, style: Mapping[str, Any]) -> None:
        """Give a write-only cell these style attributes (font=..., alignment=..., number_format=...).

        Why not plain setattr per cell: openpyxl then hashes and compares every style object
        against the workbook's lists on every assignment, which was a third of the workbook's
        CPU time (2,000 cells: ~27,000 styled cells). A sheet has a handful of distinct styles,
        so the first cell of each combination goes through openpyxl and the others copy its
        style indices (the same StyleArray openpyxl would have built). Keys hold the style
        objects' ids, and the cache keeps those objects alive, so an id is never reused for
        another object while its entry exists."""
        from copy import copy

        if not style:
            return
        key = tuple((k, v if isinstance(v, (str, bool, int, float)) else id(v)) for k, v in style.items())
        hit = self._styles.get(key)
        if hit is None:
            for k, v in style.items():
                setattr(cell, k, v)
            self._styles[key] = (copy(cell._style), tuple(style.values()))
            return
        cell._style = copy(hit[0])

    def _shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """One style object per key for the whole sheet (see _style: equal styles, same object)."""
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = make()
        return obj

    def severity_style(self, severity: str | None) -> dict[str, Any]:
        if severity is None:
            return {}
        return {
            "fill": self._shared(("fill", severity), lambda: self._PatternFill("solid", fgColor=_FILLS[severity])),
            "font": self._shared(("font", severity),
                                 lambda: self._Font(color=_FONTS[severity], bold=severity in _BOLD)),
        }

    def wrap(self) -> Any:
        return self._shared("wrap", lambda: self._Alignment(wrap_text=True, vertical="top"))

    def top(self, horizontal: str | None = None) -> Any:
        return self._shared(("top", horizontal), lambda: self._Alignment(vertical="top", horizontal=horizontal))

    def link_font(self) -> Any:
        return self._shared("link", lambda: self._Font(color="0563C1", underline="single"))

    def hyperlink(self, cell: Any, column: "Column", target: str) -> None:
        """An internal link (no external target, so nothing is ever fetched from outside)."""
        from openpyxl.utils import get_column_letter
        from openpyxl.worksheet.hyperlink import Hyperlink

        col = get_column_letter(self._column_index[column.header])
        # Set directly: the public setter needs the cell's coordinate, which a write-only cell
        # gets only when its row is written (the row about to be appended is rows + 1).
        cell._hyperlink = Hyperlink(ref=f"{col}{self.rows + 1}", location=target, display=str(cell.value))

    def dropdown(self, column: int, rows: int, choices: Sequence[str]) -> None:
        """A drop-down of `choices` on the `rows` data rows below the header row of a column
        (Excel and LibreOffice).

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
        first = self.header_row + 1
        dv.add(f"{letter}{first}:{letter}{first + max(rows, 1) - 1}")
        self.ws.data_validations.append(dv)

    def append(self, values: Sequence[Any]) -> None:
        self.ws.append(list(values))
        self.rows += 1

    def filter(self, total_rows: int) -> None:
        """Autofilter on the header; must be set before the sheet is saved (row count known)."""
        from openpyxl.utils import get_column_letter

        h = self.header_row
        self.ws.auto_filter.ref = f"A{h}:{get_column_letter(self.ncols)}{max(total_rows, 1) + h}"


def _fit(texts: Iterable[str], minimum: float, maximum: float) -> float:
    longest = max((len(t) for t in texts), default=0)
    return float(min(max(longest + 2, minimum), maximum))


# =================================================================== layout for screen and paper

#: Height in points of one line of the default font (Calibri 11), and of the banner's 12 pt bold.
LINE_PT = 15.0
_BANNER_LINE_PT = 16.5
#: Print margins in inches: narrow enough for wide tables, wide enough for every printer.
MARGINS = {"left": 0.4, "right": 0.4, "top": 0.75, "bottom": 0.6, "header": 0.3, "footer": 0.3}
BANNER = "Pre-classification by software: to be verified by a qualified person"
#: The verified workbook's Summary banner (its header row is row 2 too, see HEADER_ROWS).
VERIFIED_BANNER = ("Pre-classification by software with a person's verification: a patient is final "
                   "only where its Status says signed")
#: Points of rows per printed page, below the repeated header: a landscape A4 page (595 pt, the
#: shorter of A4 and Letter) less the margins and a two-line header row. Fitting to the page
#: width can only shrink the rows, so more fit than this: a block is never split by mistake.
PAGE_BODY_PT = 595 - (MARGINS["top"] + MARGINS["bottom"]) * 72 - 2 * LINE_PT
#: Points of printable width of a landscape page: Letter (792 pt, the narrower of A4's 842 and
#: Letter's 792) less the side margins, so a block laid out for it fits either paper.
PAGE_WIDTH_PT = 792 - (MARGINS["left"] + MARGINS["right"]) * 72
#: Points of one column-width unit at 100 %: the width of a "0" in Calibri 11, 0.507 em = 5.58 pt.
#: Excel rounds it to 7 px (5.25 pt) at 96 dpi, LibreOffice does not (measured: a block laid out
#: at 5.25 pt per unit printed its last column on a page of its own); the larger one holds in both.
UNIT_PT = 5.6
#: Share of the page width a block may fill: column widths are an estimate (fonts differ a
#: little between Excel, LibreOffice and printers) and a block a few points too wide would
#: print its last column alone on a page of its own.
_WIDTH_MARGIN = 0.95
#: The print scale (percent) of a sheet printed in column blocks: its 11 pt cells print at
#: 8.25 pt, above the 8 pt a technologist reads without strain (issue 19: the Summary had printed
#: at 3 to 5.7 pt, fitted to one page width); no larger, as larger rows run onto more pages.
BLOCK_PRINT_SCALE = 75


def text_lines(text: Any, width: float, bold: bool = False) -> int:
    """Lines a wrapped cell of `width` (Excel character units) needs for `text`.

    An estimate, not a measurement (the font is not available here): a unit is the width of a
    "0", and average text is narrower, about 1.15 characters per unit (measured on LibreOffice's
    rendering: "Blast (incl. promonocytes)", 26 characters, fits one line 22 units wide), minus a
    unit of padding; bold text about 0.85 per unit (LibreOffice wrapped the bold header "Blasts %
    confident cells" into four lines 9 units wide). Lines break between words as the spreadsheet
    wraps them (a word longer than a line is cut), so a header like "Blasts % confident cells"
    is not counted as if its characters could fill every line. It errs on the tall side, which
    costs a little paper, whereas a row too short hides text."""
    import textwrap

    per_line = max(1, int((width - 1) * (0.85 if bold else 1.15)))
    return sum(max(1, len(textwrap.wrap(part, per_line, break_on_hyphens=False)))
               for part in str(text).split("\n"))


#: Most lines a banner may take in one printed column block before that block gets the short form.
BANNER_MAX_LINES = 8
#: The short form's second line: where the whole warning is (the first block always has it).
BANNER_SEE_FIRST = "Results unreliable: see the first page."


def banner_for_width(text: str, width: float) -> str:
    """The banner text a printed column block `width` units wide shows (pure): the whole text, or,
    where it would take more than BANNER_MAX_LINES lines, its first line and a pointer to the
    first block. Why: the banner row is as tall as its tallest block, and a narrow last block
    (two columns) made a 491-character warning 412 points tall, pushing the first patient onto
    the second page of every block."""
    first, newline, _ = text.partition("\n")
    if not newline or text_lines(text, width, bold=True) <= BANNER_MAX_LINES:
        return text
    return f"{first}\n{BANNER_SEE_FIRST}"


def row_height(cells: Iterable[tuple[Any, float]], bold: bool = False, line_pt: float = LINE_PT,
               minimum: float = 0.0) -> float | None:
    """Row height in points for wrapped (text, width) cells: the tallest one decides.

    None when one line is enough and no `minimum` is asked for (Excel's default height)."""
    lines = max((text_lines(t, w, bold) for t, w in cells if t is not None and t != ""), default=1)
    if lines <= 1 and minimum <= line_pt:
        return None
    return max(minimum, lines * line_pt)


def _print_setup(ws: Any, title: str, header_row: int) -> None:
    """Landscape, one page wide (as many pages tall as needed), the header rows repeated on
    every page, gridlines, and a header/footer naming the file, sheet and page x of y."""
    from openpyxl.worksheet.page import PageMargins
    from openpyxl.worksheet.properties import PageSetupProperties

    ws.page_setup.orientation = "landscape"
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0  # 0: as many pages tall as the rows need
    ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=True)
    ws.print_title_rows = f"1:{header_row}"
    ws.print_options.gridLines = True
    ws.page_margins = PageMargins(**MARGINS)
    ws.oddHeader.left.text = "&F"  # the workbook's file name
    ws.oddHeader.center.text = f"&B{title}&B"
    ws.oddHeader.right.text = "Pre-classification by software: to be verified"
    ws.oddFooter.left.text = "batchwbc"
    ws.oddFooter.right.text = "Page &P of &N"


def column_blocks(widths: Sequence[float], page_units: float, joined: Sequence[bool] = ()) -> list[int] | None:
    """Where to break a wide sheet into printed column blocks: the 0-based columns that start a
    new block (column page breaks), each block at most `page_units` wide with the first column
    (the Patient, printed again at the left of every block as a print title) counted in.

    `joined[i]` keeps column i in the block of column i - 1 (a measure's pre-classified and
    verified values, Verified by and on), so a pair is never read across two pages. None when
    some column (or joined run) cannot fit beside the first column at all."""
    if not widths:
        return []
    room = page_units - widths[0]
    runs: list[tuple[int, float]] = []  # (first column, width) of each unbreakable run
    for i in range(1, len(widths)):
        if runs and i < len(joined) and joined[i]:
            runs[-1] = (runs[-1][0], runs[-1][1] + widths[i])
        else:
            runs.append((i, widths[i]))
    starts: list[int] = []
    used = 0.0
    for first, width in runs:
        if width > room:
            return None
        if used > 0 and used + width > room:
            starts.append(first)
            used = 0.0
        used += width
    return starts


@dataclass(frozen=True)
class BlockLayout:
    """How a wide sheet prints: at `scale` percent, in column blocks starting at `starts`."""

    scale: int
    starts: list[int]


def block_layout(widths: Sequence[float], joined: Sequence[bool] = (),
                 scale: int = BLOCK_PRINT_SCALE) -> BlockLayout | None:
    """The column blocks of a sheet too wide for one page at `scale` percent (by default the
    smallest readable one: a larger print would make every block's rows run onto more pages).

    None when the columns fit one page width at `scale` or a single column cannot fit beside
    the first one: then the sheet is fitted to one page width as before, at `scale` or larger."""
    starts = column_blocks(widths, PAGE_WIDTH_PT * _WIDTH_MARGIN / (UNIT_PT * scale / 100), joined)
    if not starts:
        return None
    return BlockLayout(scale, starts)


def _print_in_blocks(ws: Any, layout: BlockLayout) -> None:
    """Print at a fixed scale in column blocks instead of one page wide: the column breaks of
    `layout`, the first column (Patient) repeated at the left of every block, and the blocks of
    the same rows on consecutive pages (across, then down), so a patient's whole row is read on
    neighbouring sheets of paper. Excel ignores manual breaks on a sheet fitted to pages, hence
    a fixed scale."""
    from openpyxl.worksheet.properties import PageSetupProperties

    ws.sheet_properties.pageSetUpPr = PageSetupProperties(fitToPage=False)
    ws.page_setup.fitToWidth = None
    ws.page_setup.fitToHeight = None
    ws.page_setup.scale = layout.scale
    ws.page_setup.pageOrder = "overThenDown"
    ws.print_title_cols = "A:A"
    for start in layout.starts:
        ws.col_breaks.append(_break(start))  # after `start` columns: the 0-based column `start` begins a page


# =================================================================== columns

TEXT = "text"  # a string cell, forced to text (None leaves the cell empty)
NUMBER = "number"  # a number with `fmt` as its Excel number format (None, NaN: empty)
PLAIN = "plain"  # written as is (counts)
AUTO = "auto"  # a number stays a number, anything else is wrapped text (the Run sheet's values)


def fit(key: Callable[[Any], str], minimum: float, maximum: float) -> Callable[[Sequence[Any]], float]:
    """A column width that fits the longest key(row) text, within [minimum, maximum]."""
    return lambda rows: _fit((key(r) for r in rows), minimum, maximum)


@dataclass(frozen=True)
class Column:
    """One report column: everything about it in one place, so adding a column is one entry.

    `value` turns a sheet's row object into the cell's value; `width` is fixed or computed
    from all rows (see `fit`); `severity` colours the cell by a row's flag severity; `wrap`
    wraps the text and makes the row as tall as it needs; `needs` names a class the model must
    predict for the column to be shown (a class it cannot predict is not "0 %"); `link` gives
    the cell an internal hyperlink ("Sheet!A5") from the row and the writer's link targets;
    `print_with_previous` keeps it on the same printed page as the column before it (a sheet
    printed in column blocks, see `block_layout`), for pairs read together.
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
    needs: str | None = None
    link: Callable[[Any, Mapping[str, str]], str | None] | None = None
    print_with_previous: bool = False  # printed in column blocks: never the first of a block

    def width_for(self, rows: Sequence[Any]) -> float:
        return self.width(rows) if callable(self.width) else self.width

    def cell(self, sh: "_Sheet", row: Any, links: Mapping[str, str] | None = None) -> Any:
        value = self.value(row)
        if self.kind == AUTO:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return sh.number(value, alignment=sh.top(horizontal="left"))
            return None if value is None else sh.text(value, alignment=sh.wrap())
        if self.kind == PLAIN:
            return sh.number(value, alignment=sh.top()) if sh.tall_rows else value
        style: dict[str, Any] = {}
        if self.editable:
            if value is None or value == "":
                return None  # yellow from the column's style
            style["fill"] = sh.edit_fill
        if self.wrap:
            style["alignment"] = sh.wrap()
        elif sh.tall_rows:  # a row made taller by wrapped text: every cell starts at the top
            style["alignment"] = sh.top()
        if self.severity is not None:
            style.update(sh.severity_style(self.severity(row)))
        target = None if self.link is None else self.link(row, links or {})
        if target is not None:
            style["font"] = sh.link_font()
        if self.kind == NUMBER:
            return sh.number(value, self.fmt, **style)
        cell = None if value is None else sh.text(value, **style)
        if target is not None and cell is not None:
            sh.hyperlink(cell, self, target)
        return cell


def shown_columns(columns: Sequence[Column], classes: Sequence[str]) -> tuple[Column, ...]:
    """The columns whose class (if any) the model can predict."""
    return tuple(c for c in columns if c.needs is None or c.needs in classes)


def _height(sh: "_Sheet", columns: Sequence[Column], row: Any, minimum: float = 0.0) -> float | None:
    """The row's height from its wrapped text cells, or None for one default line. A row written
    in bold (a critical or unreliable finding) wraps sooner, so it is measured as bold."""
    texts = [(c.value(row), w) for c, w in zip(columns, sh.widths) if c.wrap or c.kind == AUTO]
    bold = any(c.severity is not None and c.severity(row) in _BOLD for c in columns)
    return row_height(((t, w) for t, w in texts if isinstance(t, str)), bold=bold, minimum=minimum)


def _write_sheet(wb: Any, title: str, columns: Sequence[Column], rows: Iterable[Any],
                 widths_from: Sequence[Any], autofilter: int | None, banner: str | None = None,
                 links: Mapping[str, str] | None = None,
                 keep_together: Callable[[Any], Any] | None = None,
                 choices: Sequence[str] = (), alert: str | None = None, in_blocks: bool = False) -> "_Sheet":
    """A sheet with these columns and one line per row; `autofilter` is the row count to
    filter over (None: no filter). `rows` may be a generator (the Review sheet's is);
    `widths_from` holds every row, so its length is the sheet's row count. Drop-down
    columns offer `choices`. `keep_together(row)` gives rows that should print on one page
    the same key (page breaks between blocks, see `page_breaks`). `alert` (summary.run_alert)
    is added to the banner on a line of its own and colours it like an UNRELIABLE flag.
    `in_blocks` prints a sheet too wide for a readable page in column blocks (`block_layout`)."""
    if alert and banner is not None:
        banner = f"{banner}\n{alert}"
    widths = [c.width_for(widths_from) for c in columns]
    blocks = block_layout(widths, [c.print_with_previous for c in columns]) if in_blocks else None
    sh = _Sheet(wb, title, [c.header for c in columns], widths,
                [c.editable for c in columns], banner, UNRELIABLE if alert else WARNING, blocks)
    if autofilter is not None:
        sh.filter(autofilter)
    for i, col in enumerate(columns, 1):
        if col.dropdown and choices:
            sh.dropdown(i, len(widths_from), choices)
    wrapped = any(c.wrap or c.kind == AUTO for c in columns)
    sh.tall_rows = wrapped
    if keep_together is not None:
        rows = list(rows)
        heights = [(_height(sh, columns, r) if wrapped else None) or LINE_PT for r in rows]
        for after in page_breaks([keep_together(r) for r in rows], heights, PAGE_BODY_PT):
            sh.ws.row_breaks.append(_break(sh.header_row + after))
    for row in rows:
        if wrapped:
            sh.set_height(_height(sh, columns, row))
        _append(sh, columns, row, links)
    return sh


def _append(sh: "_Sheet", columns: Sequence[Column], row: Any, links: Mapping[str, str] | None = None) -> None:
    """One line, ending with the hidden check of its protected (non-editable) values."""
    cells = [c.cell(sh, row, links) for c in columns]
    protected = [getattr(v, "value", v) for c, v in zip(columns, cells) if not c.editable]
    sh.append([*cells, row_check(protected, sh.rows + 1)])


def _break(row: int) -> Any:
    from openpyxl.worksheet.pagebreak import Break

    return Break(id=row)


def page_breaks(keys: Sequence[Any], heights: Sequence[float], page_pt: float) -> list[int]:
    """Where to break pages so that rows with the same key (a patient's block) stay on one page.

    Returns the counts of rows before each break. A block taller than a page starts on a new
    page and runs on; `page_pt` is an estimate of the rows' space per page, so this can only
    move a block to the next page, never hide a row."""
    breaks: list[int] = []
    used, i = 0.0, 0
    while i < len(keys):
        j = i
        while j < len(keys) and keys[j] == keys[i]:
            j += 1
        block = sum(heights[i:j])
        if used > 0 and used + block > page_pt:
            breaks.append(i)
            used = 0.0
        used += block
        i = j
    return breaks


def patient_starts(patients: Sequence[str]) -> list[int]:
    """The counts of rows before each patient's first row but the first's: where a sheet listed
    patient by patient breaks its pages so that every patient starts on a new page."""
    return [i for i in range(1, len(patients)) if patients[i] != patients[i - 1]]


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


def _class_pct(class_id: str) -> Callable[[PatientSummary], float | None]:
    return lambda s: _pct(s.differential.percent.get(class_id))


def _to_differential(s: PatientSummary, links: Mapping[str, str]) -> str | None:
    return links.get(s.patient)


_SUMMARY: tuple[Column, ...] = (
    Column("Patient", _patient, fit(_patient, 12, 30), severity=_worst, wrap=True),
    Column("Cells classified", lambda s: s.differential.classified, 9, PLAIN),
    Column("WBC", lambda s: s.differential.wbc, 7, PLAIN),
    # 60 wide like the verified Summary's: three flags of 80-170 characters take 7 lines, not 10
    Column("Flags", lambda s: "\n".join(f.message for f in s.flags) if s.flags else "none", 60,
           severity=_worst, wrap=True),
    # Two figures per flagged group, each header saying which: all cells (review included, as in
    # the Differential) and confident cells only (what the flags compare).
    Column("Blasts % all cells", lambda s: _pct(s.differential.blasts_pct), 8, NUMBER, "0.0"),
    Column("Blasts % confident cells", lambda s: _pct(s.differential.blasts_confident_pct), 9, NUMBER, "0.0",
           print_with_previous=True),
    Column("IG % all cells", lambda s: _pct(s.differential.ig_pct), 7, NUMBER, "0.0"),
    Column("IG % confident cells", lambda s: _pct(s.differential.ig_confident_pct), 9, NUMBER, "0.0",
           print_with_previous=True),
    Column("Band % all cells", lambda s: _pct(s.differential.band_pct), 7, NUMBER, "0.0"),
    Column("Band % confident cells", lambda s: _pct(s.differential.band_confident_pct), 9, NUMBER, "0.0",
           print_with_previous=True),
    Column("Seg %", _class_pct("neutrophil_segmented"), 7, NUMBER, "0.0", needs="neutrophil_segmented"),
    Column("Lymph %", _class_pct("lymphocyte"), 7, NUMBER, "0.0", needs="lymphocyte"),
    Column("Mono %", _class_pct("monocyte"), 7, NUMBER, "0.0", needs="monocyte"),
    Column("Eos %", _class_pct("eosinophil"), 7, NUMBER, "0.0", needs="eosinophil"),
    Column("Baso %", _class_pct("basophil"), 7, NUMBER, "0.0", needs="basophil"),
    Column("Immature %", lambda s: _pct(s.differential.immature_pct), 10, NUMBER, "0.0"),
    Column("NRBC /100 WBC", lambda s: _pct(s.differential.nrbc_per_100_wbc), 7, NUMBER, "0.0"),
    Column("Platelets", lambda s: s.differential.platelets, 10, PLAIN),
    Column("Smudge cells", lambda s: s.differential.smudge, 8, PLAIN, needs="smudge"),
    Column("Smudge % of all cells", lambda s: _pct(s.differential.smudge_pct_of_cells), 10, NUMBER, "0.0",
           needs="smudge", print_with_previous=True),
    Column("Review cells", lambda s: s.differential.n_review, 8, PLAIN),
    Column("Unclassified", lambda s: s.differential.unclassified, 11, PLAIN),
    Column("Unreadable files", lambda s: s.unreadable_files, 11, PLAIN),
    Column("Notes", _notes, 14, severity=lambda s: WARNING if _notes(s) else None, wrap=True),
    Column("Flag codes", lambda s: FLAG_CODE_SEPARATOR.join(f.code for f in s.flags), 23, wrap=True),
    Column("Every class", lambda s: "Differential", 12, link=_to_differential),
    Column("Verified by", lambda s: None, 16, editable=True),
    Column("Verified on", lambda s: None, 14, editable=True, print_with_previous=True),
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


#: The Differential sheet's "vs. reference" verdict, public so the LIS messages (batchwbc.outputs.lis)
#: state exactly what the workbook states instead of comparing again.
vs_reference = _vs_reference


def _class_note(r: _DiffRow) -> str:
    if r.class_id == NRBC_CLASS:
        per100 = "" if r.diff.nrbc_per_100_wbc is None else f": {r.diff.nrbc_per_100_wbc:.1f} per 100 WBC"
        return f"not a leukocyte, not in WBC{per100}"
    if r.class_id == PLATELET_CLASS:
        return "not a leukocyte, counted apart"
    if catalogue.get(r.class_id).group == catalogue.SMUDGE:
        return "ruptured cells, not in WBC"
    return ""


def _pct_of_all(r: _DiffRow) -> float | None:
    """Smudge cells are a share of all counted cells (ADR 0009); other classes leave it empty."""
    return _pct(r.diff.smudge_pct_of_cells) if catalogue.get(r.class_id).group == catalogue.SMUDGE else None


_DIFFERENTIAL: tuple[Column, ...] = (
    Column("Patient", lambda r: r.patient, fit(lambda r: r.patient, 12, 30), wrap=True),
    Column("Class", lambda r: catalogue.get(r.class_id).display, 24, wrap=True),
    Column("Count", lambda r: r.diff.counts[r.class_id], 7, PLAIN),
    Column("In review", lambda r: r.diff.counts[r.class_id] - r.diff.confident_counts[r.class_id], 8, PLAIN),
    Column("% of WBC", lambda r: _pct(r.pct), 8, NUMBER, "0.0"),
    Column("95% CI low", lambda r: r.ci(0), 8, NUMBER, "0.0"),
    Column("95% CI high", lambda r: r.ci(1), 8, NUMBER, "0.0"),
    Column("Reference range (%)", lambda r: _range_text(r.reference), 11),
    Column("vs. reference", lambda r: _vs_reference(r.pct, r.reference), 10),
    Column("% of all cells", _pct_of_all, 8, NUMBER, "0.0"),
    Column("Note", _class_note, 30, wrap=True),
    Column("Class id", lambda r: r.class_id, 21),
)

@dataclass(frozen=True)
class _CellLine:
    """One Cells or Review line: the machine's result and what a person verified."""

    cell: CellResult
    verified: str | None = None  # the Verified class a person set; None = blank
    note: str | None = None  # Review: why no thumbnail is shown; None when one is embedded


_VERIFIED_CLASS = Column("Verified class", lambda r: r.verified, 22, editable=True, dropdown=True)

_CELLS: tuple[Column, ...] = (
    Column("Patient", lambda r: r.cell.patient, fit(lambda r: r.cell.patient, 12, 30)),
    Column("File", lambda r: r.cell.file, fit(lambda r: r.cell.file, 20, 60)),
    Column("Class", lambda r: r.cell.class_id, 21),
    Column("Confidence", lambda r: round(r.cell.confidence, 4), 11, NUMBER, "0.000"),
    Column("Second class", lambda r: r.cell.second_class, 21),
    Column("Second probability", lambda r: round(r.cell.second_prob, 4), 11, NUMBER, "0.000"),
    Column("Review", lambda r: "yes" if r.cell.review else "no", 8),
    Column("Review reason", lambda r: r.cell.review_reason, 36),
    _VERIFIED_CLASS,
)

#: Points of the thumbnail's height; a Review row with a thumbnail is this tall, so the picture,
#: its class and its confidence always print on the same page.
THUMBNAIL_PT = THUMBNAIL_PX * 0.75 + 4

_REVIEW: tuple[Column, ...] = (
    Column("Thumbnail", lambda r: r.note, THUMBNAIL_PX / 7 + 2, wrap=True),
    Column("Patient", lambda r: r.cell.patient, fit(lambda r: r.cell.patient, 10, 22), wrap=True),
    Column("File", lambda r: r.cell.file, fit(lambda r: r.cell.file, 16, 34), wrap=True),
    Column("Class", lambda r: class_display(r.cell.class_id), 18, wrap=True),
    Column("Confidence", lambda r: round(r.cell.confidence, 4), 11, NUMBER, "0.000"),
    Column("Second class", lambda r: _display(r.cell.second_class), 18, wrap=True),
    Column("Second probability", lambda r: round(r.cell.second_prob, 4), 11, NUMBER, "0.000"),
    Column("Review reason", lambda r: r.cell.review_reason, 26, wrap=True),
    _VERIFIED_CLASS,
)

_ERRORS: tuple[Column, ...] = (
    Column("Patient", lambda e: e.patient, fit(lambda e: e.patient, 12, 30), wrap=True),
    Column("File", lambda e: e.file or WHOLE_PATIENT, fit(lambda e: e.file, 20, 50), wrap=True),
    Column("Reason", lambda e: e.reason, fit(lambda e: e.reason, 30, 80), wrap=True),
)

_RUN: tuple[Column, ...] = (
    Column("Item", lambda kv: kv[0], fit(lambda kv: kv[0], 20, 50), wrap=True),
    Column("Value", lambda kv: kv[1], fit(lambda kv: str(kv[1]), 20, 90), AUTO),
)


# -- the verified workbook (batchwbc verify): pre-classified and verified side by side ---------

def _vp(v: PatientVerification) -> str:
    return v.patient


def _flag_text(s: PatientSummary) -> str:
    return "\n".join(f.message for f in s.flags) if s.flags else "none"


def _side_by_side(header: str, get: Callable[[Differential], float | None]) -> tuple[Column, Column]:
    """A measure before and after verification, in two neighbouring columns."""
    return (Column(f"{header} pre-classified", lambda v: _pct(get(v.pre.differential)), 13, NUMBER, "0.0"),
            Column(f"{header} verified", lambda v: _pct(get(v.post.differential)), 11, NUMBER, "0.0",
                   print_with_previous=True))


_SUMMARY_VERIFIED: tuple[Column, ...] = (
    Column("Patient", _vp, fit(_vp, 12, 40), severity=lambda v: _worst(v.post)),
    Column("Status", lambda v: v.status, 30, severity=lambda v: SIGNED if v.signed else WARNING, wrap=True),
    Column("Verified by", lambda v: v.verified_by or None, 16, editable=True),
    Column("Verified on", lambda v: v.verified_on or None, 16, editable=True, print_with_previous=True),
    Column("Cells classified", lambda v: v.post.differential.classified, 10, PLAIN),
    Column("Corrected cells", lambda v: v.corrected, 10, PLAIN),
    Column("Review cells verified", lambda v: f"{v.review_verified} of {v.review_cells}", 12),
    Column("WBC pre-classified", lambda v: v.pre.differential.wbc, 12, PLAIN),
    Column("WBC verified", lambda v: v.post.differential.wbc, 10, PLAIN, print_with_previous=True),
    Column("Flags (verified)", lambda v: _flag_text(v.post), 60, severity=lambda v: _worst(v.post), wrap=True),
    *_side_by_side("Blasts %", lambda d: d.blasts_pct),
    *_side_by_side("IG %", lambda d: d.ig_pct),
    *_side_by_side("Band %", lambda d: d.band_pct),
    *_side_by_side("Immature %", lambda d: d.immature_pct),
    *_side_by_side("NRBC /100 WBC", lambda d: d.nrbc_per_100_wbc),
    Column("Platelets verified", lambda v: v.post.differential.platelets, 10, PLAIN),
    Column("Unclassified pre-classified", lambda v: v.pre.differential.unclassified, 13, PLAIN),
    Column("Unclassified verified", lambda v: v.post.differential.unclassified, 12, PLAIN, print_with_previous=True),
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
#: Every column header batchwbc writes; a column a person adds under another header is ignored.
KNOWN_HEADERS = frozenset(
    c.header for table in (_SUMMARY, _DIFFERENTIAL, _CELLS, _REVIEW, _ERRORS, _RUN, _SUMMARY_VERIFIED,
                           _DIFFERENTIAL_VERIFIED) for c in table)
#: Columns a person may edit, on any sheet; all others are protected by the hidden Check column.
EDITABLE_COLUMNS = tuple(dict.fromkeys(
    c.header for table in (_SUMMARY, _CELLS, _REVIEW, _SUMMARY_VERIFIED) for c in table if c.editable))


# =================================================================== the sheets

def _write_summary(wb: Any, summaries: Sequence[PatientSummary], classes: Sequence[str],
                   links: Mapping[str, str], alert: str | None = None) -> None:
    """The banner in row 1 (the software pre-classifies, a person decides; with `alert`, why
    the results are unreliable and what to do next), headers in row 2."""
    _write_sheet(wb, "Summary", shown_columns(_SUMMARY, classes), summaries, summaries,
                 autofilter=len(summaries), banner=BANNER, links=links, alert=alert, in_blocks=True)


def differential_links(summaries: Sequence[PatientSummary], classes: Sequence[str]) -> dict[str, str]:
    """Each patient's first row in the Differential sheet, for the Summary's link to it."""
    n = len(_shown_classes(classes))
    if n == 0:
        return {}
    return {s.patient: f"'Differential'!A{HEADER_ROWS['Differential'] + 1 + i * n}" for i, s in enumerate(summaries)}


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
    _write_sheet(wb, "Differential", _DIFFERENTIAL, rows, rows, autofilter=len(rows),
                 keep_together=lambda r: r.patient)  # a patient's differential prints on one page


def _write_cells(wb: Any, cells: Sequence[CellResult], choices: Sequence[str],
                 verified: Mapping[tuple[str, str], str]) -> None:
    lines = [_CellLine(c, verified.get((c.patient, c.file))) for c in cells]
    _write_sheet(wb, "Cells", _CELLS, lines, lines, autofilter=len(lines), choices=choices)


def _thumbnail(jpeg: bytes) -> Any:
    """An openpyxl Image scaled to THUMBNAIL_PX, or None when the bytes are not a readable image."""
    from openpyxl.drawing.image import Image

    class _StoredImage(Image):
        """openpyxl stores JPEG, PNG and GIF bytes unchanged, but re-opens each picture with
        Pillow to read them back when the workbook is saved; hand it the bytes it already has."""

        def _data(self) -> bytes:
            return jpeg if self.format in ("gif", "jpeg", "png") else super()._data()

    try:
        img = _StoredImage(BytesIO(jpeg))
    except Exception:  # noqa: BLE001 - PIL raises several types for bad data
        return None
    scale = THUMBNAIL_PX / max(img.width, img.height, 1)
    img.width, img.height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    return img


def review_order(summaries: Sequence[PatientSummary]) -> list[CellResult]:
    """The Review sheet's cells: patient by patient, least confident first."""
    return [c for s in summaries for c in sorted((c for c in s.cells if c.review), key=lambda c: c.confidence)]


def thumbnails_to_embed(review: Sequence[CellResult], limit: int, readable: Callable[[int], bool]) -> set[int]:
    """Positions in `review` whose thumbnails are embedded: each patient's fair share of
    `limit` (batchwbc/core/thumbnail_quota.py), least confident first, among the cells whose thumbnail is
    `readable` (an unreadable one would waste a slot another cell could use)."""
    by_patient: dict[str, list[int]] = {}
    for i, c in enumerate(review):
        if readable(i):
            by_patient.setdefault(c.patient, []).append(i)  # already least confident first
    quota = fair_quota([len(v) for v in by_patient.values()], limit)
    return {i for positions, q in zip(by_patient.values(), quota) for i in positions[:q]}


def _cap_note(limit: int) -> str:
    return f"(not embedded: at most {limit:,} images, shared fairly across patients)"


def _review_rows(sh: "_Sheet", review: Sequence[_CellLine], limit: int) -> Iterator[_CellLine]:
    """Review lines, in order; each thumbnail is embedded at the row it is about to fill, and
    that row is as tall as the thumbnail, so picture and data print on one page."""
    images = {i: _thumbnail(line.cell.thumbnail_jpeg) for i, line in enumerate(review)
              if line.cell.thumbnail_jpeg is not None}
    chosen = thumbnails_to_embed([line.cell for line in review], limit, lambda i: images.get(i) is not None)
    for i, line in enumerate(review):
        img = images.pop(i, None)
        if line.cell.thumbnail_jpeg is None:
            note: str | None = "(no thumbnail)"
        elif img is None:
            note = "(thumbnail unreadable)"
        elif i not in chosen:
            note = _cap_note(limit)
        else:
            img.anchor = f"A{sh.rows + 1}"
            sh.ws.add_image(img)
            note = None
        yield replace(line, note=note)


def _write_review(wb: Any, summaries: Sequence[PatientSummary], limit: int, choices: Sequence[str],
                  verified: Mapping[tuple[str, str], str]) -> int:
    """Cells below the review threshold, patient by patient, least confident first; returns
    the number of thumbnails embedded.

    Widths fit the review cells; rows are produced while writing because each embedded
    thumbnail is anchored to the row it belongs to. Each patient starts on a new printed page,
    so one patient's review list can be printed (and checked, and filed) on its own: a 24-patient
    night ran to 128 pages with the patients running into each other."""
    review = [_CellLine(c, verified.get((c.patient, c.file))) for c in review_order(summaries)]
    sh = _write_sheet(wb, "Review", _REVIEW, (), review, autofilter=None, choices=choices)
    sh.ws.oddFooter.center.text = f"Thumbnails: at most {limit:,}, shared fairly across patients"
    for after in patient_starts([line.cell.patient for line in review]):
        sh.ws.row_breaks.append(_break(sh.header_row + after))
    embedded = 0
    for line in _review_rows(sh, review, limit):
        embedded += line.note is None
        sh.set_height(_height(sh, _REVIEW, line, minimum=THUMBNAIL_PT if line.note is None else 0.0))
        _append(sh, _REVIEW, line)
    return embedded


def class_display(class_id: str) -> str:
    """Display name for the Review sheet; an unclassified crop says why it is there."""
    from batchwbc.engine.ood import UNCLASSIFIED, UNCLASSIFIED_DISPLAY, UNCLASSIFIED_REASON

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


_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _as_number(text: str) -> Any:
    """A settings value such as "20" or "0.5" as the number it is (the Run sheet stores numbers
    as numbers); anything else - units, words, a leading zero - stays text."""
    if not _PLAIN_NUMBER.fullmatch(text) or (len(text) > 1 and text.startswith("0") and text[1] != "."):
        return text
    return float(text) if "." in text else int(text)


def run_rows(run: RunData, settings: Settings, summaries: Sequence[PatientSummary],
             thumbnails_embedded: int | None = None) -> list[tuple[str, Any]]:
    """The Run sheet's key/value rows: everything needed to audit or reproduce the report.

    Counts and thresholds are numbers (int/float), so they can be summed and compared."""
    m = run.model
    t = totals(list(summaries))
    unreadable = sum(1 for e in run.errors if e.file)
    failed = sum(1 for e in run.errors if not e.file)
    review_cells = len(review_order(summaries))
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
        ("Model input size (px)", m.input_size),
        ("Model calibration temperature", "" if m.temperature is None else m.temperature),
        ("Model default review threshold", "" if m.review_threshold is None else m.review_threshold),
        ("Review threshold used (confidence below it goes to Review)", run.review_threshold),
        ("Patients", t.patients),
        ("Cells classified", t.classified),
        ("Crops read (cells classified + unclassified; rows of the Cells sheet)", len(run.cells)),
        ("WBC classified", t.wbc),
        ("Cells to review", t.review_cells),
        ("Unclassified cells (not recognised as a cell the model knows; in no count)", t.unclassified),
        ("Data shift (whole run, compared with the model's own validation data)", _shift_verdict(run.data_shift)),
        ("Results unreliable (the Summary's banner)", run_alert_of(run, summaries) or "no"),
    ]
    if thumbnails_embedded is not None:
        rows.append((f"Review thumbnails embedded (at most {settings.review_max_images:,}, each patient an "
                     "equal share, least confident first)", thumbnails_embedded))
        rows.append(("Review cells listed without a thumbnail", review_cells - thumbnails_embedded))
    rows += [
        ("Unreadable files", unreadable),
        ("Patients that failed as a whole", failed),
        ("Ignored files (hidden or not images)", run.ignored_files),
        ("Percentages", "of WBC = leukocytes only; NRBC reported per 100 WBC; platelets counted apart; "
                        "smudge cells as % of all cells"),
        ("Confidence intervals", "exact binomial (Clopper-Pearson) 95%, as in Rümke's tables"),
        ("Immature granulocytes (IG)", "promyelocytes + myelocytes + metamyelocytes"),
        ("Immature total", "blasts + IG + band neutrophils"),
        ("Class columns", "Cells sheet and CSV: class ids; Summary, Differential, Review: display names"),
    ]
    rows += _ood_rows(m)
    rows += [(k, _as_number(v)) for k, v in settings.describe()]
    for key in (KEY_TRAINING_DATA, KEY_TEST_METRICS):
        if key in m.metadata:
            rows.append((f"Model metadata {key}", m.metadata[key]))
    rows += [(str(k), v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
             for k, v in run.extra.items()]
    return rows


def _shift_verdict(shift: "ShiftDecision | None") -> str:
    if shift is None or (not shift.decided and shift.threshold is None):
        return "not checked: the model carries no out-of-distribution reference"
    detail = shift.detail()
    text = f"{shift.text()} ({detail})" if detail else shift.text()
    return f"DATA_SHIFT: {text}" if shift.raised else text


def _ood_rows(m) -> list[tuple[str, str]]:
    from batchwbc.engine import ood
    from batchwbc.engine.ood import KEY_OOD, OodReferenceError, from_metadata

    try:
        ref = from_metadata(m.metadata)
    except OodReferenceError as exc:
        return [("Out-of-distribution reference", f"unusable: {exc}")]
    if ref is None:
        return [("Out-of-distribution reference", "none in the model file: no crop is labelled unclassified")]
    rows = [("Out-of-distribution reference", f"{ref.describe()} ({KEY_OOD}); unclassified when the score is above "
             f"{ref.threshold:.4g} or it lies nearer a reject centre by more than {ref.reject_margin:.4g}"
             + (f" or on the junk side of the not-a-cell rule (log-odds above {ref.junk.threshold:.3g})" if ref.junk is not None else ""))]
    if ref.colour is not None:
        rows.append(("Stain-colour check", f"unclassified ({ood.COLOUR_REASON}) when the crop's mean Lab a*/b* lies "
                     f"beyond Mahalanobis distance {ref.colour.threshold:.3g} of every training source "
                     f"({', '.join(ref.colour.groups)})"))
    if ref.shift is not None:
        rows.append(("Data-shift rule", f"DATA_SHIFT when the lower 95% bound of the share of cells scoring above "
                     f"{ref.shift.cell_cut:.4g} exceeds {100 * ref.shift.threshold:.1f}%; no decision under "
                     f"{ref.shift.min_cells} cells"))
    return rows


def _write_run(wb: Any, rows: list[tuple[str, Any]]) -> None:
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
            classes = run.model.classes
            choices = class_choices(classes, [c.class_id for c in run.cells])
            _write_summary(wb, summaries, classes, differential_links(summaries, classes),
                           run_alert_of(run, summaries))
            _write_differential(wb, summaries, classes, settings)
            _write_cells(wb, run.cells, choices, {})
            embedded = _write_review(wb, summaries, settings.review_max_images, choices, {})
            _write_errors(wb, run.errors)
            _write_run(wb, run_rows(run, settings, summaries, embedded))
            write_record_sheet(wb, record_of_run(run, settings, summaries, _shift_verdict(run.data_shift)))
            wb.save(tmp)
    finally:
        _discard_sheet_buffers(wb)


def write_verified_workbook(rep: VerifiedReport, settings: Settings, out_path: str | os.PathLike,
                            record: "RunRecord | None" = None) -> None:
    """Write `batchwbc verify`'s workbook atomically: the report's sheets with the verified
    classes kept in place, the Summary and Differential showing pre-classified and verified
    values side by side, and the Run sheet extended by the verification's own rows. It has
    the same Verified columns and checks as a report, and carries the run's `record`
    (outputs.run_record) forward, so it can be verified again."""
    from openpyxl import Workbook

    pre = [p.pre for p in rep.patients]
    post = [p.post for p in rep.patients]
    verified = {(vc.cell.patient, vc.cell.file): vc.verified for vc in rep.cells if vc.verified}
    cells = [vc.cell for vc in rep.cells]
    wb = Workbook(write_only=True)
    try:
        with atomic_output(out_path) as tmp:
            _write_sheet(wb, "Summary", _SUMMARY_VERIFIED, rep.patients, rep.patients,
                         autofilter=len(rep.patients), banner=VERIFIED_BANNER, alert=run_alert(post, adapted=rep.model_adapted), in_blocks=True)
            rows = _diff_rows(post, _shown_classes(rep.model_classes, verified.values()), settings, pre)
            _write_sheet(wb, "Differential", _DIFFERENTIAL_VERIFIED, rows, rows, autofilter=len(rows),
                         keep_together=lambda r: r.patient)
            _write_cells(wb, cells, rep.choices, verified)
            _write_review(wb, pre, settings.review_max_images, rep.choices, verified)
            _write_errors(wb, rep.errors)
            _write_run(wb, list(rep.run_rows))
            if record is not None:
                write_record_sheet(wb, record)
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


def write_summary_csv(summaries: Sequence[PatientSummary], out_path: str | os.PathLike,
                      classes: Sequence[str] | None = None) -> None:
    """The Summary sheet as UTF-8 CSV (no BOM): the same Column table, headers and values (its
    machine columns), one line per patient, for LIS middleware and scripts ("Flag codes" is
    '; '-separated).
    `classes` (the model's) leaves out the class columns the sheet leaves out (`shown_columns`);
    None keeps them all. Written atomically: a failure leaves the previous file untouched."""
    # Verified by / on are the technologist's, empty now; a link to another sheet means nothing in a CSV.
    # The banner is a sheet row above the headers, not a column: the CSV starts with the headers.
    table = _SUMMARY if classes is None else shown_columns(_SUMMARY, classes)
    columns = [c for c in table if not c.editable and c.link is None]
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
