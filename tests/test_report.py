"""The workbook and CSV, read back: sheets, columns, values, text never a formula, atomic writes."""
from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from openpyxl import load_workbook
from PIL import Image as PILImage

from batchwbc.core import catalogue
from batchwbc.outputs import workbook
from batchwbc.outputs.run_record import RECORD_SHEET
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.differential import summarize
from batchwbc.engine.model import ModelInfo
from batchwbc.core.records import CellResult, FileError, RunData
from batchwbc.outputs.row_checks import CHECK_HEADER
from batchwbc.core.summary import summarize_run

NASTY = ['=HYPERLINK("http://x","y")', "+SUM(1,2)", "-2+3", "@cmd", "Ünïcødé 患者 ☃", "#N/A", "=1+1"]


def write(run: RunData, settings, out) -> None:
    """What the job does: summarise each patient once, then let the report format."""
    workbook.write_workbook(run, summarize_run(run, settings), settings, out)


def png(colour=(200, 30, 30), size=32) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def model_info(classes=catalogue.CLASS_IDS) -> ModelInfo:
    return ModelInfo(
        path=Path("/models/tiny.onnx"), sha256="ab" * 32, classes=tuple(classes), input_size=32,
        model_version="tiny-test-1", temperature=1.0, review_threshold=0.6, preprocessing="test",
        metadata={"batchwbc.test_metrics": '{"accuracy": 0.9}'},
    )


def mk(patient: str, class_id: str, i: int, conf: float = 0.95, thumb: bool = True) -> CellResult:
    review = conf < 0.6
    return CellResult(patient, f"{patient}/{class_id}_{i}.jpg", class_id, conf, "monocyte", 1 - conf - 0.01,
                      review, png() if (review and thumb) else None)


def make_run(n_normal=100, extra_patients=NASTY) -> RunData:
    cells: list[CellResult] = []
    # P1: 100 WBC, 23 blasts (critical), 2 NRBC, 1 platelet, 3 low-confidence cells with thumbnails.
    plan = {"myeloblast": 23, "lymphocyte": 40, "neutrophil_segmented": n_normal - 63, "erythroblast": 2, "platelet": 1}
    for cid, n in plan.items():
        cells += [mk("P1", cid, i) for i in range(n)]
    cells += [mk("P1", "monocyte", 100 + i, conf=0.3 + i / 100) for i in range(3)]
    # P2: 100 WBC, normal.
    cells += [mk("P2", "lymphocyte", i) for i in range(30)] + [mk("P2", "neutrophil_segmented", i) for i in range(70)]
    for name in extra_patients:  # patient folders and files whose names look like formulas
        cells += [mk(name, "lymphocyte", 0), mk(name, "eosinophil", 1, conf=0.4)]
    errors = [
        FileError("P2", "P2/broken.jpg", "the file is not a readable image (truncated JPEG)."),
        FileError("FAILED", "", "the folder could not be listed (permission denied)."),
        FileError("=cmd|' /C calc'!A0", "=cmd|' /C calc'!A0/x.png", "=evil reason"),
    ]
    t0 = datetime(2026, 5, 9, 22, 0, 0)
    return RunData(
        root="/data/slides", patients=["P1", "P2", *extra_patients, "EMPTY", "FAILED", "=cmd|' /C calc'!A0"],
        cells=cells, errors=errors, model=model_info(), review_threshold=0.6, started=t0,
        finished=t0 + timedelta(minutes=3, seconds=7), tool_version="0.1.0", ignored_files=4,
        extra={"Decode workers": "2", "=extra": "+1"},
    )


def rows(ws) -> list[tuple]:
    return [tuple(c.value for c in r) for r in ws.iter_rows()]


def table(ws) -> list[tuple]:
    """The sheet's rows from its header row on (the Summary's row 1 is the banner)."""
    return rows(ws)[workbook.HEADER_ROWS[ws.title] - 1:]


def as_dicts(ws) -> list[dict]:
    """Rows as {header: value} from the header row on, without the hidden Check column
    (tests/test_verify.py checks it)."""
    data = table(ws)
    header = data[0]
    return [{k: v for k, v in zip(header, r) if k != CHECK_HEADER} for r in data[1:]]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run = make_run()
    out = tmp_path_factory.mktemp("rep") / "report.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    return run, out, load_workbook(out)


