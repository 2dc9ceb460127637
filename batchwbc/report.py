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

Sheets: Summary, Differential, Cells, Review, Errors, Run (see docs/report.md).
"""
from __future__ import annotations

import csv
import math
import os
import re
import secrets
from collections import defaultdict
from contextlib import contextmanager, suppress
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import catalogue
from .config import Settings
from .datashift import ShiftDecision, decide_all
from .differential import NRBC_CLASS, PLATELET_CLASS, Differential, summarize
from .flags import CRITICAL, WARNING, Flag, evaluate, worst_severity
from .model import KEY_TEST_METRICS, KEY_TRAINING_DATA
from .results import CellResult, FileError, RunData


class OutputError(Exception):
    """A report path that cannot be written; str(exc) is one sentence for the user."""


SHEETS = ("Summary", "Differential", "Cells", "Review", "Errors", "Run")
SUMMARY_COLUMNS = (
    "Patient", "Cells classified", "WBC", "Flags", "Blasts %", "IG %", "Band %", "Immature %",
    "NRBC /100 WBC", "Platelets", "Review cells", "Unclassified", "Unreadable files", "Notes", "Flag codes",
)
DIFFERENTIAL_COLUMNS = (
    "Patient", "Class", "Count", "% of WBC", "95% CI low", "95% CI high", "Reference range (%)",
    "vs. reference", "Note", "Class id",
)
CELLS_COLUMNS = ("Patient", "File", "Class", "Confidence", "Second class", "Second probability", "Review")
REVIEW_COLUMNS = ("Thumbnail", "Patient", "File", "Class", "Confidence", "Second class", "Second probability")
ERRORS_COLUMNS = ("Patient", "File", "Reason")
RUN_COLUMNS = ("Item", "Value")
#: Column names of the cells CSV, for software; class columns hold catalogue ids.
CSV_COLUMNS = ("patient", "file", "class", "confidence", "second_class", "second_prob", "review")

WHOLE_PATIENT = "(whole patient folder)"
THUMB_PX = 80  # longest side of an embedded thumbnail on screen

_FILLS = {CRITICAL: "FFC7CE", WARNING: "FFEB9C"}  # Excel's own "bad" red and "neutral" amber
_FONTS = {CRITICAL: "9C0006", WARNING: "9C5700"}
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

    def __init__(self, wb: Any, title: str, columns: Sequence[str], widths: Sequence[float]):
        from openpyxl.styles import Alignment, Font, PatternFill

        self.ws = wb.create_sheet(title)
        self._Font, self._PatternFill, self._Alignment = Font, PatternFill, Alignment
        from openpyxl.utils import get_column_letter

        for i, w in enumerate(widths, 1):
            self.ws.column_dimensions[get_column_letter(i)].width = w
        self.ws.freeze_panes = "A2"
        self.rows = 0
        self.ncols = len(columns)
        header_font, header_fill = Font(bold=True), PatternFill("solid", fgColor="D9D9D9")
        self.append([self.text(name, font=header_font, fill=header_fill) for name in columns])

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


# =================================================================== the workbook

def _group(run: RunData) -> tuple[list[str], dict[str, list[CellResult]], dict[str, list[FileError]]]:
    cells_by: dict[str, list[CellResult]] = defaultdict(list)
    for c in run.cells:
        cells_by[c.patient].append(c)
    errors_by: dict[str, list[FileError]] = defaultdict(list)
    for e in run.errors:
        errors_by[e.patient].append(e)
    order = list(dict.fromkeys([*run.patients, *cells_by, *errors_by]))  # defensive: nobody is dropped
    return order, cells_by, errors_by


def _pct(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _write_summary(wb: Any, order: list[str], diffs: dict[str, Differential],
                   flags: dict[str, list[Flag]], errors_by: dict[str, list[FileError]]) -> None:
    widths = [_fit(order, 12, 40), 10, 8, 70, 9, 9, 9, 11, 10, 10, 10, 12, 11, 40, 24]
    sh = _Sheet(wb, "Summary", SUMMARY_COLUMNS, widths)
    sh.filter(len(order))
    for patient in order:
        d, fl = diffs[patient], flags[patient]
        errs = errors_by.get(patient, [])
        unreadable = sum(1 for e in errs if e.file)
        notes = "; ".join(e.reason for e in errs if not e.file)
        sev = worst_severity(fl)
        style = sh.severity_style(sev)
        flag_text = "\n".join(f.message for f in fl) if fl else "none"
        sh.append([
            sh.text(patient, **style),
            d.n_cells,
            d.wbc,
            sh.text(flag_text, alignment=sh.wrap(), **style),
            sh.number(_pct(d.blasts_pct), "0.0"),
            sh.number(_pct(d.ig_pct), "0.0"),
            sh.number(_pct(d.band_pct), "0.0"),
            sh.number(_pct(d.immature_pct), "0.0"),
            sh.number(_pct(d.nrbc_per_100_wbc), "0.0"),
            d.platelets,
            d.n_review,
            d.unclassified,
            unreadable,
            sh.text(notes, **sh.severity_style(WARNING if notes else None)),
            sh.text(", ".join(f.code for f in fl)),
        ])


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


def _write_differential(wb: Any, order: list[str], diffs: dict[str, Differential],
                        classes: Sequence[str], settings: Settings) -> None:
    shown = [c for c in catalogue.CLASS_IDS if c in classes]  # a class the model cannot predict is not "0%"
    widths = [_fit(order, 12, 40), 22, 8, 9, 10, 10, 18, 12, 26, 22]
    sh = _Sheet(wb, "Differential", DIFFERENTIAL_COLUMNS, widths)
    sh.filter(len(order) * len(shown))
    for patient in order:
        d = diffs[patient]
        for cid in shown:
            cls = catalogue.get(cid)
            ci = d.ci.get(cid)
            rng = settings.reference_range(cid) if cls.counts_in_wbc else None
            pct = d.percent.get(cid)
            if cid == NRBC_CLASS:
                per100 = "" if d.nrbc_per_100_wbc is None else f": {d.nrbc_per_100_wbc:.1f} per 100 WBC"
                note = f"not a leukocyte, not in WBC{per100}"
            elif cid == PLATELET_CLASS:
                note = "not a leukocyte, counted apart"
            else:
                note = ""
            sh.append([
                sh.text(patient),
                sh.text(cls.display),
                d.counts[cid],
                sh.number(_pct(pct), "0.0"),
                sh.number(None if ci is None else round(ci[0], 4), "0.0"),
                sh.number(None if ci is None else round(ci[1], 4), "0.0"),
                sh.text(_range_text(rng)),
                sh.text(_vs_reference(pct, rng)),
                sh.text(note),
                sh.text(cid),
            ])


def _write_cells(wb: Any, cells: Sequence[CellResult]) -> None:
    widths = [_fit((c.patient for c in cells), 12, 40), _fit((c.file for c in cells), 20, 80), 22, 11, 22, 11, 8]
    sh = _Sheet(wb, "Cells", CELLS_COLUMNS, widths)
    sh.filter(len(cells))
    for c in cells:
        sh.append([
            sh.text(c.patient), sh.text(c.file), sh.text(c.class_id),
            sh.number(round(c.confidence, 4), "0.000"), sh.text(c.second_class),
            sh.number(round(c.second_prob, 4), "0.000"), sh.text("yes" if c.review else "no"),
        ])


def _thumbnail(jpeg: bytes) -> Any:
    """An openpyxl Image scaled to THUMB_PX, or None when the bytes are not a readable image."""
    from openpyxl.drawing.image import Image

    try:
        img = Image(BytesIO(jpeg))
    except Exception:  # noqa: BLE001 - PIL raises several types for bad data
        return None
    scale = THUMB_PX / max(img.width, img.height, 1)
    img.width, img.height = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    return img


def _write_review(wb: Any, order: list[str], cells_by: dict[str, list[CellResult]], limit: int) -> None:
    review = [c for p in order for c in sorted((c for c in cells_by.get(p, []) if c.review),
                                                 key=lambda c: c.confidence)]
    widths = [THUMB_PX / 7 + 2, _fit((c.patient for c in review), 12, 40), _fit((c.file for c in review), 20, 80),
              22, 11, 22, 11]
    sh = _Sheet(wb, "Review", REVIEW_COLUMNS, widths)
    embedded = 0
    for c in review:
        row = sh.rows + 1
        if embedded >= limit:  # checked first: the pipeline keeps no thumbnails past the limit
            first = f"(not embedded: limit of {limit} images)"
        elif c.thumbnail_jpeg is None:
            first = "(no thumbnail)"
        else:
            img = _thumbnail(c.thumbnail_jpeg)
            if img is None:
                first = "(thumbnail unreadable)"
            else:
                img.anchor = f"A{row}"
                sh.ws.add_image(img)
                sh.ws.row_dimensions[row].height = THUMB_PX * 0.75 + 4  # points
                embedded += 1
                first = ""
        sh.append([
            sh.text(first) if first else None,
            sh.text(c.patient), sh.text(c.file),
            sh.text(class_display(c.class_id)), sh.number(round(c.confidence, 4), "0.000"),
            sh.text(catalogue.get(c.second_class).display if catalogue.is_known(c.second_class) else c.second_class),
            sh.number(round(c.second_prob, 4), "0.000"),
        ])


def class_display(class_id: str) -> str:
    """Display name for the Review sheet; an unclassified crop says why it is there."""
    from .ood import UNCLASSIFIED, UNCLASSIFIED_DISPLAY, UNCLASSIFIED_REASON

    if class_id == UNCLASSIFIED:
        return f"{UNCLASSIFIED_DISPLAY}: {UNCLASSIFIED_REASON}"
    return catalogue.get(class_id).display


def _write_errors(wb: Any, errors: Sequence[FileError]) -> None:
    widths = [_fit((e.patient for e in errors), 12, 40), _fit((e.file for e in errors), 20, 80),
              _fit((e.reason for e in errors), 30, 100)]
    sh = _Sheet(wb, "Errors", ERRORS_COLUMNS, widths)
    sh.filter(len(errors))
    for e in errors:
        sh.append([sh.text(e.patient), sh.text(e.file or WHOLE_PATIENT), sh.text(e.reason)])


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


def run_rows(run: RunData, settings: Settings, diffs: dict[str, Differential],
             shift: "ShiftDecision | None" = None) -> list[tuple[str, str]]:
    """The Run sheet's key/value rows: everything needed to audit or reproduce the report."""
    m = run.model
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
        ("Patients", str(len(diffs))),
        ("Cells classified", str(len(run.cells))),
        ("WBC classified", str(sum(d.wbc for d in diffs.values()))),
        ("Cells to review", str(sum(d.n_review for d in diffs.values()))),
        ("Unclassified cells (not recognised as a cell the model knows; in no count)",
         str(sum(d.unclassified for d in diffs.values()))),
        ("Data shift (whole run, compared with the model's own validation data)",
         _shift_verdict(shift)),
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
    sh = _Sheet(wb, "Run", RUN_COLUMNS, [_fit((k for k, _ in rows), 20, 70), _fit((v for _, v in rows), 20, 100)])
    for key, value in rows:
        sh.append([sh.text(key), sh.text(value)])


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


