"""The workbook reads and prints: layout units (row heights, print setup, banner) and, where
LibreOffice is installed, a real PDF rendering of a small run whose page count must stay small.

.ci/run installs libreoffice-calc-nogui and poppler-utils; elsewhere the rendering test is
skipped with the reason.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from openpyxl import load_workbook
from openpyxl.utils import get_column_letter

import tinymodel
from batchwbc.core import catalogue
from batchwbc.ops import exit_codes
from batchwbc.outputs import workbook
from batchwbc.outputs.workbook import BANNER, LINE_PT, THUMBNAIL_PT, page_breaks, row_height, text_lines
from test_fuzz_cli import run_cli
from batchwbc.core.config import DEFAULT_SETTINGS
from test_report import make_run, mk, write

#: The Done-when of issue 13: four patients must not print as dozens of pages. Issue 19 added
#: pages for legibility: the Summary in two column blocks at >= 8 pt, each patient's Review list
#: on a page of its own (9 pages before, 14 after).
MAX_PAGES_4_PATIENTS = 16


# ------------------------------------------------------------------ row heights

def test_text_lines_counts_wrapped_and_explicit_lines():
    assert text_lines("short", 20) == 1
    assert text_lines("x" * 21, 20) == 1 and text_lines("x" * 22, 20) == 2  # 19 units x 1.15 characters
    assert text_lines("a\nb\nc", 40) == 3
    assert text_lines("y" * 100 + "\nz", 11) == 11  # 100 chars at 11 per line = 10 lines, then one more
    assert text_lines("b" * 20, 20, bold=True) == 2  # bold is wider


def test_row_height_is_set_only_when_text_needs_more_than_one_line():
    assert row_height([("one line", 30), (None, 10), ("", 5)]) is None
    flags = "Blasts 41.1% (60/146 WBC, 95% CI 33.0-49.5%) >= 20%\nNRBC present: 4 erythroblasts >= 1"
    assert row_height([(flags, 36), ("P1", 12)]) == 3 * LINE_PT  # the tallest cell decides
    assert row_height([("x", 10)], minimum=THUMBNAIL_PT) == THUMBNAIL_PT


def test_page_breaks_keep_each_block_on_one_page():
    keys = ["A"] * 3 + ["B"] * 3 + ["C"] * 3 + ["D"]
    assert page_breaks(keys, [10.0] * 10, 65) == [6]  # A+B fill 60 pt, C would not fit: new page
    assert page_breaks(keys, [10.0] * 10, 100) == []  # everything fits on one page
    assert page_breaks(["A"] * 5 + ["B"], [10.0] * 6, 30) == [5]  # a block taller than a page runs on
    assert page_breaks([], [], 100) == []


def test_the_differential_breaks_pages_between_patients_only(tmp_path):
    run = make_run(extra_patients=[f"X{i}" for i in range(4)])
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    ws = load_workbook(out)["Differential"]
    breaks = [b.id for b in ws.row_breaks.brk]
    assert breaks  # 8 patients x 13 classes do not fit on one page
    for row in breaks:  # the last row of a page and the first of the next belong to different patients
        assert ws.cell(row, 1).value != ws.cell(row + 1, 1).value


# ------------------------------------------------------------------ the workbook's layout

@pytest.fixture(scope="module")
def book(tmp_path_factory):
    run = make_run(extra_patients=[])
    run.cells += [mk("P2", "smudge", i) for i in range(25)]  # 125 cells: 20% smudge, WBC unchanged
    out = tmp_path_factory.mktemp("print") / "report.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    return run, load_workbook(out)


def test_every_sheet_prints_landscape_one_page_wide_with_repeated_headers(book):
    _, wb = book
    for ws in (wb[name] for name in workbook.SHEETS):  # not the hidden run record: never printed
        header = workbook.HEADER_ROWS[ws.title]
        assert ws.page_setup.orientation == "landscape", ws.title
        if ws.title != "Summary":  # the Summary prints in column blocks (below)
            assert ws.sheet_properties.pageSetUpPr.fitToPage, ws.title
            assert (int(ws.page_setup.fitToWidth), int(ws.page_setup.fitToHeight)) == (1, 0), ws.title
        assert ws.print_title_rows == f"$1:${header}", ws.title  # the header rows repeat on every page
        assert "&P" in ws.oddFooter.right.text and "&N" in ws.oddFooter.right.text
        assert ws.title in ws.oddHeader.center.text
        assert ws.page_margins.left < 0.7 and ws.print_options.gridLines
        # Headers wrap instead of being cut ("Cells classi"), in bold on grey.
        first = ws.cell(header, 1)
        assert first.alignment.wrap_text and first.font.bold


def test_summary_banner_sits_above_a_usable_header_row(book):
    _, wb = book
    ws = wb["Summary"]
    assert ws["B1"].value == BANNER == "Pre-classification by software: to be verified by a qualified person"
    # across the printed columns: the last column is the hidden Check (batchwbc.outputs.row_checks), never printed
    assert ws.cell(2, ws.max_column).value == workbook.CHECK_HEADER
    assert ws.column_dimensions[ws.cell(2, ws.max_column).column_letter].hidden
    # one merged banner per printed column block, together across every printed column but A:
    # column A is repeated on every block's pages, so its row 1 holds no text to print clipped there
    assert ws.print_title_cols.replace("$", "") == "A:A"
    starts = [1, *(b.id for b in ws.col_breaks.brk)]
    ends = [*starts[1:], ws.max_column - 1]
    assert {str(r) for r in ws.merged_cells.ranges if r.min_row == 1} == {
        f"{get_column_letter(a + 1)}1:{get_column_letter(b)}1" for a, b in zip(starts, ends)}
    assert all(ws.cell(1, a + 1).value == BANNER for a in starts)
    assert not ws["A1"].value and ws["A1"].fill.fgColor.rgb == ws["B1"].fill.fgColor.rgb
    assert ws["A2"].value == "Patient" and ws.freeze_panes == "A3"
    assert ws.auto_filter.ref.startswith("A2:")


def test_summary_rows_are_as_tall_as_their_flags(book):
    _, wb = book
    ws = wb["Summary"]
    rows = {ws.cell(r, 1).value: r for r in range(3, ws.max_row + 1)}
    p1_flags = ws.cell(rows["P1"], workbook.SUMMARY_COLUMNS.index("Flags") + 1).value
    assert p1_flags.count("\n") >= 1  # two flags, two lines at least
    assert ws.row_dimensions[rows["P1"]].height >= 2 * LINE_PT
    header_height = ws.row_dimensions[2].height
    assert header_height and header_height >= 2 * LINE_PT  # "Cells classified" wraps to two lines


def test_summary_shows_every_class_percentage_smudge_and_a_link_to_the_differential(book):
    run, wb = book
    ws = wb["Summary"]
    header = [c.value for c in ws[2]]
    for col in ("Seg %", "Lymph %", "Mono %", "Eos %", "Baso %", "Blasts % all cells", "IG % all cells", "Band % all cells",
                "Smudge cells", "Smudge % of all cells", "Every class"):
        assert col in header
    p2 = next(r for r in ws.iter_rows(min_row=3) if r[0].value == "P2")
    cell = dict(zip(header, p2))
    assert cell["Smudge cells"].value == 25
    assert cell["Smudge % of all cells"].value == pytest.approx(100 * 25 / 125, abs=1e-3)  # of ALL cells
    assert cell["WBC"].value == 100 and cell["Lymph %"].value == pytest.approx(30.0)  # not in WBC
    link = cell["Every class"].hyperlink
    assert link is not None and link.location.startswith("'Differential'!A")
    target_row = int(link.location.rsplit("A", 1)[1])
    assert wb["Differential"].cell(target_row, 1).value == "P2"


def test_differential_reports_smudge_as_a_share_of_all_cells(book):
    _, wb = book
    ws = wb["Differential"]
    header = [c.value for c in ws[1]]
    smudge = next(dict(zip(header, (c.value for c in r))) for r in ws.iter_rows(min_row=2)
                  if r[0].value == "P2" and r[header.index("Class id")].value == "smudge")
    assert smudge["Count"] == 25 and smudge["% of WBC"] is None
    assert smudge["% of all cells"] == pytest.approx(20.0)
    assert smudge["Class"] == catalogue.get("smudge").display


# ------------------------------------------------------------------ the Summary in column blocks

def test_column_blocks_fill_pages_and_keep_pairs_together():
    # pages of 50 units, the first column (10) repeated on each: columns 0-2, then 0 and 3
    assert workbook.column_blocks([10, 20, 20, 20], 50) == [3]
    assert workbook.column_blocks([10, 20, 20, 20], 80) == []  # all on one page
    assert workbook.column_blocks([10, 20, 20, 20], 50, [False, False, False, True]) == [2]  # 2 and 3 together
    assert workbook.column_blocks([10, 20, 20, 20], 50, [False, False, True, False]) == [3]  # 1 and 2 together
    assert workbook.column_blocks([10, 50], 50) is None  # a column wider than a page beside the first one
    assert workbook.column_blocks([], 50) == []


def test_block_layout_splits_only_what_does_not_fit_a_readable_page():
    assert workbook.block_layout([10] * 10) is None  # fits one page: fitted to the page width as before
    widths = [25] + [9] * 40  # 385 units, like a verified Summary
    layout = workbook.block_layout(widths)
    assert layout.scale == workbook.BLOCK_PRINT_SCALE and 11 * layout.scale / 100 >= 8
    page_units = workbook.PAGE_WIDTH_PT / (workbook.UNIT_PT * layout.scale / 100)
    assert len(layout.starts) + 1 == math.ceil((sum(widths) - 25) / (page_units - 25)) == 3  # blocks


def _summary_prints_readable(ws, pairs: tuple[tuple[str, str], ...]) -> None:
    """Issue 19: the Summary printed fitted to one page width, at 3 to 5.7 pt. In column blocks
    at a fixed scale of at least 75 %, its 11 pt cells print at >= 8 pt on landscape A4 or Letter."""
    assert not ws.sheet_properties.pageSetUpPr.fitToPage  # Excel ignores manual breaks when fitting
    scale = int(ws.page_setup.scale)
    assert 11 * scale / 100 >= 8.0 and scale >= workbook.BLOCK_PRINT_SCALE
    assert ws.print_title_cols == "$A:$A" and ws.cell(2, 1).value == "Patient"  # the Patient on every block
    assert ws.page_setup.pageOrder == "overThenDown"  # a patient's blocks on consecutive pages
    header = [c.value for c in ws[2]][:-1]  # the hidden Check column is not printed
    widths = [ws.column_dimensions[ws.cell(2, i + 1).column_letter].width for i in range(len(header))]
    starts = [0, *(b.id for b in ws.col_breaks.brk)]
    assert len(starts) >= 2  # too wide for one readable page: split
    page_units = workbook.PAGE_WIDTH_PT / (workbook.UNIT_PT * scale / 100)
    for a, b in zip(starts, [*starts[1:], len(header)]):
        block = sum(widths[a:b]) + (widths[0] if a else 0)  # with the repeated Patient column
        assert block <= page_units, (a, b)
    for first, second in pairs:  # read together, printed together
        i = header.index(second)
        assert header[i - 1] == first and i not in starts, second


def test_the_summary_prints_in_readable_column_blocks(book):
    _, wb = book
    _summary_prints_readable(wb["Summary"], (("Verified by", "Verified on"), ("Blasts % all cells", "Blasts % confident cells")))


def test_the_verified_summary_prints_in_readable_column_blocks(tmp_path):
    run = make_run(extra_patients=[])
    report = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, report)
    out = tmp_path / "v.xlsx"
    r = run_cli(["verify", report, "--out", out, "--quiet"])
    assert r.exit_code == exit_codes.OK, r.output
    _summary_prints_readable(load_workbook(out)["Summary"], (("Blasts % pre-classified", "Blasts % verified"),
                                                             ("Verified by", "Verified on")))


def test_each_patient_starts_a_new_review_page(tmp_path):
    """Issue 19: the Review sheet of 24 patients took 128 pages with the patients running into
    each other; a break before every patient's first row lets one patient's list be printed."""
    assert workbook.patient_starts(["a", "a", "b", "c", "c"]) == [2, 3]
    assert workbook.patient_starts([]) == [] and workbook.patient_starts(["a"]) == []
    run = make_run(extra_patients=["X1", "X2"])
    out = tmp_path / "r.xlsx"
    write(run, DEFAULT_SETTINGS, out)
    ws = load_workbook(out)["Review"]
    patients = [ws.cell(r, 2).value for r in range(2, ws.max_row + 1)]
    firsts = [2 + i for i in range(1, len(patients)) if patients[i] != patients[i - 1]]
    assert len(firsts) == len(set(patients)) - 1 >= 2
    assert sorted(b.id + 1 for b in ws.row_breaks.brk) == firsts  # a break right above each patient's first row


def test_review_rows_are_as_tall_as_their_thumbnails(book):
    run, wb = book
    ws = wb["Review"]
    anchored = {img.anchor._from.row + 1 for img in ws._images}
    assert anchored and all(ws.row_dimensions[r].height >= THUMBNAIL_PT for r in anchored)
    assert "shared fairly" in ws.oddFooter.center.text


def test_review_thumbnails_are_shared_fairly_across_patients(tmp_path):
    """Filled in patient order, a cap of 4 gave P1 everything and P2 nothing; now each gets 2."""
    run = make_run(extra_patients=[])
    run.cells += [mk("P2", "monocyte", 200 + i, conf=0.3 + i / 100) for i in range(4)]
    out = tmp_path / "fair.xlsx"
    write(run, report_settings(4), out)
    wb = load_workbook(out)
    ws = wb["Review"]
    shown = {ws.cell(img.anchor._from.row + 1, 2).value for img in ws._images}
    per_patient = [ws.cell(img.anchor._from.row + 1, 2).value for img in ws._images]
    assert shown == {"P1", "P2"} and sorted(per_patient) == ["P1", "P1", "P2", "P2"]
    # Within P2 the least confident come first and get the thumbnails.
    p2_rows = [r for r in range(2, ws.max_row + 1) if ws.cell(r, 2).value == "P2"]
    confidences = [ws.cell(r, 5).value for r in p2_rows]
    assert confidences == sorted(confidences)
    assert ws.cell(p2_rows[0], 1).value is None and "shared fairly" in ws.cell(p2_rows[-1], 1).value
    run_items = {r[0]: r[1] for r in wb["Run"].iter_rows(min_row=2, values_only=True)}
    embedded = next(v for k, v in run_items.items() if k.startswith("Review thumbnails embedded"))
    assert embedded == 4 and "at most 4" in next(k for k in run_items if k.startswith("Review thumbnails embedded"))


def report_settings(cap: int):
    from dataclasses import replace

    return replace(DEFAULT_SETTINGS, review_max_images=cap)


# ------------------------------------------------------------------ rendered by LibreOffice

def _soffice() -> str | None:
    return shutil.which("soffice") or shutil.which("libreoffice")


def _small_run(folder: Path, patients: int = 4, cells: int = 20) -> None:
    """4 patient folders of colour crops the tiny model classifies; every 7th is a blend, so it
    is unsure and goes to Review with a thumbnail."""
    classes = ["neutrophil_segmented", "lymphocyte", "monocyte", "eosinophil", "myeloblast", "smudge"]
    for p in range(patients):
        d = folder / f"patient_{p + 1}"
        d.mkdir(parents=True)
        for i in range(cells):
            rgb = np.array(tinymodel.colour_for(classes[(i + p) % len(classes)]), float)
            if i % 7 == 3:
                rgb = 0.5 * rgb + 0.5 * np.array(tinymodel.colour_for("basophil"), float)
            img = np.zeros((48, 48, 3), np.uint8)
            img[:] = rgb.astype(np.uint8)[::-1]
            cv2.imwrite(str(d / f"cell_{i:03d}.png"), img)


def _calibri_metrics() -> bool:
    """Whether LibreOffice lays text out with Calibri's widths (Calibri or its twin Carlito)."""
    if not shutil.which("fc-match"):
        return False
    found = subprocess.run(["fc-match", "Calibri"], capture_output=True, text=True, timeout=30).stdout
    return "Calibri" in found or "Carlito" in found