def test_sheets_headers_and_frozen_header_rows(written):
    _, _, wb = written
    assert wb.sheetnames == [*workbook.SHEETS, RECORD_SHEET]  # the run record last, hidden (outputs.run_record)
    assert wb[RECORD_SHEET].sheet_state == "hidden"
    expected = {
        "Summary": workbook.SUMMARY_COLUMNS, "Differential": workbook.DIFFERENTIAL_COLUMNS,
        "Cells": workbook.CELLS_COLUMNS, "Review": workbook.REVIEW_COLUMNS, "Errors": workbook.ERRORS_COLUMNS,
        "Run": workbook.RUN_COLUMNS,
    }
    for name, cols in expected.items():
        ws = wb[name]
        assert table(ws)[0][: len(cols)] == tuple(cols)
        assert ws.freeze_panes == f"A{workbook.HEADER_ROWS[name] + 1}"
        assert ws.column_dimensions["A"].width > 8
    for required in ("Patient", "Cells classified", "WBC", "Flags", "Blasts % all cells", "IG % all cells", "Band % all cells",
                     "NRBC /100 WBC", "Review cells", "Unreadable files"):
        assert required in workbook.SUMMARY_COLUMNS


def test_no_cell_is_a_formula_in_openpyxl_or_in_the_xml(written):
    run, out, wb = written
    for ws in wb.worksheets:
        for r in ws.iter_rows():
            for c in r:
                assert c.data_type != "f", (ws.title, c.coordinate, c.value)
                assert c.data_type != "e", (ws.title, c.coordinate, c.value)
    with zipfile.ZipFile(out) as z:
        sheets = [n for n in z.namelist() if n.startswith("xl/worksheets/sheet")]
        assert len(sheets) == len(workbook.SHEETS) + 1  # and the hidden run record
        for name in sheets:
            xml = z.read(name).decode("utf-8")
            assert not re.search(r"<(\w+:)?f[ >/]", xml), name


def test_formula_like_and_unicode_names_are_stored_verbatim_as_text(written):
    _, _, wb = written
    summary = {r["Patient"]: r for r in as_dicts(wb["Summary"])}
    for name in NASTY:
        assert name in summary
    for r in wb["Summary"].iter_rows(min_row=3, max_col=1):
        assert r[0].data_type == "s"
        assert r[0].quotePrefix == r[0].value.startswith(("=", "+", "-", "@"))
    files = {r["File"] for r in as_dicts(wb["Cells"])}
    assert '=HYPERLINK("http://x","y")/lymphocyte_0.jpg' in files
    errors = as_dicts(wb["Errors"])
    assert {"Patient": "=cmd|' /C calc'!A0", "File": "=cmd|' /C calc'!A0/x.png", "Reason": "=evil reason"} in errors
    run_items = dict(r[:2] for r in rows(wb["Run"])[1:])
    assert run_items["=extra"] == "+1"


def test_summary_values_flags_and_colours(written):
    run, _, wb = written
    ws = wb["Summary"]
    by_patient = {r["Patient"]: r for r in as_dicts(ws)}
    assert list(by_patient) == run.patients  # every group, empty and failed ones included, in order
    p1 = by_patient["P1"]
    assert (p1["Cells classified"], p1["WBC"], p1["Platelets"], p1["Review cells"]) == (106, 103, 1, 3)
    assert p1["Blasts % all cells"] == pytest.approx(100 * 23 / 103, abs=1e-3)
    assert p1["NRBC /100 WBC"] == pytest.approx(100 * 2 / 103, abs=1e-3)
    assert p1["Flag codes"] == "BLASTS_HIGH; NRBC_PRESENT"  # '; '-separated, as issue 12 shows
    assert "23/103 WBC" in p1["Flags"]
    p2 = by_patient["P2"]
    assert p2["Flags"] == "none" and p2["Unreadable files"] == 1 and p2["IG % all cells"] == 0
    empty = by_patient["EMPTY"]
    assert empty["Cells classified"] == 0 and empty["Blasts % all cells"] is None and "LOW_WBC" in empty["Flag codes"]
    assert "permission denied" in by_patient["FAILED"]["Notes"]
    # Colours: red for the critical row, grey for a row whose only flag is LOW_WBC (a note on
    # precision, issue 19), none for a clean one.
    fills = {r[0].value: r[3].fill.fgColor.rgb for r in ws.iter_rows(min_row=3)}
    assert fills["P1"].endswith("FFC7CE")
    assert fills["EMPTY"].endswith("EDEDED")
    assert fills["P2"] in (None, "00000000")