def write_workbook(run: RunData, settings: Settings, out_path: str | os.PathLike) -> None:
    """Write the report atomically; the old report survives any failure or interruption."""
    from openpyxl import Workbook

    order, cells_by, errors_by = _group(run)
    diffs = {p: summarize(cells_by.get(p, [])) for p in order}
    shifts, run_shift = decide_all(run.model.metadata, run.cells)
    flags = {p: evaluate(diffs[p], settings, shifts.get(p)) for p in order}
    wb = Workbook(write_only=True)
    try:
        with atomic_output(out_path) as tmp:
            _write_summary(wb, order, diffs, flags, errors_by)
            _write_differential(wb, order, diffs, run.model.classes, settings)
            _write_cells(wb, run.cells)
            _write_review(wb, order, cells_by, settings.review_max_images)
            _write_errors(wb, run.errors)
            _write_run(wb, run_rows(run, settings, diffs, run_shift))
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


def write_cells_csv(cells: Iterable[CellResult], out_path: str | os.PathLike) -> None:
    """UTF-8 CSV (no BOM) of every classified cell, one row each; written atomically."""
    with atomic_output(out_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8", errors="replace") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for c in cells:
                writer.writerow([
                    csv_text(c.patient), csv_text(c.file), c.class_id, f"{c.confidence:.4f}",
                    c.second_class, f"{c.second_prob:.4f}", "yes" if c.review else "no",
                ])
