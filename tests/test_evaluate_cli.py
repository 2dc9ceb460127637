"""`batchwbc evaluate` end to end with the tiny colour model, whose answer for each crop is known:
a crop filled with class k's colour is called class k, so putting one lymphocyte-coloured crop
in the myeloblast folder makes exactly one known error."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc.ops import exit_codes
from batchwbc.cli import main

L, M, MY, PLT = "lymphocyte", "monocyte", "myeloblast", "platelet"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("model") / "tiny.onnx")


def crop(path: Path, looks_like: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = tinymodel.colour_for(looks_like)[::-1]  # OpenCV writes BGR
    cv2.imwrite(str(path), img)


def labelled_folder(root: Path) -> Path:
    """verified class folder / patient / crop, as `verify --export-labelled` writes it.

    P1: 5 lymphocytes (one looks like a monocyte), 3 monocytes, 2 myeloblasts.
    P2: 2 lymphocytes, 2 monocytes (+ one damaged file), 4 myeloblasts (one looks like a lymphocyte).
    No patient: 2 platelets. Not a class of the model: plasma_cell (2 crops)."""
    for i in range(4):
        crop(root / L / "P1" / f"l{i}.png", L)
    crop(root / L / "P1" / "l_odd.png", M)
    for i in range(3):
        crop(root / M / "P1" / f"m{i}.png", M)
    for i in range(2):
        crop(root / MY / "P1" / f"b{i}.png", MY)
    for i in range(2):
        crop(root / L / "P2" / f"l{i}.png", L)
        crop(root / M / "P2" / f"m{i}.png", M)
        crop(root / PLT / f"p{i}.png", PLT)
        crop(root / "plasma_cell" / "P2" / f"x{i}.png", L)
    for i in range(3):
        crop(root / MY / "P2" / "deeper" / f"b{i}.png", MY)
    crop(root / MY / "P2" / "b_odd.png", L)
    (root / M / "P2" / "damaged.jpg").write_bytes(b"not a jpeg at all")
    (root / "labels.csv").write_text("class,patient,file\n")
    return root


def invoke(*args):
    return CliRunner().invoke(main, ["evaluate", *[str(a) for a in args]], catch_exceptions=False)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [ln for ln in stderr.splitlines() if " ERROR " in ln]


def test_evaluate_known_answers_workbook_and_json(tiny, tmp_path):
    from openpyxl import load_workbook

    folder = labelled_folder(tmp_path / "LABELLED")
    out, js = tmp_path / "EVAL.xlsx", tmp_path / "eval.json"
    r = invoke(folder, "--out", out, "--model", tiny, "--json", js, "--workers", "0")
    assert r.exit_code == exit_codes.PARTIAL, r.stderr  # the damaged crop is listed, not fatal
    warnings = [ln for ln in r.stderr.splitlines() if " WARNING " in ln]
    assert any("plasma_cell: 2" in ln and "skipped 2 crops" in ln for ln in warnings), r.stderr
    assert any("1 labelled crop could not be read" in ln for ln in warnings)

    data = json.loads(js.read_text())
    assert {"accuracy", "macro_f1", "per_class", "ece"} <= set(data)
    assert data["n"] == 20
    assert data["accuracy"] == pytest.approx(18 / 20)
    pc = data["per_class"]
    assert set(pc[L]) >= {"precision", "recall", "f1", "support"}
    assert (pc[L]["precision"], pc[L]["recall"], pc[L]["support"]) == (pytest.approx(6 / 7), pytest.approx(6 / 7), 7)
    assert (pc[M]["precision"], pc[M]["recall"], pc[M]["support"]) == (pytest.approx(5 / 6), 1.0, 5)
    assert (pc[MY]["precision"], pc[MY]["recall"], pc[MY]["support"]) == (1.0, pytest.approx(5 / 6), 6)
    f1 = {c: pc[c]["f1"] for c in (L, M, MY, PLT)}
    assert data["macro_f1"] == pytest.approx(sum(f1.values()) / 4)
    assert data["paper10"]["n"] == 18 and data["paper10"]["accuracy"] == pytest.approx(16 / 18)
    ids = data["confusion"]["classes"]
    cm = np.array(data["confusion"]["matrix"])
    assert cm[ids.index(L), ids.index(M)] == 1 and cm[ids.index(MY), ids.index(L)] == 1
    assert int(np.trace(cm)) == 18 and int(cm.sum()) == 20
    assert data["run"]["unknown_folders"] == {"plasma_cell": 2}
    assert [u["file"] for u in data["run"]["unreadable"]] == ["monocyte/P2/damaged.jpg"]
    # per patient: P1 lymphocytes verified 5/10 = 50%, machine 4/10 = 40%; P2 25% vs 3/8 = 37.5%
    pats = {p["patient"]: p for p in data["patients"]}
    assert set(pats) == {"P1", "P2"}  # the platelets have no patient folder
    assert pats["P1"]["classes"][L]["verified_pct"] == pytest.approx(50.0)
    assert pats["P1"]["classes"][L]["machine_pct"] == pytest.approx(40.0)
    assert pats["P2"]["classes"][L]["machine_pct"] == pytest.approx(37.5)
    assert data["bland_altman"][L]["bias"] == pytest.approx((-10.0 + 12.5) / 2)
    assert data["bland_altman"][L]["n"] == 2

    wb = load_workbook(out)
    assert wb.sheetnames == ["Summary", "Per class", "Confusion", "Calibration", "Review threshold",
                             "Patients", "Bland-Altman", "Run"]
    summary = {row[0]: row[1] for row in wb["Summary"].iter_rows(min_row=2, values_only=True)}
    assert summary["Cells evaluated"] == 20
    assert summary["Accuracy, all classes (20 cells, unclassified counted as misses)"] == pytest.approx(data["accuracy"])
    assert summary["Coverage: cells classified (20 of 20; 0 unclassified)"] == 1 and data["coverage"] == 1
    assert data["classifier"]["accuracy"] == pytest.approx(18 / 20)  # nothing unclassified: the two views agree
    assert summary["Expected calibration error (15 equal-width bins; classifier)"] == pytest.approx(data["ece"])
    assert "embedded" in summary["Plots"]
    run_items = {row[0]: row[1] for row in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert "Unreadable: monocyte/P2/damaged.jpg" in run_items
    assert run_items["Skipped folder (not a class of the model): plasma_cell"] == "2 crops"
    with zipfile.ZipFile(out) as z:
        assert len([n for n in z.namelist() if n.startswith("xl/media/") and n.endswith(".png")]) == 3


def test_without_matplotlib_the_workbook_is_written_and_says_so(tiny, tmp_path, monkeypatch):
    from openpyxl import load_workbook

    folder = tmp_path / "LAB"
    for i in range(2):
        crop(folder / L / f"l{i}.png", L)
        crop(folder / M / f"m{i}.png", M)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "e.xlsx"
    r = invoke(folder, "--out", out, "--model", tiny, "--workers", "0")
    assert r.exit_code == exit_codes.OK, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "matplotlib is not installed" in ln]
    assert len(notes) == 1
    summary = {row[0]: row[1] for row in load_workbook(out)["Summary"].iter_rows(min_row=2, values_only=True)}
    assert "matplotlib is not installed" in summary["Plots"]
    assert summary["Accuracy, all classes (4 cells, unclassified counted as misses)"] == 1
    with zipfile.ZipFile(out) as z:
        assert not [n for n in z.namelist() if n.startswith("xl/media/")]
    # no patient sub-folders: said plainly instead of an empty comparison
    first = next(load_workbook(out)["Patients"].iter_rows(min_row=2, values_only=True))
    assert first[0].startswith("No patient sub-folders")


@pytest.mark.parametrize("case", ["empty", "only_unknown", "one_class"])
def test_unusable_folders_are_one_sentence_and_exit_2(tiny, tmp_path, case):
    folder = tmp_path / "LAB"
    folder.mkdir()
    if case == "only_unknown":
        crop(folder / "plasma_cell" / "a.png", L)
    if case == "one_class":
        crop(folder / L / "P1" / "a.png", L)
        crop(folder / L / "P2" / "b.png", L)
    out = tmp_path / "e.xlsx"
    r = invoke(folder, "--out", out, "--model", tiny, "--workers", "0")
    assert r.exit_code == exit_codes.USAGE
    (line,) = error_lines(r.stderr)
    expected = {"empty": "no labelled crops found", "only_unknown": "not classes of the model: plasma_cell",
                "one_class": "of one class (lymphocyte)"}[case]
    assert expected in line
    assert not out.exists()


def test_bad_output_is_refused_before_any_crop_is_read(tiny, tmp_path):
    folder = labelled_folder(tmp_path / "LAB")
    r = invoke(folder, "--out", tmp_path / "e.txt", "--model", tiny, "--workers", "0")
    assert r.exit_code == exit_codes.USAGE
    assert ".xlsx" in error_lines(r.stderr)[0] and "evaluating" not in r.stderr
    r = invoke(folder, "--out", tmp_path / "e.xlsx", "--json", tmp_path / "no" / "e.json", "--model", tiny)
    assert r.exit_code == exit_codes.USAGE and not (tmp_path / "e.xlsx").exists()


def test_help_names_every_option_without_heavy_imports():
    r = subprocess.run([sys.executable, "-m", "batchwbc", "evaluate", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    for opt in ("LABELLED", "--out", "--model", "--json", "--workers", "--quiet"):
        assert opt in r.stdout
    probe = ("import sys; from batchwbc import cli; from batchwbc.core import agreement; from batchwbc.commands import evaluate; "
             "print(sorted(m for m in ('numpy','cv2','onnxruntime','openpyxl','matplotlib') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO).stdout.strip() == "[]"


@pytest.mark.slow
def test_bundled_model_on_its_own_test_split_reproduces_its_recorded_metrics(shared_data, tmp_path):
    """The model card's numbers (recorded in the model file's metadata at export) come back out of
    `batchwbc evaluate` run on a LABELLED folder built from its own test split
    (docs/model/test-split-wbc13.csv: home and 14 DeepAPL test patients)."""
    import csv
    import os
    import shutil

    from batchwbc.engine.model import DEFAULT_MODEL_PATH, KEY_TEST_METRICS, Classifier

    folder = tmp_path / "LABELLED"
    with open(REPO / "docs" / "model" / "test-split-wbc13.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        dst = folder / row["class_id"] / row["path"].replace("/", "__")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(shared_data / row["path"], dst)
        except OSError:  # no symlink rights (Windows without developer mode)
            shutil.copyfile(shared_data / row["path"], dst)
    js = tmp_path / "eval.json"
    r = invoke(folder, "--out", tmp_path / "EVAL.xlsx", "--json", js, "--quiet")
    assert r.exit_code == exit_codes.OK, r.stderr
    got = json.loads(js.read_text())
    card = Classifier(DEFAULT_MODEL_PATH, threads=1).info.json_field(KEY_TEST_METRICS)
    assert got["n"] == card["n"] == len(rows)
    near = {"abs": 6e-5}  # the metadata keeps 4 decimals
    # the model card scores the classifier alone; the run's view (unclassified as an abstention) is apart
    clf = got["classifier"]
    assert clf["accuracy"] == pytest.approx(card["accuracy"], **near)
    assert clf["macro_f1"] == pytest.approx(card["macro_f1"], **near)
    assert clf["paper10"]["accuracy"] == pytest.approx(card["paper10_accuracy"], **near)
    assert clf["paper10"]["macro_f1"] == pytest.approx(card["paper10_macro_f1"], **near)
    assert got["ece"] == pytest.approx(card["test_ece"], **near)
    for cls, f1 in card["f1_per_class"].items():
        assert clf["per_class"][cls]["f1"] == pytest.approx(f1, **near), cls
    assert got["accuracy"] <= clf["accuracy"] and got["coverage"] > 0.99  # 0.2% unclassified (model card)


def test_folder_names_that_look_like_formulas_stay_text(tiny, tmp_path):
    from openpyxl import load_workbook

    folder = tmp_path / "LAB"
    crop(folder / L / "=SUM(1,2)" / "a.png", L)
    crop(folder / M / "=SUM(1,2)" / "b.png", M)
    out = tmp_path / "e.xlsx"
    assert invoke(folder, "--out", out, "--model", tiny, "--workers", "0").exit_code == exit_codes.OK
    cell = load_workbook(out)["Patients"]["A2"]
    assert cell.value == "=SUM(1,2)" and cell.data_type == "s"


def test_an_interrupt_is_exit_130_and_one_sentence(tiny, tmp_path, monkeypatch):
    from batchwbc.commands import evaluate
    from batchwbc.ops.signals import RunInterrupted

    def stopped(*args, **kwargs):
        raise RunInterrupted("SIGTERM")

    monkeypatch.setattr(evaluate, "run_evaluate", stopped)
    r = invoke(tmp_path, "--out", tmp_path / "e.xlsx", "--model", tiny)
    assert r.exit_code == exit_codes.INTERRUPTED
    assert "stopped by SIGTERM" in error_lines(r.stderr)[0]