def test_differential_sheet_matches_the_arithmetic(written):
    run, _, wb = written
    rows_p1 = [r for r in as_dicts(wb["Differential"]) if r["Patient"] == "P1"]
    assert [r["Class id"] for r in rows_p1] == list(catalogue.CLASS_IDS)
    wbc_rows = [r for r in rows_p1 if catalogue.get(r["Class id"]).counts_in_wbc]
    assert sum(r["% of WBC"] for r in wbc_rows) == pytest.approx(100.0, abs=1e-2)
    d = summarize([c for c in run.cells if c.patient == "P1"])
    for r in wbc_rows:
        cid = r["Class id"]
        assert r["Count"] == d.counts[cid]
        assert r["In review"] == d.counts[cid] - d.confident_counts[cid]  # the cells a pending flag rests on
        assert r["Class"] == catalogue.get(cid).display
        assert (r["95% CI low"], r["95% CI high"]) == pytest.approx(d.ci[cid], abs=1e-3)
    lym = next(r for r in rows_p1 if r["Class id"] == "lymphocyte")
    assert lym["Reference range (%)"] == "20-40" and lym["vs. reference"] == "within"
    blast = next(r for r in rows_p1 if r["Class id"] == "myeloblast")
    assert blast["vs. reference"] == "above"
    nrbc = next(r for r in rows_p1 if r["Class id"] == "erythroblast")
    assert nrbc["% of WBC"] is None and nrbc["Count"] == 2 and "per 100 WBC" in nrbc["Note"]
    mono = next(r for r in rows_p1 if r["Class id"] == "monocyte")
    assert (mono["Count"], mono["In review"]) == (3, 3)  # make_run's 3 low-confidence monocytes


def test_differential_lists_only_classes_the_model_predicts(tmp_path):
    run = replace(make_run(extra_patients=[]), model=model_info(catalogue.PAPER_CLASS_IDS + ("erythroblast",)))
    run.cells = [c for c in run.cells if c.class_id != "platelet"]
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    ids = {r["Class id"] for r in as_dicts(load_workbook(out)["Differential"])}
    assert "platelet" not in ids and "erythroblast" in ids


def test_cells_sheet_uses_ids_and_relative_paths(written):
    run, _, wb = written
    got = as_dicts(wb["Cells"])
    assert len(got) == len(run.cells)
    first = got[0]
    c = run.cells[0]
    assert (first["Patient"], first["File"], first["Class"], first["Review"]) == (c.patient, c.file, c.class_id, "no")
    assert first["Confidence"] == pytest.approx(c.confidence, abs=1e-4)
    assert sum(r["Review"] == "yes" for r in got) == sum(c.review for c in run.cells)


def test_review_sheet_embeds_thumbnails(written):
    run, out, wb = written
    review_cells = [c for c in run.cells if c.review]
    got = as_dicts(wb["Review"])
    assert len(got) == len(review_cells)
    assert got[0]["Class"] == catalogue.get(review_cells[0].class_id).display
    with zipfile.ZipFile(out) as z:
        media = [n for n in z.namelist() if n.startswith("xl/media/")]
    assert len(media) == len(review_cells)
    assert len(wb["Review"]._images) == len(review_cells)


def test_review_image_cap_and_missing_thumbnails(tmp_path):
    run = make_run(extra_patients=[])
    run.cells.append(mk("P1", "basophil", 999, conf=0.2, thumb=False))
    run.cells.append(replace(mk("P1", "basophil", 998, conf=0.25), thumbnail_jpeg=b"not a png"))
    out = tmp_path / "cap.xlsx"
    write(run, replace(DEFAULT_SETTINGS, review_max_images=2), out)
    ws = load_workbook(out)["Review"]
    first_col = [r[0] for r in rows(ws)[1:]]
    assert len(first_col) == 5
    assert first_col.count("(no thumbnail)") == 1
    assert first_col.count("(thumbnail unreadable)") == 1
    assert sum(1 for v in first_col if v and v.startswith("(not embedded")) == 1
    with zipfile.ZipFile(out) as z:
        assert len([n for n in z.namelist() if n.startswith("xl/media/")]) == 2


