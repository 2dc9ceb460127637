"""The workbook reads and prints: layout units (row heights, print setup, banner) and, where
LibreOffice is installed, a real PDF rendering of a small run whose page count must stay small.

.ci/run installs libreoffice-calc-nogui and poppler-utils; elsewhere the rendering test is
skipped with the reason.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from openpyxl import load_workbook

import tinymodel
from batchwbc.core import catalogue
from batchwbc.ops import exit_codes
from batchwbc.outputs import workbook
from batchwbc.outputs.workbook import BANNER, LINE_PT, THUMBNAIL_PT, page_breaks, row_height, text_lines
from test_fuzz_cli import run_cli
from batchwbc.core.config import DEFAULT_SETTINGS
from test_report import make_run, mk, write

#: The Done-when of issue 13: four patients must not print as dozens of pages.
MAX_PAGES_4_PATIENTS = 12


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
    assert ws["A1"].value == BANNER == "Pre-classification by software: to be verified by a qualified person"
    # across the printed columns: the last column is the hidden Check (batchwbc.outputs.row_checks), never printed
    assert ws.cell(2, ws.max_column).value == workbook.CHECK_HEADER
    assert ws.column_dimensions[ws.cell(2, ws.max_column).column_letter].hidden
    assert any(str(r) == f"A1:{ws.cell(2, ws.max_column - 1).column_letter}1" for r in ws.merged_cells.ranges)
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
