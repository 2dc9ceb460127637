"""`batchwbc verify`: a person's corrections in the workbook become a verified differential,
signed patients and labelled data; bad edits stop it with one sentence each.

A real small run with the tiny colour model (tests/tinymodel.py): every crop is filled with a
class's colour, so the machine's answer is known; "ambiguous" crops are the mean of two class
colours, land below the review threshold, and are what a person verifies.
"""
from __future__ import annotations

import csv
import hashlib
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from openpyxl import Workbook, load_workbook

import tinymodel
from batchwbc.core import catalogue
from batchwbc.ops import exit_codes
from batchwbc.outputs import workbook
from batchwbc.cli import main
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.differential import summarize
from batchwbc.core.flags import BLASTS_HIGH, BLASTS_PRESENT, evaluate
from batchwbc.inputs.labelled_folders import LABELS_CSV, read_labelled
from batchwbc.core.records import CellResult
from batchwbc.outputs.row_checks import CHECK_HEADER
from batchwbc.core.verification import UNCLASSIFIED

# patient -> [(file, colour classes, what a person sees)]; two colour classes = an ambiguous crop,
# coloured just nearer the first (the machine's answer, below the 0.6 review threshold)
SLIDES = {
    "P1": [*[(f"ly{i}.png", ("lymphocyte",), "lymphocyte") for i in range(6)],
           ("bl0.png", ("myeloblast",), "myeloblast"),
           ("bl1.png", ("myeloblast",), "lymphocyte"),  # a confident machine error, corrected in Cells
           ("amb0.png", ("lymphocyte", "myelocyte"), "lymphocyte"),
           ("amb1.png", ("lymphocyte", "myelocyte"), "myelocyte")],
    "P2": [*[(f"ne{i}.png", ("neutrophil_segmented",), "neutrophil_segmented") for i in range(5)],
           ("sub/amb.png", ("neutrophil_segmented", "erythroblast"), "neutrophil_band")],
    "P3": [(f"eo{i}.png", ("eosinophil",), "eosinophil") for i in range(3)],
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [ln for ln in stderr.splitlines() if " ERROR " in ln]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dicts(ws) -> list[dict]:
    """Rows as {header: value} from the sheet's header row on (the Summary's row 1 is a banner)."""
    data = [tuple(c for c in r) for r in ws.iter_rows(min_row=workbook.HEADER_ROWS[ws.title], values_only=True)]
    return [dict(zip(data[0], r)) for r in data[1:]]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """slides, model and the report of one real run (shared, never modified by a test)."""
    base = tmp_path_factory.mktemp("verify")
    model = tinymodel.build(base / "tiny.onnx")
    slides = base / "slides"
    for patient, crops in SLIDES.items():
        for name, colours, _ in crops:
            weights = [1.0] if len(colours) == 1 else [0.505, 0.495]
            rgb = np.round(np.sum([w * np.array(tinymodel.colour_for(c)) for w, c in zip(weights, colours)], axis=0))
            path = slides / patient / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((40, 40, 3), rgb[::-1], np.uint8))
    out = base / "report.xlsx"
    r = invoke("run", slides, "--out", out, "--model", model, "--workers", "0")
    assert r.exit_code == exit_codes.OK, r.stderr
    return slides, model, out


def copy_report(made, tmp_path) -> Path:
    target = tmp_path / "report.xlsx"
    shutil.copyfile(made[2], target)
    return target


def set_cells(path: Path, sheet: str, edits: dict[tuple[str, str], dict[str, object]]) -> dict[tuple[str, str], int]:
    """Edit cells by (patient, file) and header, with openpyxl, as Excel would; returns their rows."""
    wb = load_workbook(path)
    ws = wb[sheet]
    h = workbook.HEADER_ROWS[sheet]
    header = [c.value for c in ws[h]]
    rows = {}
    for row in ws.iter_rows(min_row=h + 1):
        values = {h: c for h, c in zip(header, row)}
        key = (values["Patient"].value, values.get("File").value if "File" in values else None)
        if key in edits:
            rows[key] = row[0].row
            for h, v in edits[key].items():
                values[h].value = v
    wb.save(path)
    assert set(rows) == set(edits), f"not found: {set(edits) - set(rows)}"
    return rows


def review_as_person(path: Path) -> None:
    """The edits of the happy path: review cells, a correction, names."""
    set_cells(path, "Review", {("P1", "P1/amb0.png"): {"Verified class": "lymphocyte"},
                               ("P1", "P1/amb1.png"): {"Verified class": " Myelocyte "}})  # display name, spaces
    set_cells(path, "Cells", {("P1", "P1/bl1.png"): {"Verified class": "lymphocyte"}})
    set_cells(path, "Summary", {("P1", None): {"Verified by": "A. Tech"}, ("P2", None): {"Verified by": "A. Tech"},
                                ("P3", None): {"Verified by": "B. Tech"}})