def test_errors_and_run_sheets(written):
    run, _, wb = written
    errs = as_dicts(wb["Errors"])
    assert len(errs) == len(run.errors)
    assert {"Patient": "FAILED", "File": workbook.WHOLE_PATIENT,
            "Reason": "the folder could not be listed (permission denied)."} in errs
    items = dict(r[:2] for r in rows(wb["Run"])[1:])
    assert items["Model sha256"] == "ab" * 32
    assert items["Model version"] == "tiny-test-1"
    assert items["Model classes"] == ", ".join(catalogue.CLASS_IDS)
    assert items["Slides root"] == "/data/slides"
    assert items["Duration (h:mm:ss)"] == "0:03:07"
    # Counts are stored as numbers, not as text that looks like a number.
    assert items["Crops read (cells classified + unclassified; rows of the Cells sheet)"] == len(run.cells)
    assert items["Cells classified"] == len(run.cells)  # none unclassified here
    assert items["Unreadable files"] == 2 and items["Patients that failed as a whole"] == 1
    assert items["Patients"] == len(run.patients) and items["Model input size (px)"] == 32
    assert items["Review threshold used (confidence below it goes to Review)"] == 0.6
    assert items["Decode workers"] == "2"  # run.extra passed as text stays text
    for key, value in DEFAULT_SETTINGS.describe():
        assert str(items[key]) == value or items[key] == float(value)
    assert isinstance(next(v for k, v in items.items() if k.startswith("Flag LOW_WBC")), int)
    cells = {c.coordinate: c for r in wb["Run"].iter_rows(min_row=2) for c in r}
    numeric = [c for c in cells.values() if c.column == 2 and isinstance(c.value, (int, float))]
    assert len(numeric) >= 15 and all(c.data_type == "n" for c in numeric)


def test_control_characters_in_names_do_not_crash(tmp_path):
    run = make_run(extra_patients=["bad\x01name\x1f", "surrogate\udcff"])
    out = tmp_path / "ctl.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    names = [r["Patient"] for r in as_dicts(load_workbook(out)["Summary"])]
    assert "bad\ufffdname\ufffd" in names and "surrogate\ufffd" in names


# ------------------------------------------------------------------ atomic writing

def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("exc_type", [OSError, KeyboardInterrupt, RuntimeError])
def test_failure_during_save_keeps_the_old_report_and_leaves_no_temp_files(tmp_path, monkeypatch, exc_type):
    import openpyxl.workbook.workbook as wbmod
    from openpyxl.worksheet import _writer

    out = tmp_path / "report.xlsx"
    out.write_bytes(b"previous report")
    real_save = wbmod.Workbook.save

    def half_save(self, filename):
        Path(filename).write_bytes(b"PK\x03\x04 half a zip")  # something was written...
        raise exc_type("disk went away mid-write")  # ...then the write failed

    monkeypatch.setattr(wbmod.Workbook, "save", half_save)
    expected = workbook.OutputError if exc_type is OSError else exc_type
    with pytest.raises(expected):
        write(make_run(extra_patients=[]), DEFAULT_SETTINGS, out)
    assert out.read_bytes() == b"previous report"
    assert listing(tmp_path) == ["report.xlsx"]
    assert not [p for p in _writer.ALL_TEMP_FILES if os.path.exists(p)]  # openpyxl's row buffers too
    monkeypatch.setattr(wbmod.Workbook, "save", real_save)
    write(make_run(extra_patients=[]), DEFAULT_SETTINGS, out)  # and the next run works
    assert load_workbook(out).sheetnames == [*workbook.SHEETS, RECORD_SHEET]


def test_interrupt_while_building_rows_keeps_the_old_report(tmp_path, monkeypatch):
    out = tmp_path / "report.xlsx"
    write(make_run(extra_patients=[]), DEFAULT_SETTINGS, out)
    before = out.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workbook, "_write_review", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(make_run(), DEFAULT_SETTINGS, out)
    assert out.read_bytes() == before
    assert listing(tmp_path) == ["report.xlsx"]


