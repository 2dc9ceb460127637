"""The machine-readable record of a run, kept inside its workbook for `batchwbc verify`.

The Run sheet is for people: its labels are worded to be read and printed, and they change
with the layout. What verify needs to recount a workbook - the model that made it, the
settings it was made with, the crops it read, the DATA_SHIFT decisions - is written a second
time here, under stable keys with JSON values, and verify reads only this.

Why a hidden sheet ("_record": one key and its JSON value per row) and not custom document
properties: a hidden sheet is ordinary workbook content, so Excel and LibreOffice both keep
it, and keep it hidden, when a reviewer saves the workbook (checked: LibreOffice 7 re-saving
as .xlsx keeps the sheet, its state and its text); custom document properties are metadata
that LibreOffice maps to its own user-defined properties and Excel limits a text property to
255 characters, while the settings alone are longer. A cell holds at most 32,767 characters,
so a long value continues on the next rows under the same key. The last row holds the SHA-256
of the other rows, so a record edited after unhiding the sheet is refused, not trusted.

A workbook written before the record existed (batchwbc 0.1.0 and earlier) has no such sheet;
`batchwbc.outputs.workbook_reader` then falls back to reading the Run sheet's labels.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from typing import Any, Mapping, Sequence

from batchwbc.core.config import Settings, settings_as_dict
from batchwbc.core.flags import DATA_SHIFT
from batchwbc.core.records import RunData
from batchwbc.core.summary import PatientSummary

#: The hidden sheet's name; a report's visible sheets are workbook.SHEETS.
RECORD_SHEET = "_record"
#: Raised when a key or the meaning of a value changes; a reader refuses a newer format.
RECORD_FORMAT = 1
_FORMAT_KEY = "record_format"
_CHECK_KEY = "sha256"
_HEADER = ("key", "value (JSON)")
_CHUNK = 30_000  # characters per cell, under Excel's 32,767
#: How the report words a DATA_SHIFT flag (core.flags.evaluate); the record keeps what follows.
DATA_SHIFT_PREFIX = "Data shift: "


class RecordError(Exception):
    """A record that cannot be used; str is one sentence."""


@dataclass(frozen=True)
class RunRecord:
    """What `batchwbc verify` needs of a run, independent of how the Run sheet words it."""

    batchwbc_version: str  # the version that ran the classification
    run_started: str  # ISO 8601, seconds
    slides_root: str
    model_file: str
    model_sha256: str
    model_version: str
    model_classes: tuple[str, ...]
    review_threshold: float  # the one used (config, else the model's, else the built-in default)
    settings: Mapping[str, Any]  # as a config file states them (core.config.settings_as_dict)
    crops_read: int  # rows of the Cells sheet
    cells_classified: int
    data_shift: Mapping[str, str] = field(default_factory=dict)  # patient -> DATA_SHIFT message after the prefix
    run_data_shift: str = ""  # the whole run's verdict, as the Run sheet states it
    written_by: str = "run"  # the command that wrote this workbook: "run" or "verify"

    def settings_object(self) -> Settings:
        """The settings, validated like a config file; raises core.config.ConfigError."""
        from batchwbc.core.config import settings_from_dict

        return settings_from_dict(self.settings, "the workbook's run record")


def record_of_run(run: RunData, settings: Settings, summaries: Sequence[PatientSummary],
                  run_data_shift: str = "") -> RunRecord:
    """The record of a finished run, from the same objects the sheets are written from."""
    m = run.model
    shifts = {s.patient: f.message[len(DATA_SHIFT_PREFIX):] if f.message.startswith(DATA_SHIFT_PREFIX) else f.message
              for s in summaries for f in s.flags if f.code == DATA_SHIFT}
    return RunRecord(
        batchwbc_version=run.tool_version, run_started=run.started.isoformat(sep=" ", timespec="seconds"),
        slides_root=str(run.root), model_file=str(m.path), model_sha256=m.sha256, model_version=m.model_version,
        model_classes=tuple(m.classes), review_threshold=float(run.review_threshold),
        settings=settings_as_dict(settings), crops_read=len(run.cells),
        cells_classified=sum(s.differential.classified for s in summaries),
        data_shift=shifts, run_data_shift=run_data_shift)


def verified_record(record: RunRecord, settings: Settings) -> RunRecord:
    """The record a verified workbook carries: the run's, with the settings verify used (a
    --config replaces the run's), so verifying it again recounts with the same thresholds."""
    return replace(record, settings=settings_as_dict(settings), written_by="verify")


# -- the sheet ------------------------------------------------------------------------------------

