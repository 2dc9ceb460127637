"""The CLI end to end on the committed samples/ folder, with the tiny contract model, plus
the fail-fast checks a nightly job relies on (one sentence, documented exit code)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc import __version__
from batchwbc.ops import exit_codes
from batchwbc.outputs import workbook
from batchwbc.cli import main
from batchwbc.commands.run import inference_threads, resolve_review_threshold
from batchwbc.inputs.slide_folders import discover

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "slides"
PYTHON = sys.executable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("model") / "tiny.onnx")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if " ERROR " in ln or ln.startswith("Error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_is_instant_and_explains_every_option():
    t0 = time.perf_counter()
    r = subprocess.run([PYTHON, "-m", "batchwbc", "run", "--help"], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0
    for opt in ("--out", "--model", "--config", "--review-threshold", "--workers", "--batch-size",
                "--cache", "--cells-csv", "--summary-csv", "--log-file", "--quiet"):
        assert opt in r.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.1f}s"
    # the heavy libraries must not be imported for --help
    probe = ("import sys; from batchwbc import cli; "
             "print(sorted(m for m in ('numpy','cv2','onnxruntime','pandas','openpyxl') if m in sys.modules))")
    assert subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, cwd=REPO).stdout.strip() == "[]"


def test_top_level_help_documents_exit_codes():
    r = invoke("--help")
    assert r.exit_code == 0
    for code in ("0", "1", "2", "3", "130"):
        assert code in r.output


def test_top_level_help_lists_every_command_without_cutting_it():
    """Issue 19: `batchwbc --help` cut each command's description with "..."; each command has a
    short help of its own that fits the line (click shortens after about 45 characters)."""
    r = invoke("--help")
    commands = r.output.split("Commands:", 1)[1].strip().splitlines()
    assert {line.split()[0] for line in commands} == set(main.commands)
    for line in commands:
        assert not line.rstrip().endswith("..."), line
        assert len(line.split(None, 1)[1]) >= 20, line  # a description, not just a word


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_info_shows_model_metadata(tiny):
    r = invoke("info", "--model", tiny)
    assert r.exit_code == 0
    assert "tiny-test-1" in r.output and "0.6" in r.output and "myeloblast" in r.output and "32x32" in r.output


def test_info_on_a_missing_bundled_model_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr("batchwbc.engine.model.DEFAULT_MODEL_PATH", tmp_path / "absent.onnx")
    r = invoke("info")
    assert r.exit_code == exit_codes.USAGE
    assert "missing" in one_error_line(r.stderr)


def test_run_without_bundled_model_says_the_model_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr("batchwbc.engine.model.DEFAULT_MODEL_PATH", tmp_path / "absent.onnx")
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx")
    assert r.exit_code == exit_codes.USAGE
    assert "model file" in one_error_line(r.stderr) and "missing" in r.stderr
    assert not (tmp_path / "r.xlsx").exists()


def test_run_on_samples_end_to_end(tiny, tmp_path):
    out, csv, logf = tmp_path / "report.xlsx", tmp_path / "cells.csv", tmp_path / "run.log"
    r = invoke("run", SAMPLES, "--out", out, "--model", tiny, "--workers", "0",
               "--cells-csv", csv, "--log-file", logf, "--review-threshold", "0.99")
    assert r.exit_code == exit_codes.OK, r.stderr
    n = len(discover(SAMPLES).crops)
    assert n > 50
    from openpyxl import load_workbook

    wb = load_workbook(out, read_only=True)
    assert len(wb.sheetnames) >= 3
    rows = csv.read_text(encoding="utf-8").splitlines()
    assert len(rows) == n + 1  # header + every cell
    summary = [ln for ln in r.stderr.splitlines() if "summary:" in ln]
    assert len(summary) == 1
    assert re.search(rf"4 patients, {n} crops read \((\d+) classified, (\d+) unclassified\), 0 unreadable", summary[0])
    classified, unclassified = map(int, re.search(r"\((\d+) classified, (\d+) unclassified\)", summary[0]).groups())
    assert classified + unclassified == n
    assert unclassified == sum(1 for row in rows[1:] if row.split(",")[2] == "unclassified")  # as the cells CSV says
    assert "summary:" in logf.read_text(encoding="utf-8")
    assert "\r" not in r.stderr  # no progress-bar noise when stderr is not a terminal
    assert not (tmp_path / "report.xlsx.lock").exists()


def test_real_command_with_worker_processes(tiny, tmp_path):
    """The installed-style entry point with default workers (spawned processes)."""
    out = tmp_path / "r.xlsx"
    r = subprocess.run([PYTHON, "-m", "batchwbc", "run", str(SAMPLES), "--out", str(out), "--model", str(tiny)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == exit_codes.OK, r.stderr
    assert out.is_file() and "summary:" in r.stderr


def test_unreadable_files_give_exit_3_and_still_a_report(tiny, tmp_path):
    slides = tmp_path / "slides"
    (slides / "A").mkdir(parents=True)
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = tinymodel.colour_for("lymphocyte")[::-1]
    cv2.imwrite(str(slides / "A" / "good.png"), img)
    (slides / "A" / "bad.jpg").write_bytes(b"garbage")
    (slides / "B_empty").mkdir()
    csv = tmp_path / "c.csv"
    r = invoke("run", slides, "--out", tmp_path / "r.xlsx", "--model", tiny, "--workers", "0", "--cells-csv", csv)
    assert r.exit_code == exit_codes.PARTIAL
    assert (tmp_path / "r.xlsx").is_file()
    assert "1 unreadable" in r.stderr and "2 patients" in r.stderr
    assert csv.read_text().splitlines()[1].startswith("A,A/good.png,lymphocyte")


def test_quiet_hides_info_lines(tiny, tmp_path):
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", tiny, "--workers", "0", "--quiet")
    assert r.exit_code == 0
    assert " INFO " not in r.stderr


@pytest.mark.parametrize("bad", ["folder_missing", "not_xlsx", "is_dir"])
def test_unwritable_output_is_refused_before_classification(tiny, tmp_path, bad):
    out = {"folder_missing": tmp_path / "nope" / "r.xlsx", "not_xlsx": tmp_path / "r.txt",
           "is_dir": tmp_path}[bad]
    if bad == "is_dir":
        out = tmp_path / "adir.xlsx"
        out.mkdir()
    r = invoke("run", SAMPLES, "--out", out, "--model", tiny, "--workers", "0")
    assert r.exit_code == exit_codes.USAGE
    one_error_line(r.stderr)
    assert "found" not in r.stderr  # discovery and classification never started


def test_broken_model_file_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", bad)
    assert r.exit_code == exit_codes.USAGE
    assert "not a valid ONNX model" in one_error_line(r.stderr)


def test_model_without_contract_metadata_is_refused(tmp_path):
    m = tinymodel.build(tmp_path / "m.onnx", drop_keys=("batchwbc.classes",))
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", m)
    assert r.exit_code == exit_codes.USAGE
    assert "metadata" in one_error_line(r.stderr)


def test_bad_config_is_a_usage_error(tiny, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("this is = = not toml")
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", tiny, "--config", cfg)
    assert r.exit_code == exit_codes.USAGE
    one_error_line(r.stderr)


@pytest.mark.parametrize("args", [["--workers", "-1"], ["--batch-size", "0"], ["--review-threshold", "1.5"]])
def test_bad_option_values_are_usage_errors(tiny, tmp_path, args):
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", tiny, *args)
    assert r.exit_code == exit_codes.USAGE


def test_missing_slides_folder_is_a_usage_error(tiny, tmp_path):
    r = invoke("run", tmp_path / "nope", "--out", tmp_path / "r.xlsx", "--model", tiny)
    assert r.exit_code == exit_codes.USAGE and "does not exist" in r.stderr


def test_review_threshold_precedence():
    assert resolve_review_threshold(0.7, 0.8, 0.9)[0] == 0.7
    assert resolve_review_threshold(None, 0.8, 0.9)[0] == 0.8
    assert resolve_review_threshold(None, None, 0.9)[0] == 0.9
    assert resolve_review_threshold(None, None, None)[0] == 0.5
    assert resolve_review_threshold(0.0, 0.8, 0.9)[0] == 0.0  # an explicit 0 is not "unset"


def test_review_threshold_option_changes_the_review_list(tiny, tmp_path):
    csv_lo, csv_hi = tmp_path / "lo.csv", tmp_path / "hi.csv"
    for thr, csv in (("0", csv_lo), ("1", csv_hi)):
        r = invoke("run", SAMPLES, "--out", tmp_path / f"r{thr}.xlsx", "--model", tiny, "--workers", "0",
                   "--review-threshold", thr, "--cells-csv", csv)
        assert r.exit_code == 0
    import csv as csv_mod

    lo = [r["review"] == "yes" for r in csv_mod.DictReader(csv_lo.open(newline=""))]
    hi = [r["review"] == "yes" for r in csv_mod.DictReader(csv_hi.open(newline=""))]
    assert lo and not any(lo) and all(hi)


def test_inference_threads_leave_the_other_cores_to_decoding():
    assert inference_threads(2) == 1
    assert inference_threads(8) == 4
    assert inference_threads(0) == 1
    assert inference_threads(2, model_ms_per_crop=0.55) == 1  # v4: decoding is the larger cost


def test_a_heavy_model_gets_every_core():
    """Lite0 (~3.9 ms per crop) is the bottleneck: 2 threads ran 258 crops/s against 218."""
    assert inference_threads(2, model_ms_per_crop=3.9) == 2
    assert inference_threads(8, model_ms_per_crop=3.9) == 8
    assert inference_threads(0, model_ms_per_crop=3.9) == 1


def test_the_runtime_times_the_model_and_picks_its_threads(tiny):
    from batchwbc.commands.run import load_runtime_classifier, one_thread_ms_per_crop

    clf = load_runtime_classifier(str(tiny), 2)
    ms = one_thread_ms_per_crop(clf)
    assert 0 < ms < 1.5  # the tiny test model is light: one thread, half of 2 cores


def test_cli_batch_size_default_is_the_pipeline_default():
    from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE

    opt = next(p for p in main.commands["run"].params if p.name == "batch_size")
    assert opt.default == DEFAULT_BATCH_SIZE


def test_progress_logs_plain_lines_when_there_is_no_bar():
    import logging

    from batchwbc.ops.logging_setup import PROGRESS_LOGGER, Progress

    class ListHandler(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    h = ListHandler()
    logger = logging.getLogger(PROGRESS_LOGGER)
    old_level = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        with Progress(10, show_bar=False, every_s=0.0) as p:
            for _ in range(10):
                p(1)
        n_every = len(h.lines)
        with Progress(10, show_bar=False, every_s=3600.0) as rare:
            rare(5)
    finally:
        logger.removeHandler(h)
        logger.setLevel(old_level)
    assert n_every == 10 and len(h.lines) == 10  # the second, rare reporter logged nothing yet
    assert h.lines[-1].startswith("10 of 10 cells (100%)") and "cells/s" in h.lines[-1] and "ETA" in h.lines[-1]
    assert rare.done == 5


def test_summary_csv_option_writes_one_line_per_patient(tiny, tmp_path):
    import csv as csvmod

    out, summary = tmp_path / "r.xlsx", tmp_path / "summary.csv"
    r = invoke("run", SAMPLES, "--out", out, "--model", tiny, "--workers", "0", "--summary-csv", summary)
    assert r.exit_code == exit_codes.OK, r.stderr
    got = list(csvmod.DictReader(summary.open(encoding="utf-8", newline="")))
    assert [g["Patient"] for g in got] == discover(SAMPLES).patients
    from openpyxl import load_workbook

    ws = load_workbook(out, read_only=True)["Summary"]
    # from the header row on: the banner above it is the sheet's, not the CSV's
    sheet = [tuple(c.value for c in row) for row in ws.iter_rows(min_row=workbook.HEADER_ROWS["Summary"])]
    assert summary.read_text(encoding="utf-8").startswith("Patient,")
    header = tuple(h for h in sheet[0] if h not in ("Verified by", "Verified on", "Every class", workbook.CHECK_HEADER))
    assert tuple(got[0]) == header  # the sheet's machine columns (not the technologist's, the link or the hidden Check)
    assert [g["Flag codes"] for g in got] == [row[sheet[0].index("Flag codes")] or "" for row in sheet[1:]]
    assert "Verified by" in sheet[0]  # the workbook keeps them
    assert sum(int(g["Cells classified"]) + int(g["Unclassified"]) for g in got) == len(discover(SAMPLES).crops)


def test_summary_csv_must_be_a_csv_file(tiny, tmp_path):
    r = invoke("run", SAMPLES, "--out", tmp_path / "r.xlsx", "--model", tiny, "--workers", "0",
               "--summary-csv", tmp_path / "summary.txt")
    assert r.exit_code == exit_codes.USAGE
    assert ".csv" in one_error_line(r.stderr)
    assert not (tmp_path / "r.xlsx").exists()


def test_one_crop_in_one_folder_is_said_in_the_singular(tiny, tmp_path):
    """Issue 19: "found 1 crops in 1 patient folders"."""
    slides = tmp_path / "slides"
    (slides / "A").mkdir(parents=True)
    img = np.zeros((40, 40, 3), np.uint8)
    img[:] = tinymodel.colour_for("lymphocyte")[::-1]
    cv2.imwrite(str(slides / "A" / "one.png"), img)
    r = invoke("run", slides, "--out", tmp_path / "r.xlsx", "--model", tiny, "--workers", "0")
    assert r.exit_code == 0, r.stderr
    assert "found 1 crop in 1 patient folder (0 other files ignored)" in r.stderr
