"""A run's files must be distinct: collisions are refused with exit 2 before any work."""
from __future__ import annotations

import os
import sys

import pytest

import tinymodel
from batchwbc.ops import exit_codes
from batchwbc.ops.output_paths import OutputCollision, check_distinct_outputs
from test_fuzz_cli import error_lines, png, run_cli


def test_distinct_files_pass(tmp_path):
    check_distinct_outputs({"--out": tmp_path / "r.xlsx", "--cells-csv": tmp_path / "c.csv", "--cache": tmp_path / "c.db",
                            "--log-file": tmp_path / "run.log"}, {"--model": tmp_path / "m.onnx", "--config": None})


def test_unused_options_and_shared_inputs_are_fine(tmp_path):
    check_distinct_outputs({"--out": tmp_path / "r.xlsx", "--cache": None, "--log-file": None},
                           {"--model": tmp_path / "x", "--config": tmp_path / "x"})


@pytest.mark.parametrize("a,b", [("--out", "--cache"), ("--log-file", "--out"), ("--cells-csv", "--out"),
                                 ("--cache", "--log-file"), ("--cells-csv", "--log-file"), ("--cache", "--cells-csv")])
def test_same_output_twice_is_refused(tmp_path, a, b):
    with pytest.raises(OutputCollision, match=rf"{a}|{b}") as exc:
        check_distinct_outputs({a: tmp_path / "x", b: tmp_path / "x"})
    assert str(exc.value).count(".") >= 1 and "same file" in str(exc.value)


def test_other_spellings_of_one_file_are_refused(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputCollision):
        check_distinct_outputs({"--out": tmp_path / "r.xlsx", "--cache": tmp_path / "sub" / ".." / "r.xlsx"})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(OutputCollision):
            check_distinct_outputs({"--out": tmp_path / "r.xlsx", "--log-file": "r.xlsx"})
    finally:
        os.chdir(cwd)


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlink_and_hard_link_to_one_file_are_refused(tmp_path):
    real = tmp_path / "real.log"
    real.write_text("")
    os.symlink(real, tmp_path / "link.log")
    os.link(real, tmp_path / "hard.log")
    for other in ("link.log", "hard.log"):
        with pytest.raises(OutputCollision):
            check_distinct_outputs({"--log-file": real, "--cells-csv": tmp_path / other})


def test_companion_files_are_compared(tmp_path):
    with pytest.raises(OutputCollision, match="lock file of --out"):
        check_distinct_outputs({"--out": tmp_path / "r.xlsx", "--log-file": tmp_path / "r.xlsx.lock"})
    with pytest.raises(OutputCollision, match="journal of --cache"):
        check_distinct_outputs({"--cache": tmp_path / "c.db", "--log-file": tmp_path / "c.db-wal"})


def test_output_may_not_replace_an_input(tmp_path):
    with pytest.raises(OutputCollision, match="--model"):
        check_distinct_outputs({"--out": tmp_path / "m.xlsx"}, {"--model": tmp_path / "m.xlsx"})
    with pytest.raises(OutputCollision, match="--config"):
        check_distinct_outputs({"--log-file": tmp_path / "c.toml"}, {"--config": tmp_path / "c.toml"})


@pytest.mark.parametrize("extra", [["--cache", "{out}"], ["--log-file", "{out}"], ["--cells-csv", "{csv}", "--log-file", "{csv}"],
                                   ["--log-file", "{out}.lock"], ["--cache", "{db}", "--cells-csv", "{db}"],
                                   ["--summary-csv", "{csv}", "--cells-csv", "{csv}"], ["--summary-csv", "{out}"]])
def test_cli_refuses_collisions_before_any_work(tmp_path, extra):
    model = tinymodel.build(tmp_path / "tiny.onnx")
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out, csv, db = tmp_path / "r.xlsx", tmp_path / "c.csv", tmp_path / "c.db"
    out.write_bytes(b"previous report")
    csv.write_bytes(b"previous csv")
    args = [a.format(out=out, csv=csv, db=db) for a in extra]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    r = run_cli(["run", slides, "--out", out, "--model", model, "--workers", "0", *args])
    assert r.exit_code == exit_codes.USAGE, r.output
    errs = error_lines(r.output)
    assert len(errs) == 1 and "same file" in errs[0] and errs[0].rstrip().endswith("."), r.output
    assert "found" not in r.output and "Traceback" not in r.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # nothing written, appended or created
