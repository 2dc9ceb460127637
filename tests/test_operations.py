"""Operations: an empty slides folder, a hard-killed run's workers, onnxruntime's own output."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fuzz_corpus
import tinymodel
from batchwbc import exitcodes
from batchwbc.runlock import lock_path_for
from test_fuzz_cli import error_lines, png, run_cli, sheet_rows

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "slides"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("model") / "tiny.onnx")


# =========================================================================== empty slides folder
def _empty_slides(tmp_path: Path, kind: str) -> Path:
    slides = tmp_path / "slides"
    slides.mkdir()
    if kind == "patients_without_images":  # an export that wrote folders and notes but no crops
        (slides / "P1").mkdir()
        (slides / "P2").mkdir()
        (slides / "P2" / "notes.txt").write_text("re-stain")
    return slides


@pytest.mark.parametrize("kind", ["empty", "patients_without_images"])
def test_no_images_exits_no_input_and_keeps_the_previous_report(tmp_path, model_path, kind):
    slides = _empty_slides(tmp_path, kind)
    out, csv = tmp_path / "report.xlsx", tmp_path / "cells.csv"
    out.write_bytes(b"previous report")
    csv.write_bytes(b"previous csv")
    r = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0", "--cells-csv", csv])
    assert r.exit_code == exitcodes.NO_INPUT == 4, r.output
    errs = error_lines(r.output)
    assert len(errs) == 1 and "no images found" in errs[0] and "--allow-empty" in errs[0], r.output
    assert out.read_bytes() == b"previous report" and csv.read_bytes() == b"previous csv"
    assert not lock_path_for(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "report.xlsx", "slides"]


@pytest.mark.parametrize("kind", ["empty", "patients_without_images"])
def test_allow_empty_writes_an_empty_report(tmp_path, model_path, kind):
    slides = _empty_slides(tmp_path, kind)
    out = tmp_path / "report.xlsx"
    out.write_bytes(b"previous report")
    r = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0", "--allow-empty"])
    assert r.exit_code == exitcodes.OK, r.output
    assert sheet_rows(out, "Cells") == []
    patients = [row["Patient"] for row in sheet_rows(out, "Summary")]
    assert patients == ([] if kind == "empty" else ["P1", "P2"])


def test_no_input_code_is_documented():
    from batchwbc.cli import main

    assert "4 no images" in (main.help or "")
    for doc in ("README.md", "docs/usage.md", "docs/operations.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        assert "--allow-empty" in text and "| 4 " in text, doc