def _pages(pdf: Path) -> int:
    if shutil.which("pdfinfo"):
        out = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, timeout=60).stdout
        return int(re.search(r"^Pages:\s+(\d+)", out, re.M).group(1))
    return len(re.findall(rb"/Type\s*/Page(?!s)", pdf.read_bytes()))


@pytest.mark.skipif(_soffice() is None, reason="LibreOffice (soffice) is not installed; .ci/run installs "
                                                "libreoffice-calc-nogui to render the workbook to PDF")
def test_a_small_run_prints_on_few_pages(tmp_path):
    model = tinymodel.build(tmp_path / "tiny.onnx")
    _small_run(tmp_path / "slides")
    out = tmp_path / "report.xlsx"
    r = run_cli(["run", tmp_path / "slides", "--out", out, "--model", model, "--workers", "0", "--quiet"])
    assert r.exit_code == exit_codes.OK, r.output
    review = [c.value for c in load_workbook(out)["Review"]["B"][1:]]
    assert len(review) >= 8  # the run does exercise the thumbnail rows
    profile = (tmp_path / "lo-profile").as_uri()  # its own profile: parallel conversions do not collide
    subprocess.run([_soffice(), f"-env:UserInstallation={profile}", "--headless", "--convert-to", "pdf",
                    "--outdir", str(tmp_path), str(out)], capture_output=True, timeout=240, check=True)
    pdf = tmp_path / "report.pdf"
    assert pdf.is_file(), "LibreOffice wrote no PDF"
    pages = _pages(pdf)
    print(f"{pages} pages")
    assert 6 <= pages <= MAX_PAGES_4_PATIENTS, f"{pages} pages"  # at least one page per sheet
    if shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True,
                              timeout=60).stdout
        assert "Pre-classification by software" in text
        assert f"Page 1 of {pages}" in text and f"Page {pages} of {pages}" in text
        _check_summary_and_review_pages(text.split("\f"), load_workbook(out))