def _canonical(values: Mapping[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def record_rows(record: RunRecord) -> list[tuple[str, str]]:
    """(key, JSON text) rows: the format, each field (long values split), then the checksum.

    ensure_ascii keeps every value plain ASCII, so no patient name can put a character into
    the sheet that XML cannot hold or a spreadsheet would read as a formula."""
    values = {_FORMAT_KEY: RECORD_FORMAT, **{k: v for k, v in asdict(record).items()}}
    rows: list[tuple[str, str]] = []
    for key, value in values.items():
        text = json.dumps(value, ensure_ascii=True)
        rows += [(key, text[i:i + _CHUNK]) for i in range(0, len(text), _CHUNK)] or [(key, text)]
    rows.append((_CHECK_KEY, hashlib.sha256(_canonical(values).encode("ascii")).hexdigest()))
    return rows


def write_record_sheet(wb: Any, record: RunRecord) -> None:
    """Append the hidden record sheet to a write-only openpyxl workbook (the last sheet)."""
    from openpyxl.cell import WriteOnlyCell

    ws = wb.create_sheet(RECORD_SHEET)
    ws.sheet_state = "hidden"

    def text(value: str) -> Any:
        cell = WriteOnlyCell(ws, value=value)
        cell.data_type = "s"  # JSON text stays text, whatever it starts with
        return cell

    ws.append([text(h) for h in _HEADER])
    for key, value in record_rows(record):
        ws.append([text(key), text(value)])


def read_record_sheet(wb: Any, name: str) -> RunRecord | None:
    """The record of an openpyxl workbook, or None when it has none (written before it existed);
    raises RecordError when it is there but cannot be trusted. `name` names the file in errors."""
    if RECORD_SHEET not in wb.sheetnames:
        return None
    texts: dict[str, str] = {}
    for row in wb[RECORD_SHEET].iter_rows(min_row=2, values_only=True):
        key, value = (list(row) + [None, None])[:2]
        if key is None and value is None:
            continue
        texts[str(key)] = texts.get(str(key), "") + ("" if value is None else str(value))
    return _parse(texts, name)


def _parse(texts: Mapping[str, str], name: str) -> RunRecord:
    damaged = RecordError(f"the hidden {RECORD_SHEET} sheet of {name} was edited or damaged, so the run it records "
                          "cannot be trusted; start again from the original report.")
    try:
        values = {k: json.loads(v) for k, v in texts.items() if k != _CHECK_KEY}
    except ValueError:
        raise damaged from None
    fmt = values.get(_FORMAT_KEY)
    if isinstance(fmt, int) and fmt > RECORD_FORMAT:
        from batchwbc import __version__

        raise RecordError(f"{name} was written by batchwbc {values.get('batchwbc_version', '?')} with run record "
                          f"format {fmt}, which batchwbc {__version__} cannot read (it reads format {RECORD_FORMAT}); "
                          "verify it with that batchwbc version or a newer one.")
    check = hashlib.sha256(_canonical(values).encode("ascii")).hexdigest()
    if fmt != RECORD_FORMAT or texts.get(_CHECK_KEY) != check:
        raise damaged
    known = {f.name for f in fields(RunRecord)}
    try:
        kwargs = {k: v for k, v in values.items() if k in known}
        kwargs["model_classes"] = tuple(kwargs["model_classes"])
        return RunRecord(**kwargs)
    except (KeyError, TypeError):
        raise damaged from None


def legacy_record(run: Mapping[str, str], settings: Mapping[str, Any], shifts: Mapping[str, str]) -> RunRecord:
    """A record rebuilt from a Run sheet's labels, for a workbook written before the record
    (batchwbc 0.1.0): the labels that version wrote, read once here and nowhere else."""
    def number(text: str, default: float) -> float:
        try:
            return float(text)
        except ValueError:
            return default

    cells = run.get("Cells classified", "")
    crops = run.get("Crops read (cells classified + unclassified; rows of the Cells sheet)", cells)
    return RunRecord(
        batchwbc_version=run.get("batchwbc version", ""), run_started=run.get("Run started", ""),
        slides_root=run.get("Slides folder") or run.get("Slides root", ""), model_file=run.get("Model file", ""),
        model_sha256=run.get("Model sha256", ""), model_version=run.get("Model version", ""),
        model_classes=tuple(c.strip() for c in run.get("Model classes", "").split(",") if c.strip()),
        review_threshold=number(run.get("Review threshold used (confidence below it goes to Review)", ""), float("nan")),
        settings=settings, crops_read=int(number(crops, 0)), cells_classified=int(number(cells, 0)),
        data_shift=dict(shifts),
        run_data_shift=run.get("Data shift (whole run, compared with the model's own validation data)", ""),
        written_by="verify" if any(k.startswith("Verification: ") for k in run) else "run")


def started_at(record: RunRecord) -> datetime | None:
    """The run's start as a datetime, or None when the record holds none that parses."""
    try:
        return datetime.fromisoformat(record.run_started)
    except ValueError:
        return None