def test_csv_write_failure_keeps_old_csv(tmp_path, monkeypatch):
    out = tmp_path / "cells.csv"
    out.write_text("old\n")

    def broken_cells():
        yield mk("P", "lymphocyte", 0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workbook.write_cells_csv(broken_cells(), out)
    assert out.read_text() == "old\n" and listing(tmp_path) == ["cells.csv"]


# ------------------------------------------------------------------ output checks

def test_check_output_writable_accepts_a_good_path_and_leaves_nothing(tmp_path):
    workbook.check_output_writable(tmp_path / "report.xlsx", (".xlsx",))
    (tmp_path / "report.xlsx").write_bytes(b"old")
    workbook.check_output_writable(tmp_path / "report.xlsx")
    assert listing(tmp_path) == ["report.xlsx"]


def test_check_output_writable_rejects_bad_paths(tmp_path):
    cases = [
        (tmp_path / "missing" / "report.xlsx", "does not exist"),
        (tmp_path, "is a folder"),
        (tmp_path / "report.txt", ".xlsx"),
    ]
    for path, words in cases:
        with pytest.raises(workbook.OutputError, match=re.escape(words)) as exc:
            workbook.check_output_writable(path, (".xlsx",))
        assert str(exc.value).endswith(".") and "\n" not in str(exc.value)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(workbook.OutputError, match="not a folder"):
        workbook.check_output_writable(afile / "report.xlsx")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_check_output_writable_rejects_read_only_folder_and_file(tmp_path):
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    ro_dir.chmod(0o555)
    try:
        with pytest.raises(workbook.OutputError, match="cannot write in the folder"):
            workbook.check_output_writable(ro_dir / "report.xlsx")
    finally:
        ro_dir.chmod(0o755)
    ro_file = tmp_path / "locked.xlsx"
    ro_file.write_bytes(b"x")
    ro_file.chmod(0o444)
    with pytest.raises(workbook.OutputError, match="cannot be replaced"):
        workbook.check_output_writable(ro_file)


def test_check_output_writable_reports_locked_file_and_unwritable_folder(tmp_path, monkeypatch):
    """Simulated, so it also runs as root: Excel's lock on Windows surfaces as PermissionError."""
    target = tmp_path / "report.xlsx"
    target.write_bytes(b"old")

    def locked(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(workbook, "open", locked, raising=False)
    with pytest.raises(workbook.OutputError, match="close it if it is open in Excel"):
        workbook.check_output_writable(target)
    monkeypatch.undo()

    def no_create(out):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(workbook, "_reserve_temp", no_create)
    with pytest.raises(workbook.OutputError, match="cannot write in the folder .*Permission denied"):
        workbook.check_output_writable(target)
    with pytest.raises(workbook.OutputError, match="Permission denied"):
        write(make_run(extra_patients=[]), DEFAULT_SETTINGS, target)
    assert target.read_bytes() == b"old"


# ------------------------------------------------------------------ CSV

def test_cells_csv_columns_values_and_formula_protection(tmp_path):
    run = make_run()
    out = tmp_path / "cells.csv"
    workbook.write_cells_csv(run.cells, out)
    raw = out.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")  # plain UTF-8 for software
    with open(out, newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == list(workbook.CSV_COLUMNS)
    assert len(got) == len(run.cells)
    for row, c in zip(got, run.cells):
        assert row["class"] == c.class_id and float(row["confidence"]) == pytest.approx(c.confidence, abs=1e-4)
        assert row["review"] == ("yes" if c.review else "no")
        for field, original in (("patient", c.patient), ("file", c.file)):
            value = row[field]
            assert not value.startswith(("=", "+", "-", "@"))
            restored = value[1:] if value.startswith("'") else value  # the documented reversal
            assert restored == original


def test_csv_text_is_reversible_for_apostrophes():
    for original in ["'quoted", "''", "=x", "plain", "'=x", ""]:
        protected = workbook.csv_text(original)
        assert (protected[1:] if protected.startswith("'") else protected) == original


# ------------------------------------------------------------------ memory with a big night

BIG_SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from memprobe import peak_kib, reset_peak
reset_peak()  # ru_maxrss would start at the (big) pytest parent's RSS
import test_report as t
from batchwbc.outputs import workbook
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.records import CellResult
n = int(sys.argv[3])
thumb = t.png()
cells = [CellResult(f"patient{i % 500:03d}", f"patient{i % 500:03d}/crop_{i:06d}.jpg", "lymphocyte" if i % 7 else "myeloblast",
                    0.9 if i % 20 else 0.3, "monocyte", 0.05, i % 20 == 0, thumb if i % 20 == 0 else None) for i in range(n)]
run = t.make_run(extra_patients=[])
run.cells = cells
run.patients = sorted({c.patient for c in cells})
t0 = time.time()
t.write(run, DEFAULT_SETTINGS, sys.argv[1])
print(time.time() - t0, peak_kib())
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="uses the resource module")
def test_big_run_memory_stays_modest(tmp_path):
    n = 50_000
    out = tmp_path / "big.xlsx"
    res = subprocess.run([sys.executable, "-c", BIG_SCRIPT, str(out), str(Path(__file__).parent), str(n)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    seconds, max_rss_kib = res.stdout.split()
    print(f"50,000 cells: workbook written in {float(seconds):.1f} s, peak RSS {int(max_rss_kib) / 1024:.0f} MB")
    assert int(max_rss_kib) / 1024 < 300, f"peak RSS {int(max_rss_kib) / 1024:.0f} MB"
    wb = load_workbook(out, read_only=True)
    assert sum(1 for _ in wb["Cells"].iter_rows(values_only=True)) == n + 1
    with zipfile.ZipFile(out) as z:  # 2,500 review cells, capped at 2,000 embedded thumbnails
        assert len([x for x in z.namelist() if x.startswith("xl/media/")]) == DEFAULT_SETTINGS.review_max_images


SIGINT_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[2])
import test_report as t
from batchwbc.outputs import workbook
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.records import CellResult
run = t.make_run(extra_patients=[])
run.cells = [CellResult(f"p{i % 50}", f"p{i % 50}/c{i}.jpg", "lymphocyte", 0.9, "monocyte", 0.05, False)
             for i in range(int(sys.argv[3]))]
print("writing", flush=True)
try:
    t.write(run, DEFAULT_SETTINGS, sys.argv[1])
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_real_sigint_while_writing_keeps_old_report(tmp_path):
    import signal
    import time

    out = tmp_path / "report.xlsx"
    out.write_bytes(b"previous report")
    proc = subprocess.Popen([sys.executable, "-c", SIGINT_SCRIPT, str(out), str(Path(__file__).parent), "200000"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    if "finished" in rest:
        pytest.skip("the write finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in rest
    assert out.read_bytes() == b"previous report"
    assert listing(tmp_path) == ["report.xlsx"]


def test_summary_csv_is_the_summary_sheet(written, tmp_path):
    """--summary-csv writes the Summary sheet's own columns and values, one line per patient."""
    import csv as csvmod

    from batchwbc.outputs.workbook import write_summary_csv
    from batchwbc.core.summary import summarize_run

    run, _, wb = written
    out = tmp_path / "summary.csv"
    write_summary_csv(summarize_run(run, DEFAULT_SETTINGS), out, run.model.classes)
    raw = out.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf")
    lines = raw.decode("utf-8").splitlines()
    assert lines[0].startswith("Patient,")  # the header line first: the sheet's banner is not data
    assert workbook.BANNER not in raw.decode("utf-8")
    assert len(lines) == 1 + len(run.patients)  # multi-line Flags are flattened: one line per patient
    got = list(csvmod.DictReader(out.open(encoding="utf-8", newline="")))
    sheet = as_dicts(wb["Summary"])
    machine = [h for h in sheet[0] if h not in ("Verified by", "Verified on", "Every class", workbook.CHECK_HEADER)]
    assert list(got[0]) == machine  # the sheet's machine columns, in the same order
    for g, s in zip(got, sheet):
        patient = g["Patient"][1:] if g["Patient"].startswith("'") else g["Patient"]
        assert patient == s["Patient"]
        assert g["Flag codes"] == (s["Flag codes"] or "")
        assert g["Flags"] == s["Flags"].replace("\n", " | ")
        for col in ("Cells classified", "WBC", "Review cells", "Platelets"):
            assert int(g[col]) == s[col]
        assert (g["Blasts % all cells"] == "") is (s["Blasts % all cells"] is None)
        if s["Blasts % all cells"] is not None:
            assert float(g["Blasts % all cells"]) == pytest.approx(s["Blasts % all cells"])
    p1 = next(g for g in got if g["Patient"] == "P1")
    assert p1["Flag codes"].split("; ") == ["BLASTS_HIGH", "NRBC_PRESENT"]
    assert any(g["Patient"].startswith("'=") for g in got)  # formula-like names guarded, as in the cells CSV


def test_summary_csv_is_written_atomically(written, tmp_path, monkeypatch):
    from batchwbc.outputs import workbook as rep
    from batchwbc.core.summary import summarize_run

    run, _, _ = written
    out = tmp_path / "summary.csv"
    out.write_text("previous", encoding="utf-8")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rep, "_csv_value", boom)
    with pytest.raises(rep.OutputError, match="disk full"):
        rep.write_summary_csv(summarize_run(run, DEFAULT_SETTINGS), out)
    assert out.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_pending_review_flag_has_its_own_light_colour(tmp_path):
    """A row whose only flag is pending review (one erythroblast in review) is light blue, not amber."""
    cells = [mk("P", "lymphocyte", i) for i in range(100)] + [mk("P", "erythroblast", 0, conf=0.4)]
    run = make_run(extra_patients=())
    run.cells, run.patients, run.errors = cells, ["P"], []
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    ws = load_workbook(out)["Summary"]
    row = as_dicts(ws)[0]
    assert row["Flag codes"] == "NRBC_PENDING_REVIEW"
    assert "1 possible erythroblast, pending review" in row["Flags"]
    assert ws.cell(row=workbook.HEADER_ROWS["Summary"] + 1, column=1).fill.fgColor.rgb.endswith("DDEBF7")


def test_possible_critical_flag_is_first_and_coloured_as_urgent(tmp_path):
    """Issue 19: "Blasts: possibly 33.7 % ... pending review" was line 7 of 7 in light blue; a
    possible critical finding comes first and is orange-red and bold, LOW_WBC comes last."""
    cells = ([mk("P", "lymphocyte", i) for i in range(50)] + [mk("P", "myeloblast", i) for i in range(5)]
             + [mk("P", "myeloblast", 100 + i, conf=0.4) for i in range(15)])
    run = make_run(extra_patients=())
    run.cells, run.patients, run.errors = cells, ["P"], []
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    ws = load_workbook(out)["Summary"]
    row = as_dicts(ws)[0]
    codes = row["Flag codes"].split(workbook.FLAG_CODE_SEPARATOR)
    assert codes[0] == "BLASTS_HIGH_PENDING_REVIEW" and codes[-1] == "LOW_WBC"
    assert row["Flags"].splitlines()[0].startswith("Blasts: possibly")
    first = ws.cell(row=workbook.HEADER_ROWS["Summary"] + 1, column=1)
    assert first.fill.fgColor.rgb.endswith(workbook._FILLS["possible_critical"]) and first.font.b


def test_one_number_per_question_in_the_summary(tmp_path):
    """Issue 19: a row showed Blasts 17.6 % (all cells) beside a flag "4 confident blasts (4.7 %
    of 85 WBC)", and "Cells classified" counted unclassified crops. Two headed columns now, and
    Cells classified + Unclassified = crops read."""
    from batchwbc.engine.ood import UNCLASSIFIED

    cells = ([mk("P", "lymphocyte", i) for i in range(70)] + [mk("P", "myeloblast", i) for i in range(4)]
             + [mk("P", "myeloblast", 100 + i, conf=0.4) for i in range(11)]
             + [CellResult("P", f"P/u{i}.jpg", UNCLASSIFIED, 0.5, "lymphocyte", 0.5, True) for i in range(5)])
    run = make_run(extra_patients=())
    run.cells, run.patients, run.errors = cells, ["P"], []
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    row = as_dicts(load_workbook(out)["Summary"])[0]
    assert row["Blasts % all cells"] == pytest.approx(100 * 15 / 85, abs=1e-3)
    assert row["Blasts % confident cells"] == pytest.approx(100 * 4 / 85, abs=1e-3)
    assert "4 confident blasts (4.7% of 85 WBC)" in row["Flags"]
    assert (row["Cells classified"], row["Unclassified"], row["WBC"]) == (85, 5, 85)
    assert "Blasts %" not in row  # no header that leaves the reader to guess which figure it is