def _check_summary_and_review_pages(pages: list[str], wb) -> None:
    """As printed: the Summary in exactly its column blocks (a block too wide for the paper
    would spill a column onto a page of its own), the Patient column on each; every Review page
    holds one patient, each patient's list starting on a new page."""
    def sheet(page: str) -> str:
        return page.split("\n", 1)[0].split()[1]  # the page header: file name, sheet name, ...

    summary = [p for p in pages if p.strip() and sheet(p) == "Summary"]
    blocks = len(wb["Summary"].col_breaks.brk) + 1
    assert blocks >= 2 and all("Patient" in p and "patient_4" in p for p in summary)
    if _calibri_metrics():  # another font makes LibreOffice's columns wider than Excel's: no exact count
        assert len(summary) == blocks, f"{len(summary)} Summary pages for {blocks} column blocks"
    else:
        print("Summary pages not compared with its column blocks: no Calibri or Carlito (fonts-crosextra-carlito)")
    review = [p for p in pages if p.strip() and sheet(p) == "Review"]
    on_page = [set(re.findall(r"patient_\d+", p.split("Verified class", 1)[1])) for p in review]
    assert all(len(names) == 1 for names in on_page), on_page
    assert len(review) == len({n for names in on_page for n in names}) == 4  # 2-3 review cells each: one page


def test_a_narrow_column_block_gets_the_short_banner_so_the_row_stays_low():
    """A 491-character warning sized for a two-column last block made the banner row 412 points
    tall (the first patient printed on page 2 of every block): a block where the whole text would
    take more than BANNER_MAX_LINES lines shows the first line and a pointer to the first block."""
    alert = "Results unreliable: " + "the cells of 3 of 8 patients are unlike the images the model was validated on " * 5
    text = f"{BANNER}\n{alert}"
    assert workbook.banner_for_width(text, 150) == text  # the first block: the whole warning
    short = workbook.banner_for_width(text, 27)
    assert short == f"{BANNER}\n{workbook.BANNER_SEE_FIRST}"
    assert workbook.text_lines(short, 27, bold=True) <= workbook.BANNER_MAX_LINES
    assert workbook.banner_for_width(BANNER, 5) == BANNER  # nothing to shorten: one line stays whole