def test_report_offers_a_verified_class_drop_down_and_hides_a_check_per_row(made):
    wb = load_workbook(made[2])
    for sheet in ("Cells", "Review"):
        ws = wb[sheet]
        h = workbook.HEADER_ROWS[sheet]
        header = [c.value for c in ws[h]]
        assert header[-1] == CHECK_HEADER and "Verified class" in header
        col = header.index("Verified class") + 1
        letter = ws.cell(h, col).column_letter
        assert ws.column_dimensions[ws.cell(h, len(header)).column_letter].hidden
        dvs = ws.data_validations.dataValidation
        # the drop-down starts on the first row below the header and covers every data row
        assert len(dvs) == 1 and dvs[0].type == "list" and str(dvs[0].sqref) == f"{letter}{h + 1}:{letter}{ws.max_row}"
        offered = dvs[0].formula1.strip('"').split(",")
        assert offered == [*catalogue.CLASS_IDS, UNCLASSIFIED]  # the tiny model's classes, then unclassified
        assert ws.cell(h, col).fill.fgColor.rgb.endswith(workbook.EDITABLE_FILL)
        assert ws.cell(h, 1).fill.fgColor.rgb.endswith(workbook.PROTECTED_FILL)
        assert ws.cell(h, col).comment is not None
        assert ws.column_dimensions[letter].fill.fgColor.rgb.endswith(workbook.EDITABLE_FILL)  # empty cells yellow too
    summary = wb["Summary"]
    h = workbook.HEADER_ROWS["Summary"]
    assert h == 2 and summary.cell(1, 2).value == workbook.BANNER  # the banner above the headers (A1: colour only)
    header = [c.value for c in summary[h]]
    assert {"Verified by", "Verified on"} <= set(header) and header[-1] == CHECK_HEADER
    assert summary.cell(h, header.index("Verified by") + 1).comment is not None
    # the banner spans the printed columns only, once per printed column block (test_print.py);
    # the hidden Check column is never printed
    banners = sorted((r.min_col, r.max_col) for r in summary.merged_cells.ranges if r.min_row == 1)
    assert banners[0][0] == 2 and banners[-1][1] == len(header) - 1  # column A repeats on every block's pages
    assert all(a[1] + 1 == b[0] for a, b in zip(banners, banners[1:]))


def test_a_workbook_without_the_summary_banner_still_verifies(made, tmp_path):
    """A report written before the banner (Summary headers in row 1) is still read."""
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    wb = load_workbook(rep)
    ws = wb["Summary"]
    ws.merged_cells.ranges.clear()
    for row in ws.iter_rows():
        for c in row:
            if c.hyperlink is not None:  # openpyxl's delete_rows leaves a link's ref behind; the text stays
                c.hyperlink = None
    ws.delete_rows(1)
    wb.save(rep)
    out = tmp_path / "verified.xlsx"
    r = invoke("verify", rep, "--out", out)
    assert r.exit_code == exit_codes.OK, r.stderr
    statuses = {row["Patient"]: row["Status"] for row in dicts(load_workbook(out)["Summary"])}
    assert statuses["P1"] == statuses["P3"] == "signed" and statuses["P2"].startswith("not signed")


def test_every_class_id_fits_excels_in_line_drop_down_limit():
    """Excel reads at most 255 characters of an in-line list; the whole catalogue fits."""
    ids = [*catalogue.CLASS_IDS, UNCLASSIFIED]
    assert len(",".join(ids)) <= workbook.DROPDOWN_LIMIT


def test_verify_recounts_signs_exports_and_round_trips(made, tmp_path):
    slides, model, _ = made
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    before = sha(rep)
    out, labelled = tmp_path / "verified.xlsx", tmp_path / "labelled"
    r = invoke("verify", rep, "--out", out, "--reviewer", "Dr. Lab", "--model", model,
               "--export-labelled", labelled)
    assert r.exit_code == exit_codes.OK, r.stderr
    assert sha(rep) == before  # the reviewed workbook is only read
    wb = load_workbook(out)

    # -- signed state: P2's review cell has no Verified class
    summary = {row["Patient"]: row for row in dicts(wb["Summary"])}
    assert summary["P1"]["Status"] == "signed" and summary["P3"]["Status"] == "signed"
    assert summary["P2"]["Status"] == "not signed: 1 of 1 review cell without a Verified class"
    assert summary["P1"]["Verified by"] == "A. Tech" and summary["P1"]["Verified on"]
    assert summary["P2"]["Verified on"] is None
    assert summary["P1"]["Corrected cells"] == 2  # bl1 -> lymphocyte, amb1 -> myelocyte (amb0 confirmed)

    # -- the verified differential equals an independent count of what the person decided
    truth = {p: [CellResult(p, f"{p}/{n}", seen, 1.0, "", 0.0, len(c) > 1) for n, c, seen in crops]
             for p, crops in SLIDES.items()}
    truth["P2"] = [CellResult("P2", c.file, "neutrophil_segmented" if "amb" in c.file else c.class_id, 1.0, "", 0.0,
                              c.review) for c in truth["P2"]]  # P2's blank review cell keeps the machine's class
    diff_rows = dicts(wb["Differential"])
    for patient, cells in truth.items():
        expected = summarize(cells)
        got = {row["Class id"]: row for row in diff_rows if row["Patient"] == patient}
        for cid, n in expected.counts.items():
            if cid in got:
                assert got[cid]["Verified count"] == n, (patient, cid)
        assert got["lymphocyte"]["Verified % of WBC"] == pytest.approx(round(expected.percent["lymphocyte"], 4))
    p1 = {row["Class id"]: row for row in diff_rows if row["Patient"] == "P1"}
    assert (p1["myeloblast"]["Pre-classified count"], p1["myeloblast"]["Verified count"], p1["myeloblast"]["Change"]) \
        == (2, 1, -1)
    # flags follow the verified classes: 2/10 blasts (20%) was BLASTS_HIGH, 1/10 is BLASTS_PRESENT
    assert summary["P1"]["Flags (pre-classified)"].startswith("Blasts 20.0% (2/10 WBC")
    assert BLASTS_HIGH not in summary["P1"]["Flag codes (verified)"]
    # every review cell of the signed P1 has a Verified class: a person's class is no longer in
    # review, so its flags are definite (issue 12: pending flags resolve on verification)
    p1_verified = [CellResult(c.patient, c.file, c.class_id, 1.0, "", 0.0, False) for c in truth["P1"]]
    codes = [f.code for f in evaluate(summarize(p1_verified), DEFAULT_SETTINGS)]
    assert BLASTS_PRESENT in codes and summary["P1"]["Flag codes (verified)"] == "; ".join(codes)
    assert "PENDING_REVIEW" not in summary["P1"]["Flag codes (verified)"]
    assert summary["P1"]["Blasts % pre-classified"] == 20.0 and summary["P1"]["Blasts % verified"] == 10.0

    # -- the Run sheet records who, when, from what
    run = {row[0]: row[1] for row in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["Verification: run by (--reviewer)"] == "Dr. Lab"
    assert run["Verification: patients signed"] == "2 of 3"
    assert run["Verification: verified at"]

    # -- the labelled export: signed patients' cells, P2 has no explicit cell
    got = read_labelled(labelled, catalogue.CLASS_IDS)
    assert not got.unknown_folders
    exported = sorted((it.patient, it.class_id, it.path.name) for it in got.items)
    expected_export = sorted((p, seen, n.replace("/", "__")) for p, crops in SLIDES.items() if p != "P2"
                             for n, _, seen in crops)
    assert exported == expected_export
    from batchwbc.inputs.public_datasets import read_generic  # python -m train's reader for a lab's own folders

    assert sorted((it.class_id, it.path.name) for it in read_generic(labelled).items) == \
        sorted((c, n) for _, c, n in expected_export)
    for it in got.items:  # the crop itself was copied
        assert it.path.read_bytes() == (slides / it.patient / it.path.name).read_bytes()
    with open(labelled / LABELS_CSV, newline="", encoding="utf-8") as fh:
        labels = list(csv.DictReader(fh))
    assert len(labels) == len(expected_export)
    bl1 = next(x for x in labels if x["original_file"] == "P1/bl1.png")
    assert (bl1["machine_class"], bl1["verified_class"], bl1["reviewer"], bl1["corrected"]) == \
        ("myeloblast", "lymphocyte", "A. Tech", "yes")
    assert float(bl1["confidence"]) > 0.9

    # -- idempotent: verifying the verified workbook gives the same sheets (but its own Run rows)
    again = tmp_path / "again.xlsx"
    r2 = invoke("verify", out, "--out", again)
    assert r2.exit_code == exit_codes.OK, r2.stderr
    wb2 = load_workbook(again)
    for sheet in ("Summary", "Differential", "Cells", "Review", "Errors"):
        assert [list(r)[:-1] for r in wb2[sheet].iter_rows(values_only=True)] == \
            [list(r)[:-1] for r in wb[sheet].iter_rows(values_only=True)], sheet
    assert len(wb2["Review"]._images) == len(wb["Review"]._images) == 3  # thumbnails carried over


def test_display_names_and_case_are_accepted_and_a_blank_workbook_is_all_unsigned(made, tmp_path):
    rep = copy_report(made, tmp_path)
    out = tmp_path / "v.xlsx"
    r = invoke("verify", rep, "--out", out, "--quiet")
    assert r.exit_code == exit_codes.OK, r.stderr
    summary = {row["Patient"]: row for row in dicts(load_workbook(out)["Summary"])}
    assert summary["P3"]["Status"] == "not signed: no name in Verified by"
    assert summary["P1"]["Status"].startswith("not signed: 2 of 2 review cells without a Verified class")


# ----------------------------------------------------------------------------- bad edits

def test_unknown_class_is_named_with_sheet_row_and_value(made, tmp_path):
    rep = copy_report(made, tmp_path)
    rows = set_cells(rep, "Cells", {("P1", "P1/ly0.png"): {"Verified class": "lymfocyte"}})
    before = sha(rep)
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    errors = error_lines(r.stderr)
    assert f"Cells sheet row {rows[('P1', 'P1/ly0.png')]}: Verified class 'lymfocyte' is not a class" in errors[0]
    assert "nothing was written" in errors[-1]
    assert not (tmp_path / "v.xlsx").exists() and sha(rep) == before


def test_edit_to_a_machine_column_is_named(made, tmp_path):
    rep = copy_report(made, tmp_path)
    rows = set_cells(rep, "Cells", {("P1", "P1/bl0.png"): {"Class": "lymphocyte"}})
    set_cells(rep, "Summary", {("P2", None): {"WBC": 99}})
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    errors = error_lines(r.stderr)
    assert any(f"Cells sheet row {rows[('P1', 'P1/bl0.png')]}: the machine's column Class was edited" in e
               for e in errors), errors
    assert any("Summary sheet row" in e and "column WBC was edited" in e for e in errors), errors
    assert not (tmp_path / "v.xlsx").exists()


def test_conflicting_verified_classes_and_deleted_rows(made, tmp_path):
    rep = copy_report(made, tmp_path)
    set_cells(rep, "Cells", {("P1", "P1/amb0.png"): {"Verified class": "myelocyte"}})
    set_cells(rep, "Review", {("P1", "P1/amb0.png"): {"Verified class": "lymphocyte"}})
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    assert "make them agree" in error_lines(r.stderr)[0]
    wb = load_workbook(rep)
    wb["Cells"].delete_rows(3)
    wb.save(rep)
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    assert any("rows were deleted" in e for e in error_lines(r.stderr))


def test_workbook_of_another_model_or_not_a_report_is_refused(made, tmp_path):
    rep = copy_report(made, tmp_path)
    other = tinymodel.build(tmp_path / "other.onnx", metadata={"batchwbc.model_version": "tiny-other"})
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx", "--model", other)
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    assert "was made by model tiny-test-1" in line and "not by --model other.onnx" in line

    plain = tmp_path / "plain.xlsx"
    wb = Workbook()
    wb.active.append(["Patient", "Verified by"])
    wb.save(plain)
    r = invoke("verify", plain, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    assert "has no Run sheet, so it is not a batchwbc report" in line

    r = invoke("verify", rep, "--out", rep)
    assert r.exit_code == exit_codes.USAGE and "--out must differ" in error_lines(r.stderr)[0]


def test_missing_crop_is_reported_and_skipped_the_rest_exported(made, tmp_path):
    slides, _, _ = made
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    moved = tmp_path / "slides-now"
    shutil.copytree(slides, moved)
    (moved / "P3" / "eo1.png").unlink()
    out, labelled = tmp_path / "v.xlsx", tmp_path / "labelled"
    r = invoke("verify", rep, "--out", out, "--export-labelled", labelled, "--slides", moved)
    assert r.exit_code == exit_codes.PARTIAL, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and "the crop P3/eo1.png of patient P3 is not in" in warnings[0]
    got = read_labelled(labelled, catalogue.CLASS_IDS)
    assert len(got.items) == 10 + 3 - 1 and out.is_file()

    r = invoke("verify", rep, "--out", tmp_path / "v2.xlsx", "--export-labelled", labelled)
    assert r.exit_code == exit_codes.USAGE and "is not empty" in error_lines(r.stderr)[0]
    assert not (tmp_path / "v2.xlsx").exists()


# ----------------------------------------------------------------------------- LibreOffice

SOFFICE = shutil.which("soffice") or shutil.which("libreoffice")


def libreoffice_convert(src: Path, fmt: str, outdir: Path, profile: Path) -> Path:
    """Open `src` in headless LibreOffice Calc and save it as `fmt` (its own profile: no clash
    with another LibreOffice running on the machine)."""
    r = subprocess.run([SOFFICE, f"-env:UserInstallation={profile.as_uri()}", "--headless", "--norestore",
                        "--convert-to", fmt, "--outdir", str(outdir), str(src)],
                       capture_output=True, text=True, timeout=300)
    out = outdir / (src.stem + "." + fmt.split(":")[0])
    assert r.returncode == 0 and out.is_file(), r.stdout + r.stderr
    return out


@pytest.mark.skipif(SOFFICE is None, reason="LibreOffice (soffice) is not installed; .ci/run installs libreoffice-calc-nogui")
def test_libreoffice_offers_the_drop_down_and_a_workbook_it_saved_verifies(made, tmp_path):
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    profile = tmp_path / "lo-profile"
    # 1. LibreOffice reads the drop-down as a list of the class ids on exactly the Verified class cells
    ods = libreoffice_convert(rep, "ods", tmp_path / "ods", profile)
    content = zipfile.ZipFile(ods).read("content.xml").decode("utf-8")
    lists = re.findall(r'table:condition="of:cell-content-is-in-list\(([^)]*)\)"', content)
    assert lists and all(x.replace("&quot;", "").split(";") == [*catalogue.CLASS_IDS, UNCLASSIFIED]
                         for x in lists), lists
    names = re.findall(r'<table:content-validation table:name="(\w+)"', content)
    assert len(names) == len(lists)  # every validation LibreOffice sees is such a list
    per_sheet = {m.group(1): m.start() for m in re.finditer(r'<table:table table:name="([^"]+)"', content)}
    starts = sorted(per_sheet.items(), key=lambda kv: kv[1]) + [("", len(content))]
    uses = {sheet: len(re.findall(r'table:content-validation-name="', content[a:b]))
            for (sheet, a), (_, b) in zip(starts, starts[1:])}
    n_cells = sum(len(c) for c in SLIDES.values())
    n_review = sum(len(colours) > 1 for crops in SLIDES.values() for _, colours, _ in crops)
    assert uses == {"Summary": 0, "Differential": 0, "Cells": n_cells, "Review": n_review, "Errors": 0, "Run": 0,
                    "_record": 0}
    # 2. saved again as .xlsx by LibreOffice, the workbook still verifies, to the same result,
    # from its run record (kept hidden), not from the Run sheet's labels
    resaved = libreoffice_convert(rep, "xlsx:Calc MS Excel 2007 XML", tmp_path / "lo", profile)
    assert _record(resaved) == _record(rep) and load_workbook(resaved)["_record"].sheet_state == "hidden"
    direct, via_lo = tmp_path / "direct.xlsx", tmp_path / "via-lo.xlsx"
    assert invoke("verify", rep, "--out", direct).exit_code == exit_codes.OK
    r = invoke("verify", resaved, "--out", via_lo)
    assert r.exit_code == exit_codes.OK, r.stderr
    for sheet in ("Differential", "Cells"):
        assert [list(x)[:-1] for x in load_workbook(via_lo)[sheet].iter_rows(values_only=True)] == \
            [list(x)[:-1] for x in load_workbook(direct)[sheet].iter_rows(values_only=True)], sheet
    statuses = {row["Patient"]: row["Status"] for row in dicts(load_workbook(via_lo)["Summary"])}
    assert statuses["P1"] == statuses["P3"] == "signed" and statuses["P2"].startswith("not signed")


# ----------------------------------------------------------------------------- the parts

def test_a_re_sorted_review_sheet_loses_its_thumbnails_rather_than_mismatching_them(made, tmp_path):
    rep = copy_report(made, tmp_path)
    wb = load_workbook(rep)
    ws = wb["Review"]
    h = workbook.HEADER_ROWS["Review"]
    first, second = ([c.value for c in ws[n]] for n in (h + 1, h + 2))  # what sorting two rows does
    for col, (a, b) in enumerate(zip(first, second), 1):
        ws.cell(h + 1, col).value, ws.cell(h + 2, col).value = b, a
    wb.save(rep)
    out = tmp_path / "v.xlsx"
    r = invoke("verify", rep, "--out", out)
    assert r.exit_code == exit_codes.OK, r.stderr
    assert "re-sorted" in r.stderr and len(load_workbook(out)["Review"]._images) == 0


def test_row_checks_agree_across_the_ways_a_spreadsheet_stores_values():
    from batchwbc.outputs.row_checks import edited, row_check, written_row

    check = row_check(["P1", 3, 0.8333, None, "a\nb"], 7)
    assert written_row(check) == 7
    assert edited(list("abcde"), ["P1", 3.0, 0.83330000000000004, "", "a\r\nb"], check) == []
    assert edited(list("abcde"), ["P1", 4, 0.8333, None, "a\nb"], check) == ["b"]
    assert edited(list("abcd"), ["P1", 3, 0.8333, None], check) is None  # a column fewer
    assert edited(list("abcde"), ["P1", 3, 0.8333, None, "a\nb"], None) is None


def test_thresholds_are_read_back_from_the_run_sheet_exactly():
    from batchwbc.core.config import settings_from_dict
    from batchwbc.outputs.workbook_reader import settings_from_run

    custom = settings_from_dict({"flags": {"blasts_high_pct": 12.5, "min_wbc": 200},
                                 "review": {"threshold": 0.7, "max_images": 50},
                                 "reference_ranges": {"lymphocyte": [18, 45], "basophil": []}})
    got, missing = settings_from_run(custom.describe())
    assert got == custom and missing == []
    got, missing = settings_from_run([row for row in custom.describe() if "min_wbc" not in row[0]])
    assert got.min_wbc == DEFAULT_SETTINGS.min_wbc and missing == ["flags.min_wbc"]


def test_exported_names_are_safe_and_unique():
    from batchwbc.outputs.labelled_export import _Namer, safe_name

    assert safe_name("<root>") == "_root_"
    assert safe_name("CON.jpg") == "_CON.jpg" and safe_name(".hidden.png") == "_hidden.png"
    assert safe_name('a:b*c?.png') == "a_b_c_.png" and safe_name("x. ") == "x" and safe_name("") == "_"
    assert len(safe_name("n" * 300 + ".png")) <= 120 and safe_name("n" * 300 + ".png").endswith(".png")
    namer = _Namer()
    assert [namer.name("d", n) for n in ("a.png", "A.png", "a.png", "b.png")] == ["a.png", "A-2.png", "a-3.png", "b.png"]


def test_class_names_resolve_leniently_but_never_guess():
    from batchwbc.core.verification import resolve_class

    ids = list(catalogue.CLASS_IDS)
    assert resolve_class("  Band   NEUTROPHIL ", ids) == "neutrophil_band"
    assert resolve_class("Erythroblast (NRBC)", ids) == "erythroblast"
    assert resolve_class("lymph", ids) is None and resolve_class("smudge", ids[:12]) is None


def test_verify_help_names_every_option_and_the_exit_codes():
    r = invoke("verify", "--help")
    assert r.exit_code == 0
    for opt in ("--out", "--reviewer", "--model", "--config", "--export-labelled", "--slides", "--log-file", "--quiet"):
        assert opt in r.output
    text = " ".join(r.output.split())
    assert "Exit codes: 0 verified; 2 the workbook cannot be verified" in text and "3 verified, but some crops" in text


def test_config_thresholds_replace_the_run_sheets_and_are_recorded(made, tmp_path):
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    cfg = tmp_path / "lab.toml"
    cfg.write_text("[flags]\nblasts_high_pct = 10\n", encoding="utf-8")
    out = tmp_path / "v.xlsx"
    r = invoke("verify", rep, "--out", out, "--config", cfg)
    assert r.exit_code == exit_codes.OK, r.stderr
    wb = load_workbook(out)
    summary = {row["Patient"]: row for row in dicts(wb["Summary"])}
    assert summary["P1"]["Flag codes (verified)"].startswith(BLASTS_HIGH)  # 1/10 blasts >= 10%
    run = {row[0]: row[1] for row in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["Flag BLASTS_HIGH: confident blasts >= (% of WBC) [flags.blasts_high_pct]"] == "10"
    assert run["Verification: thresholds from"] == f"--config {cfg}"
    again = tmp_path / "again.xlsx"  # verifying it again without --config keeps the thresholds it states
    assert invoke("verify", out, "--out", again).exit_code == exit_codes.OK
    assert {row["Patient"]: row for row in dicts(load_workbook(again)["Summary"])}["P1"]["Flag codes (verified)"] \
        == summary["P1"]["Flag codes (verified)"]


def test_html_gallery_of_the_verified_cells_marks_corrections(made, tmp_path):
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    gallery = tmp_path / "gallery"
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx", "--html", gallery)
    assert r.exit_code == exit_codes.OK, r.stderr
    index = (gallery / "index.html").read_text(encoding="utf-8")
    page = next(p for p in gallery.glob("patient-*.html") if "<h1>P1</h1>" in p.read_text(encoding="utf-8"))
    html = page.read_text(encoding="utf-8")
    assert "verified cell gallery" in index
    files = re.findall(r'<figure class="cell[^"]*" data-file="([^"]+)"', html)
    assert sorted(files) == sorted(f"P1/{n}" for n, _, _ in SLIDES["P1"])  # every cell of the patient
    sections = {m.group(1): m.start() for m in re.finditer(r"<section id=\"c\d+\"><h2>([^<]+?) <small>", html)}
    figure = {f: html.index(f'data-file="{f}"') for f in files}

    def section_of(f):
        return max((s for s in sections.items() if s[1] < figure[f]), key=lambda s: s[1])[0]

    assert (section_of("P1/bl1.png") == catalogue.get("lymphocyte").display
            and section_of("P1/amb1.png") == catalogue.get("myelocyte").display)  # verified classes
    assert section_of("P1/bl0.png") == catalogue.get("myeloblast").display
    corrected = re.findall(r'<figure class="cell[^"]*corrected" data-file="([^"]+)"', html)
    assert sorted(corrected) == ["P1/amb1.png", "P1/bl1.png"]
    assert f"machine: {catalogue.get('myeloblast').display}" in html


def test_verified_gallery_index_says_who_signed_each_patient_and_when(made, tmp_path):
    """The index states each patient's sign-off as the verified workbook's Summary does: a
    signer's name stays text, a typed date is shown as typed, an undated signature gets the
    date verify stamped, and an unsigned patient says so plainly, with why."""
    import html as htmllib

    rep = copy_report(made, tmp_path)
    review_as_person(rep)  # P1 and P3 signed; P2's review cell left blank
    signer = "Dr. <script>alert(1)</script> O'Hara & Co"
    set_cells(rep, "Summary", {("P1", None): {"Verified by": signer, "Verified on": "2025-03-04"}})
    gallery, out = tmp_path / "gallery", tmp_path / "v.xlsx"
    r = invoke("verify", rep, "--out", out, "--html", gallery)
    assert r.exit_code == exit_codes.OK, r.stderr
    summary = {row["Patient"]: row for row in dicts(load_workbook(out)["Summary"])}
    index = (gallery / "index.html").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r'<a href="patient-\d{4}\.html">([^<]+)</a>(.*?)</tr>', index)}
    assert sorted(rows) == ["P1", "P2", "P3"] and "<th>Sign-off</th>" in index

    assert f"Signed by {htmllib.escape(signer, quote=True)} on 2025-03-04" in rows["P1"]
    assert "<script" not in index.lower()
    assert summary["P3"]["Status"] == "signed" and summary["P3"]["Verified on"]  # stamped by verify
    assert f"Signed by B. Tech on {htmllib.escape(summary['P3']['Verified on'])}" in rows["P3"]
    assert summary["P2"]["Status"] == "not signed: 1 of 1 review cell without a Verified class"
    assert "Not signed" in rows["P2"] and "Signed by" not in rows["P2"]
    assert "1 of 1 review cell without a Verified class" in rows["P2"]
    assert "A. Tech" not in rows["P2"]  # a name typed for an unsigned patient is no signature


def test_a_data_shift_flag_is_carried_over_and_unclassified_can_be_chosen():
    from batchwbc.core.flags import DATA_SHIFT
    from batchwbc.core.verification import CarriedShift, VerifiedCell, verify_patients

    cells = [VerifiedCell(CellResult("P", f"P/{i}.png", "lymphocyte", 0.9, "monocyte", 0.1, False)) for i in range(3)]
    cells.append(VerifiedCell(CellResult("P", "P/x.png", "monocyte", 0.4, "lymphocyte", 0.3, True), UNCLASSIFIED))
    (pv,) = verify_patients(["P"], cells, [], {"P": ("A. Tech", "")}, DEFAULT_SETTINGS, "now",
                            {"P": CarriedShift("images unlike those (numbers)")})
    assert pv.signed and pv.verified_on == "now" and pv.corrected == 1
    assert [f.message for f in pv.post.flags if f.code == DATA_SHIFT] == ["Data shift: images unlike those (numbers)"]
    assert (pv.pre.differential.counts["monocyte"], pv.post.differential.counts["monocyte"]) == (1, 0)
    assert pv.post.differential.unclassified == 1 and pv.post.differential.wbc == 3


def test_the_verified_workbook_is_laid_out_for_paper_like_the_report(made, tmp_path):
    """Same print layout as a report: banner over a row-2 Summary header, landscape, one page
    wide, header rows repeated, hidden Check last; and it verifies again."""
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    out = tmp_path / "verified.xlsx"
    r = invoke("verify", rep, "--out", out)
    assert r.exit_code == exit_codes.OK, r.stderr
    wb = load_workbook(out)
    for name in ("Summary", "Differential", "Cells", "Review", "Errors", "Run"):
        ws, h = wb[name], workbook.HEADER_ROWS[name]
        assert ws.page_setup.orientation == "landscape", name
        if name == "Summary":  # column blocks at a fixed scale (test_print.py)
            assert ws.col_breaks.brk and int(ws.page_setup.scale) == workbook.BLOCK_PRINT_SCALE
        else:
            assert ws.page_setup.fitToWidth == 1 and ws.sheet_properties.pageSetUpPr.fitToPage, name
        assert ws.print_title_rows.replace("$", "") == f"1:{h}" and ws.freeze_panes == f"A{h + 1}", name
        header = [c.value for c in ws[h]]
        assert header[-1] == CHECK_HEADER and ws.column_dimensions[ws.cell(h, len(header)).column_letter].hidden
    assert wb["Summary"].cell(1, 2).value == workbook.VERIFIED_BANNER
    cells = wb["Cells"]
    col = [c.value for c in cells[1]].index("Verified class") + 1
    letter = cells.cell(1, col).column_letter
    dv = cells.data_validations.dataValidation[0]
    assert str(dv.sqref) == f"{letter}2:{letter}{cells.max_row}"  # every row below the header row
    again = invoke("verify", out, "--out", tmp_path / "again.xlsx")
    assert again.exit_code == exit_codes.OK, again.stderr


def test_export_follows_links_as_run_read_them_and_refuses_only_dotdot_paths(made, tmp_path):
    """Issue 19: slides made by `python -m batchwbc.simulate` are symbolic links to a data
    folder elsewhere; `run` read them, yet the export resolved each link, found its target
    outside the slides folder and exported 0 cells (exit 3)."""
    import os

    from batchwbc.outputs.labelled_export import leaves_root

    slides, _, _ = made
    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    data, linked = tmp_path / "data", tmp_path / "linked-slides"
    shutil.copytree(slides, data)
    for f in data.rglob("*.png"):
        target = linked / f.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(f, target)
        except OSError:
            pytest.skip("no symbolic-link rights here")
    out, labelled = tmp_path / "v.xlsx", tmp_path / "labelled"
    r = invoke("verify", rep, "--out", out, "--export-labelled", labelled, "--slides", linked)
    assert r.exit_code == exit_codes.OK, r.stderr
    assert len(read_labelled(labelled, catalogue.CLASS_IDS).items) == 10 + 3
    for bad in ("../secret.png", "P1/../../x.png", "/etc/passwd", "C:/x.png", "..\\x.png"):
        assert leaves_root(bad), bad
    for ok in ("P1/a.png", "P1/sub/a..b.png", "<root>/a.png"):
        assert not leaves_root(ok), ok


def test_an_evaluate_workbook_is_named_and_pointed_to_the_right_command(tmp_path):
    """Issue 19: verify said "the Run sheet lacks the column Check ... not written by this
    batchwbc version" for the workbook of `batchwbc evaluate`; say what the file is instead."""
    from batchwbc.outputs.evaluation_workbook import SHEETS

    wb = Workbook()
    wb.remove(wb.active)
    for name in SHEETS:
        wb.create_sheet(name).append(("Item", "Value"))
    path = tmp_path / "EVAL.xlsx"
    wb.save(path)
    r = invoke("verify", path, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    assert "batchwbc evaluate" in line and "batchwbc run" in line and "Check" not in line


# ----------------------------------------------------------------------------- the run record (issue 20)

def _record(path: Path):
    from batchwbc.outputs.run_record import read_record_sheet

    return read_record_sheet(load_workbook(path), path.name)


def test_run_sheet_labels_are_free_to_change_verify_reads_the_run_record(made, tmp_path, monkeypatch):
    """A report whose Run sheet words every label differently (a later layout) still verifies
    with its model and its own thresholds: verify reads the hidden run record, not the labels."""
    slides, model, _ = made
    cfg = tmp_path / "lab.toml"
    cfg.write_text("[flags]\nblasts_high_pct = 10\n[review]\nmax_images = 50\n", encoding="utf-8")
    real_run_rows = workbook.run_rows

    def reworded(*args, **kwargs):  # every label changed, its "[table.key]" dropped
        return [(f"Reworded {i}: " + re.sub(r"\[.*", "", k)[::-1], v)
                for i, (k, v) in enumerate(real_run_rows(*args, **kwargs))]

    monkeypatch.setattr(workbook, "run_rows", reworded)
    rep = tmp_path / "report.xlsx"
    assert invoke("run", slides, "--out", rep, "--model", model, "--workers", "0", "--config", cfg).exit_code \
        == exit_codes.OK
    monkeypatch.undo()
    items = [row[0] for row in load_workbook(rep)["Run"].iter_rows(min_row=2, values_only=True)]
    assert "Model sha256" not in items and not any("[flags." in i for i in items)
    review_as_person(rep)
    out = tmp_path / "verified.xlsx"
    r = invoke("verify", rep, "--out", out, "--model", model)  # no --config: the record's thresholds
    assert r.exit_code == exit_codes.OK, r.stderr
    assert "defaults are used" not in r.stderr
    summary = {row["Patient"]: row for row in dicts(load_workbook(out)["Summary"])}
    assert summary["P1"]["Flag codes (verified)"].startswith(BLASTS_HIGH)  # 1/10 blasts >= 10% (default: 20%)
    rec = _record(out)
    assert rec.written_by == "verify" and rec.settings_object().blasts_high_pct == 10
    assert rec.settings_object().review_max_images == 50 and rec.model_sha256 == sha(model)
    assert invoke("verify", out, "--out", tmp_path / "again.xlsx").exit_code == exit_codes.OK


def test_a_workbook_without_a_run_record_still_verifies_by_its_run_sheet(made, tmp_path):
    """Reports written before the record (batchwbc 0.1.0) are read by their Run-sheet labels;
    the verified workbook then carries a record rebuilt from them."""
    from batchwbc.outputs.run_record import RECORD_SHEET

    rep = copy_report(made, tmp_path)
    review_as_person(rep)
    direct = tmp_path / "direct.xlsx"
    assert invoke("verify", rep, "--out", direct).exit_code == exit_codes.OK
    wb = load_workbook(rep)
    del wb[RECORD_SHEET]
    wb.save(rep)
    out = tmp_path / "verified.xlsx"
    r = invoke("verify", rep, "--out", out, "--model", made[1])
    assert r.exit_code == exit_codes.OK, r.stderr
    for sheet in ("Summary", "Differential", "Cells"):
        assert [list(x)[:-1] for x in load_workbook(out)[sheet].iter_rows(values_only=True)] == \
            [list(x)[:-1] for x in load_workbook(direct)[sheet].iter_rows(values_only=True)], sheet
    old, new = _record(out), _record(direct)
    assert old.settings_object() == new.settings_object()
    assert (old.model_sha256, old.model_classes, old.crops_read, old.slides_root) == \
        (new.model_sha256, new.model_classes, new.crops_read, new.slides_root)


def test_an_edited_run_record_or_a_newer_format_is_refused_in_one_sentence(made, tmp_path):
    from batchwbc.outputs.run_record import RECORD_SHEET

    rep = copy_report(made, tmp_path)
    wb = load_workbook(rep)
    ws = wb[RECORD_SHEET]
    assert ws.sheet_state == "hidden"
    for row in ws.iter_rows(min_row=2):
        if row[0].value == "crops_read":
            row[1].value = "999"
    wb.save(rep)
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    assert f"hidden {RECORD_SHEET} sheet of report.xlsx was edited or damaged" in line
    wb = load_workbook(rep)
    ws = wb[RECORD_SHEET]
    for row in ws.iter_rows(min_row=2):
        if row[0].value == "record_format":
            row[1].value = "7"
    wb.save(rep)
    r = invoke("verify", rep, "--out", tmp_path / "v.xlsx")
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    assert "run record format 7" in line and "reads format 1" in line


def test_the_run_record_round_trips_settings_and_long_values():
    from batchwbc.core.config import settings_as_dict, settings_from_dict
    from batchwbc.outputs.run_record import RunRecord, _parse, record_rows

    custom = settings_from_dict({"flags": {"blasts_high_pct": 12.5, "min_wbc": 200},
                                 "review": {"threshold": 0.7, "max_images": 50},
                                 "reference_ranges": {"lymphocyte": [18, 45], "basophil": []},
                                 "lis": {"processing_id": "T", "codes": {"smudge": {
                                     "code": "S1", "display": "Smudge", "system": "99X", "uri": "urn:x"}}}})
    assert settings_from_dict(settings_as_dict(custom)) == custom
    assert settings_from_dict(settings_as_dict(DEFAULT_SETTINGS)) == DEFAULT_SETTINGS
    shifts = {f"=P{i}\x01ü": "images unlike those the model was validated on " * 3 for i in range(2000)}
    rec = RunRecord("0.1.0", "2024-01-01 00:00:00", "/slides", "m.onnx", "ab" * 32, "v1", ("lymphocyte",),
                    0.6, settings_as_dict(custom), 10, 9, shifts)
    rows = record_rows(rec)
    assert sum(k == "data_shift" for k, _ in rows) > 1 and all(len(v) <= 32767 and v.isascii() for _, v in rows)
    texts: dict[str, str] = {}
    for k, v in rows:
        texts[k] = texts.get(k, "") + v
    assert _parse(texts, "x.xlsx") == rec
