"""The real `batchwbc run` against hostile input, interruption, concurrency, caching and bad models.

Every test drives the actual CLI (click's CliRunner in-process, or `python -m batchwbc` in a
subprocess where signals or a second process are involved) with the tiny colour model and
reads the workbook back with openpyxl.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fuzz_corpus
import tinymodel
from batchwbc.ops import exit_codes
from batchwbc.engine import model as bm
from batchwbc.ops.run_lock import RunLock, lock_path_for

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals / FIFOs")
REPORT_SHEETS = ("Summary", "Differential", "Cells", "Review", "Errors")

# XML 1.0 cannot hold control characters; the report replaces them (documented in report.py).
_XML_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


# =========================================================================== helpers
def xlsx_text(s: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", s)


def run_cli(args: list[str]):
    """In-process `batchwbc ...`; returns click's Result (exit_code, stdout, stderr, output)."""
    from batchwbc.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_proc(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchwbc", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=kw.pop("timeout", 300), **kw)


def sheet_rows(xlsx: Path, name: str) -> list[dict]:
    from openpyxl import load_workbook

    wb = load_workbook(xlsx)
    try:
        rows = list(wb[name].iter_rows(values_only=True))
    finally:
        wb.close()
    from batchwbc.outputs.workbook import HEADER_ROWS

    rows = rows[HEADER_ROWS.get(name, 1) - 1:]  # the Summary's row 1 is the banner
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[1:] if any(v is not None for v in r)]


def sheet_values(xlsx: Path, names=REPORT_SHEETS) -> dict[str, list[tuple]]:
    from openpyxl import load_workbook

    wb = load_workbook(xlsx)
    try:
        return {n: list(wb[n].iter_rows(values_only=True)) for n in names}
    finally:
        wb.close()


def run_sheet(xlsx: Path) -> dict[str, str]:
    from openpyxl import load_workbook

    wb = load_workbook(xlsx)
    try:
        return {str(r[0]): r[1] for r in wb["Run"].iter_rows(values_only=True) if r and r[0] is not None}
    finally:
        wb.close()


def png(rgb, size: int = 40) -> bytes:
    return fuzz_corpus._pil_bytes(np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy(), "PNG")


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " ERROR " in ln or ln.startswith("Error:")]


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("model") / "tiny.onnx")


# =========================================================================== 1. hostile corpus
@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, model_path):
    """One real run (subprocess, 2 decode workers) over the corpus; many tests read it."""
    base = tmp_path_factory.mktemp("fuzz")
    manifest = fuzz_corpus.build_corpus(base / "slides")
    fifo = None
    if hasattr(os, "mkfifo"):  # a FIFO named like an image: opening it would block forever
        fifo = manifest.root / "P001_formats" / "pipe.jpg"
        os.mkfifo(fifo)
    out, log, csv = base / "report.xlsx", base / "run.log", base / "cells.csv"
    t0 = time.monotonic()
    proc = run_proc(["run", manifest.root, "--out", out, "--model", model_path, "--workers", "2",
                     "--log-file", log, "--cells-csv", csv])
    return {"manifest": manifest, "proc": proc, "out": out, "log": log.read_text(encoding="utf-8") if log.exists() else "",
            "csv": csv, "seconds": time.monotonic() - t0, "fifo": fifo, "base": base}


def test_corpus_exit_code_is_partial(corpus_run):
    p = corpus_run["proc"]
    assert p.returncode == exit_codes.PARTIAL, p.stderr
    assert "Traceback" not in p.stderr
    assert corpus_run["seconds"] < 120  # nothing hung (FIFO, symlink loops)


def test_corpus_every_valid_image_classified_once(corpus_run):
    m = corpus_run["manifest"]
    cells = sheet_rows(corpus_run["out"], "Cells")
    got = [(c["Patient"], c["File"]) for c in cells]
    want = [(c.patient, xlsx_text(c.rel)) for c in m.of(fuzz_corpus.CLASSIFY)]
    assert sorted(got) == sorted(want)  # none missing, none twice (symlink loops), none extra
    by_file = {c["File"]: c for c in cells}
    wrong = [(c.rel, by_file[xlsx_text(c.rel)]["Class"], c.class_id) for c in m.of(fuzz_corpus.CLASSIFY)
             if c.class_id and by_file[xlsx_text(c.rel)]["Class"] != c.class_id]
    assert not wrong


def test_corpus_every_invalid_file_in_errors_with_reason(corpus_run):
    m = corpus_run["manifest"]
    errors = sheet_rows(corpus_run["out"], "Errors")
    assert sorted((e["Patient"], e["File"]) for e in errors) == sorted(
        (c.patient, xlsx_text(c.rel)) for c in m.of(fuzz_corpus.ERROR))
    for e in errors:
        reason = e["Reason"]
        assert isinstance(reason, str) and len(reason) >= 10 and "\n" not in reason and "Traceback" not in reason, e
    by_file = {e["File"]: e["Reason"] for e in errors}
    for c in m.cases:
        if c.bomb:
            assert "pixel safety limit" in by_file[c.rel], (c.rel, by_file[c.rel])
        if c.shape:
            assert re.search(r"image is \d+x\d+ pixels, (too small to hold a cell|a strip rather than a cell crop)",
                             by_file[c.rel]), (c.rel, by_file[c.rel])


def test_corpus_impossible_shapes_are_not_counted(corpus_run):
    """1x1, 8x8, 31 px, 8000x3 and >3:1 images are neither classified nor counted; 32 px and 3:1 are."""
    m = corpus_run["manifest"]
    shapes = [c for c in m.cases if c.patient == "P008_shapes"]
    assert sum(c.shape for c in shapes) >= 6
    summary = {r["Patient"]: r for r in sheet_rows(corpus_run["out"], "Summary")}
    assert summary["P008_shapes"]["Cells classified"] == sum(c.expect == fuzz_corpus.CLASSIFY for c in shapes) == 2
    assert summary["P008_shapes"]["Unreadable files"] == sum(c.shape for c in shapes)


def test_corpus_greyscale_classified_and_always_reviewed(corpus_run):
    m = corpus_run["manifest"]
    cells = {c["File"]: c for c in sheet_rows(corpus_run["out"], "Cells")}
    review = {c["File"]: c for c in sheet_rows(corpus_run["out"], "Review")}
    grey = [c.rel for c in m.cases if c.greyscale]
    assert len(grey) >= 8
    for rel in grey:
        assert cells[rel]["Review"] == "yes", rel
        assert "greyscale image: stain colour missing" in cells[rel]["Review reason"], rel
        assert "greyscale" in review[rel]["Review reason"], rel
    for c in m.of(fuzz_corpus.CLASSIFY):
        if not c.greyscale:
            assert "greyscale" not in (cells[xlsx_text(c.rel)]["Review reason"] or ""), c.rel
    # the reason travels to the CSV as well
    import csv

    with open(corpus_run["csv"], newline="", encoding="utf-8") as fh:
        by_file = {r["file"]: r for r in csv.DictReader(fh)}
    assert all("greyscale" in by_file[rel]["review_reason"] and by_file[rel]["review"] == "yes" for rel in grey)


def test_corpus_ignored_files_are_nowhere(corpus_run):
    m = corpus_run["manifest"]
    listed = {c["File"] for c in sheet_rows(corpus_run["out"], "Cells")} | {e["File"] for e in sheet_rows(corpus_run["out"], "Errors")}
    ignored = {c.rel for c in m.of(fuzz_corpus.IGNORE)}
    if corpus_run["fifo"] is not None:
        ignored.add("P001_formats/pipe.jpg")
    assert not (listed & ignored)


def test_corpus_all_patients_listed_including_empty(corpus_run):
    m = corpus_run["manifest"]
    summary = [r["Patient"] for r in sheet_rows(corpus_run["out"], "Summary")]
    assert sorted(summary) == sorted(m.patients)
    zero = {r["Patient"]: r["Cells classified"] for r in sheet_rows(corpus_run["out"], "Summary")}
    assert all(zero[p] == 0 for p in m.empty_patients)


def test_corpus_no_formulas_anywhere(corpus_run):
    """Folder names like =HYPERLINK(...) or +SUM(1,2) must be stored as text, never executed."""
    from openpyxl import load_workbook

    wb = load_workbook(corpus_run["out"])
    formula_cells, seen = [], {}
    for ws in wb.worksheets:
        for row in ws.iter_rows():
            for cell in row:
                if cell.data_type == "f":
                    formula_cells.append(f"{ws.title}!{cell.coordinate}={cell.value!r}")
                if isinstance(cell.value, str) and cell.value in fuzz_corpus.FORMULA_PATIENTS:
                    seen[cell.value] = cell.data_type
    wb.close()
    assert not formula_cells
    assert set(seen) == set(fuzz_corpus.FORMULA_PATIENTS) and set(seen.values()) == {"s"}


def test_corpus_unicode_patient_kept_exactly(corpus_run):
    summary = [r["Patient"] for r in sheet_rows(corpus_run["out"], "Summary")]
    assert fuzz_corpus.UNICODE_PATIENT in summary


def test_corpus_csv_has_every_cell(corpus_run):
    import csv

    with open(corpus_run["csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) - 1 == len(corpus_run["manifest"].of(fuzz_corpus.CLASSIFY))


def test_corpus_log_has_one_line_summary(corpus_run):
    m, log = corpus_run["manifest"], corpus_run["log"]
    n_cells = len(m.of(fuzz_corpus.CLASSIFY))
    n_bad = len(m.of(fuzz_corpus.ERROR))
    n_review = sum(1 for c in sheet_rows(corpus_run["out"], "Cells") if c["Review"] == "yes")
    pattern = (rf"{len(m.patients)} patients, {n_cells} crops read \(\d+ classified, \d+ unclassified\), {n_bad} unreadable, "
               rf"{n_review} for review, \d+ flags raised, [\d.]+ s")
    lines = [ln for ln in log.splitlines() if re.search(pattern, ln)]
    assert len(lines) == 1, log
    assert re.search(pattern, corpus_run["proc"].stderr)


def test_corpus_no_progress_bar_noise_when_not_a_terminal(corpus_run):
    err = corpus_run["proc"].stderr
    assert "\r" not in err and "cell/s]" not in err and "it/s" not in err
    log_lines = [ln for ln in err.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", ln)]
    assert len(log_lines) >= 3
    # Anything else on stderr may only come from native decoders (libpng prints its own line).
    others = [ln for ln in err.splitlines() if ln.strip() and ln not in log_lines]
    assert all(ln.startswith(("libpng ", "Corrupt JPEG", "Premature end of JPEG")) for ln in others), others


def test_corpus_nothing_left_behind(corpus_run):
    assert leftovers(corpus_run["base"], {"slides", "report.xlsx", "run.log", "cells.csv"}) == []


# =========================================================================== files changing mid-run
@posix_only
@pytest.mark.parametrize("workers", [0, 1])
def test_files_deleted_or_replaced_after_discovery(tmp_path, model_path, monkeypatch, workers):
    """Discovery lists the files, then (as a technologist re-exporting a slide would) some are
    deleted or replaced before they are decoded. The run must report them and lose nothing."""
    import batchwbc.inputs.slide_folders as discovery

    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    names = ["a_keep.png", "b_deleted.png", "c_to_text.png", "d_recoloured.png", "e_to_fifo.png", "f_to_folder.png", "g_keep.png"]
    for n in names:
        (slides / "P1" / n).write_bytes(png(tinymodel.colour_for("lymphocyte")))
    real_discover = discovery.discover

    def discover_then_change(root):
        found = real_discover(root)
        p = slides / "P1"
        (p / "b_deleted.png").unlink()
        (p / "c_to_text.png").write_text("overwritten by a text editor")
        (p / "d_recoloured.png").write_bytes(png(tinymodel.colour_for("basophil")))
        (p / "e_to_fifo.png").unlink()
        os.mkfifo(p / "e_to_fifo.png")
        (p / "f_to_folder.png").unlink()
        (p / "f_to_folder.png").mkdir()
        return found

    monkeypatch.setattr(discovery, "discover", discover_then_change)
    out = tmp_path / "r.xlsx"
    res = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", workers])
    assert res.exit_code == exit_codes.PARTIAL, res.output
    cells = {c["File"]: c["Class"] for c in sheet_rows(out, "Cells")}
    assert cells == {"P1/a_keep.png": "lymphocyte", "P1/d_recoloured.png": "basophil", "P1/g_keep.png": "lymphocyte"}
    errors = {e["File"]: e["Reason"] for e in sheet_rows(out, "Errors")}
    assert set(errors) == {"P1/b_deleted.png", "P1/c_to_text.png", "P1/e_to_fifo.png", "P1/f_to_folder.png"}
    assert "disappeared" in errors["P1/b_deleted.png"]
    assert "not a readable image" in errors["P1/c_to_text.png"]


# =========================================================================== 2. interruption
@pytest.fixture(scope="module")
def slow_slides(tmp_path_factory) -> Path:
    """~800 large crops (hard links to one 1600x1600 JPEG): a run that takes several seconds."""
    return fuzz_corpus.large_crop_slides(tmp_path_factory.mktemp("slow") / "slides", 8, 100, "P{:02d}")


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@posix_only
@pytest.mark.slow
def test_sigterm_mid_classification_keeps_previous_report(tmp_path, model_path, slow_slides):
    import psutil

    small = tmp_path / "small"
    (small / "P1").mkdir(parents=True)
    (small / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out, log = tmp_path / "report.xlsx", tmp_path / "run.log"
    first = run_proc(["run", small, "--out", out, "--model", model_path, "--workers", "0"])
    assert first.returncode == exit_codes.OK, first.stderr
    before = hashlib.sha256(out.read_bytes()).hexdigest()

    p = subprocess.Popen([sys.executable, "-m", "batchwbc", "run", str(slow_slides), "--out", str(out),
                          "--model", str(model_path), "--workers", "1", "--log-file", str(log)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: log.exists() and "found 800 crops" in log.read_text(), 60, "discovery")
        time.sleep(1.5)
        children = psutil.Process(p.pid).children(recursive=True)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == exit_codes.INTERRUPTED, err
    text = log.read_text()
    assert re.search(r"interrupted \(SIGTERM\) after \d+ of 800 cells", text), text
    assert "Traceback" not in err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before  # previous report intact
    assert leftovers(tmp_path, {"small", "report.xlsx", "run.log"}) == []  # no temp file, no lock
    _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10,
              "decode workers to exit")


@posix_only
def test_sigterm_while_writing_removes_temp_file(tmp_path, model_path, monkeypatch):
    """SIGTERM arrives after the new workbook is fully written to its temp file but before it
    replaces the old report: the old report must survive and the temp file must go."""
    from openpyxl.workbook.workbook import Workbook

    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out, log = tmp_path / "report.xlsx", tmp_path / "run.log"
    out.write_bytes(b"previous report")
    real_save = Workbook.save
    saved_to = []

    def save_then_sigterm(self, filename):
        real_save(self, filename)
        saved_to.append(Path(filename))
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            raise AssertionError("SIGTERM is not handled while the report is written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(Workbook, "save", save_then_sigterm)
    res = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0", "--log-file", log])
    assert res.exit_code == exit_codes.INTERRUPTED, res.output
    assert saved_to and not saved_to[0].exists()  # the temp file was written, then removed
    assert out.read_bytes() == b"previous report"
    assert leftovers(tmp_path, {"slides", "report.xlsx", "run.log"}) == []
    assert re.search(r"interrupted \(SIGTERM\) after .*writing the report", log.read_text()), log.read_text()


# =========================================================================== 4. concurrency
@pytest.fixture(scope="module")
def busy_slides(tmp_path_factory) -> Path:
    """80 large crops (hard links to one 1600x1600 JPEG): a run busy for a few seconds, long
    enough for a second run to meet its lock, short enough that the whole test costs seconds
    (the refusal message itself is covered in under a second by the next test)."""
    return fuzz_corpus.large_crop_slides(tmp_path_factory.mktemp("busy") / "slides", 2, 40, "P{:02d}")


def test_second_concurrent_run_is_refused(tmp_path, model_path, busy_slides):
    """A real run holds the lock; a second run on the same output is refused before touching
    a crop, and the first completes undisturbed and removes its lock."""
    out, log = tmp_path / "report.xlsx", tmp_path / "first.log"
    p = subprocess.Popen([sys.executable, "-m", "batchwbc", "run", str(busy_slides), "--out", str(out),
                          "--model", str(model_path), "--workers", "1", "--log-file", str(log)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: lock_path_for(out).exists() and lock_path_for(out).stat().st_size > 0, 60, "the first run's lock")
        second = run_cli(["run", busy_slides, "--out", out, "--model", model_path, "--workers", "0"])
        assert p.poll() is None, "the first run ended before the second was refused; give it more crops"
        assert second.exit_code == exit_codes.USAGE, second.output
        errs = error_lines(second.output)
        assert len(errs) == 1 and f"process {p.pid}" in errs[0] and "another batchwbc run" in errs[0], second.output
        assert "found" not in second.output  # refused before looking at any crop
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == exit_codes.OK, err  # the first run was not disturbed
    assert len(sheet_rows(out, "Cells")) == 80
    assert not lock_path_for(out).exists()


def test_run_refused_while_another_process_holds_the_lock(tmp_path, model_path):
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out = tmp_path / "r.xlsx"
    code = f"import sys; from batchwbc.ops.run_lock import RunLock\nwith RunLock({str(out)!r}):\n print('ok', flush=True); sys.stdin.readline()\n"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "ok"
        res = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0"])
        assert res.exit_code == exit_codes.USAGE
        assert f"process {holder.pid}" in res.output and "r.xlsx.lock" in res.output
        assert not out.exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)


def test_stale_lock_from_killed_run_is_taken_over(tmp_path, model_path):
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out, log = tmp_path / "r.xlsx", tmp_path / "run.log"
    killed = subprocess.Popen([sys.executable, "-c", f"from batchwbc.ops.run_lock import RunLock; RunLock({str(out)!r}).acquire(); import time; time.sleep(60)"],
                              cwd=REPO)
    _wait_for(lambda: lock_path_for(out).exists() and lock_path_for(out).stat().st_size > 0, 30, "the lock")
    killed.kill()  # SIGKILL: no cleanup, the lock stays behind
    killed.wait(timeout=30)
    assert json.loads(lock_path_for(out).read_text())["pid"] == killed.pid
    res = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0", "--log-file", log])
    assert res.exit_code == exit_codes.OK, res.output
    assert re.search(r"WARNING .*stale lock.*no longer running", log.read_text()), log.read_text()
    assert not lock_path_for(out).exists()
    assert len(sheet_rows(out, "Cells")) == 1


# =========================================================================== 3. cache
def _cache_slides(root: Path) -> None:
    col = tinymodel.colour_for
    for p, cls in (("P1", "lymphocyte"), ("P2", "neutrophil_segmented")):
        (root / p).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            (root / p / f"c{i}.png").write_bytes(png(col(cls)))
    # Mixed colours: uncertain cells (the review list), so thresholds matter.
    for i, (a, b) in enumerate([("lymphocyte", "basophil"), ("eosinophil", "platelet"), ("monocyte", "myelocyte")]):
        mix = tuple((np.array(col(a)) * 0.5 + np.array(col(b)) * 0.5).astype(int))
        (root / "P1" / f"mix{i}.png").write_bytes(png(mix))
    (root / "P2" / "broken.jpg").write_bytes(b"not an image")


def _grow(root: Path) -> int:
    """Add, change and delete files as a growing archive does; returns files to decode again."""
    col = tinymodel.colour_for
    (root / "P3").mkdir()
    for i in range(3):
        (root / "P3" / f"n{i}.png").write_bytes(png(col("eosinophil")))
    (root / "P1" / "c5.png").write_bytes(png(col("monocyte")))
    changed = root / "P2" / "c0.png"
    changed.write_bytes(png(col("basophil")))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (root / "P2" / "c1.png").unlink()
    return 3 + 1 + 1 + 1  # new P3 files + new P1 file + changed file + the broken file (errors are not cached)


@pytest.fixture
def decode_counter(monkeypatch):
    """Counts crops actually decoded in this process (the CLI runs with --workers 0)."""
    import batchwbc.engine.preprocess as pp

    calls = []
    real = pp.prepare_file

    def counting(path, *a, **k):
        calls.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(pp, "prepare_file", counting)
    return calls


@pytest.mark.parametrize("threshold", [None, "0.3", "1.0"])
def test_incremental_cached_run_equals_full_run(tmp_path, model_path, decode_counter, threshold):
    slides, db = tmp_path / "slides", tmp_path / "cache.sqlite"
    _cache_slides(slides)
    opts = ["--model", model_path, "--workers", "0"] + (["--review-threshold", threshold] if threshold else [])

    r1 = run_cli(["run", slides, "--out", tmp_path / "night1.xlsx", "--cache", db, *opts])
    assert r1.exit_code == exit_codes.PARTIAL, r1.output
    assert any(c["Review"] == "yes" for c in sheet_rows(tmp_path / "night1.xlsx", "Cells")) or threshold == "0.3"
    first_decodes = len(decode_counter)
    assert first_decodes == 14

    expected_decodes = _grow(slides)
    r2 = run_cli(["run", slides, "--out", tmp_path / "night2.xlsx", "--cache", db, *opts])
    assert r2.exit_code == exit_codes.PARTIAL, r2.output
    incremental_decodes = len(decode_counter) - first_decodes
    if threshold != "1.0":  # at 1.0 every cell needs review, and cached rows kept no thumbnail
        assert incremental_decodes == expected_decodes

    r3 = run_cli(["run", slides, "--out", tmp_path / "full.xlsx", *opts])
    assert r3.exit_code == exit_codes.PARTIAL, r3.output
    assert sheet_values(tmp_path / "night2.xlsx") == sheet_values(tmp_path / "full.xlsx")
    assert sheet_values(tmp_path / "night1.xlsx") != sheet_values(tmp_path / "full.xlsx")  # the test can tell


def test_cache_reused_when_threshold_changes(tmp_path, model_path, decode_counter):
    """Stored probabilities let the review flag be recomputed without decoding again."""
    slides, db = tmp_path / "slides", tmp_path / "cache.sqlite"
    _cache_slides(slides)
    base = ["--model", model_path, "--workers", "0", "--cache", db]
    assert run_cli(["run", slides, "--out", tmp_path / "a.xlsx", *base]).exit_code == exit_codes.PARTIAL
    n = len(decode_counter)
    assert run_cli(["run", slides, "--out", tmp_path / "b.xlsx", *base, "--review-threshold", "0.2"]).exit_code == exit_codes.PARTIAL
    assert len(decode_counter) - n == 1  # only the broken file
    review_a = sum(c["Review"] == "yes" for c in sheet_rows(tmp_path / "a.xlsx", "Cells"))
    review_b = sum(c["Review"] == "yes" for c in sheet_rows(tmp_path / "b.xlsx", "Cells"))
    assert review_a > review_b == 0


def test_other_model_invalidates_cache(tmp_path, model_path, decode_counter):
    slides, db = tmp_path / "slides", tmp_path / "cache.sqlite"
    _cache_slides(slides)
    other = tinymodel.build(tmp_path / "other.onnx", sharpness=5.0)  # another sha256, softer probabilities
    assert run_cli(["run", slides, "--out", tmp_path / "a.xlsx", "--model", model_path, "--workers", "0", "--cache", db]).exit_code == 3
    n = len(decode_counter)
    r = run_cli(["run", slides, "--out", tmp_path / "b.xlsx", "--model", other, "--workers", "0", "--cache", db])
    assert r.exit_code == exit_codes.PARTIAL, r.output
    assert len(decode_counter) - n == 14  # nothing reused
    full = run_cli(["run", slides, "--out", tmp_path / "c.xlsx", "--model", other, "--workers", "0"])
    assert full.exit_code == exit_codes.PARTIAL
    assert sheet_values(tmp_path / "b.xlsx") == sheet_values(tmp_path / "c.xlsx")
    assert sheet_values(tmp_path / "a.xlsx")["Cells"] != sheet_values(tmp_path / "b.xlsx")["Cells"]


@pytest.mark.parametrize("content", [b"this is not a database\n" * 50, b"SQLite format 3\x00" + b"\x00" * 200])
def test_unusable_cache_file_refused_before_work(tmp_path, model_path, content):
    slides = tmp_path / "slides"
    _cache_slides(slides)
    db = tmp_path / "cache.sqlite"
    db.write_bytes(content)
    out = tmp_path / "r.xlsx"
    r = run_cli(["run", slides, "--out", out, "--model", model_path, "--workers", "0", "--cache", db])
    assert r.exit_code == exit_codes.USAGE, r.output
    errs = error_lines(r.output)
    assert len(errs) == 1 and "cache" in errs[0] and "Traceback" not in r.output
    assert "found" not in r.output and not out.exists() and not lock_path_for(out).exists()
    assert db.read_bytes() == content  # the user's file is not touched


# =========================================================================== 6. model integrity
def _float_input_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto

    tinymodel.build(path)
    m = onnx.load(str(path))
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.save(m, str(path))
    return path


def _bad_models(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model file, a word the one-sentence refusal must contain)."""
    good = tinymodel.build(tmp / "good.onnx").read_bytes()
    (tmp / "random.onnx").write_bytes(os.urandom(4000))
    (tmp / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "text.onnx").write_text("<html>download failed</html>")
    return {
        "random bytes": (tmp / "random.onnx", "not a valid ONNX model"),
        "truncated": (tmp / "truncated.onnx", "not a valid ONNX model"),
        "empty file": (tmp / "empty.onnx", "not a valid ONNX model"),
        "html page": (tmp / "text.onnx", "not a valid ONNX model"),
        "missing file": (tmp / "nope.onnx", "does not exist"),
        "float input": (_float_input_model(tmp / "float.onnx"), "uint8"),
        "no metadata": (tinymodel.build(tmp / "nometa.onnx", drop_keys=(bm.KEY_CLASSES, bm.KEY_PREPROCESSING)), "not a batchwbc model"),
        "unknown class": (tinymodel.build(tmp / "alien.onnx", classes=("lymphocyte", "alien_cell")), "alien_cell"),
        "other preprocessing": (tinymodel.build(tmp / "pre.onnx", metadata={bm.KEY_PREPROCESSING: "keras-imagenet-v0"}), "preprocessing"),
        "size mismatch": (tinymodel.build(tmp / "size.onnx", metadata={bm.KEY_INPUT_SIZE: "64"}), "disagrees"),
        "class count mismatch": (tinymodel.build(tmp / "count.onnx", metadata={bm.KEY_CLASSES: json.dumps(["lymphocyte", "monocyte"])}), "scores"),
        "newer format": (tinymodel.build(tmp / "fmt.onnx", metadata={bm.KEY_FORMAT: "99"}), "format"),
    }


BAD_MODEL_CASES = ["random bytes", "truncated", "empty file", "html page", "missing file", "float input", "no metadata",
                   "unknown class", "other preprocessing", "size mismatch", "class count mismatch", "newer format"]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    return _bad_models(tmp_path_factory.mktemp("badmodels"))


@pytest.mark.parametrize("case", BAD_MODEL_CASES)
def test_bad_model_refused_with_one_sentence_before_work(tmp_path, bad_models, case, monkeypatch):
    import batchwbc.inputs.slide_folders as discovery

    path, word = bad_models[case]
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    out = tmp_path / "r.xlsx"
    out.write_bytes(b"previous report")

    def no_discovery(root):
        raise AssertionError("discovery started although the model is unusable")

    monkeypatch.setattr(discovery, "discover", no_discovery)
    r = run_cli(["run", slides, "--out", out, "--model", path, "--workers", "0"])
    assert r.exit_code == exit_codes.USAGE, r.output
    errs = error_lines(r.output)
    assert len(errs) == 1, r.output
    assert word in errs[0], errs[0]
    assert "Traceback" not in r.output and errs[0].rstrip().endswith(".")
    assert out.read_bytes() == b"previous report" and not lock_path_for(out).exists()


def test_good_model_accepted_by_info(model_path):
    r = run_cli(["info", "--model", model_path, "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["model_version"] == "tiny-test-1"


# =========================================================================== 5. operations
def test_quiet_prints_only_problems(tmp_path, model_path):
    slides = tmp_path / "slides"
    _cache_slides(slides)
    r = run_cli(["run", slides, "--out", tmp_path / "r.xlsx", "--model", model_path, "--workers", "0", "--quiet",
                 "--log-file", tmp_path / "log"])
    assert r.exit_code == exit_codes.PARTIAL
    assert " INFO " not in r.stderr and " WARNING " in r.stderr
    assert "summary:" in (tmp_path / "log").read_text()  # the log file still has everything


def test_log_file_appends_across_runs(tmp_path, model_path):
    slides = tmp_path / "slides"
    (slides / "P1").mkdir(parents=True)
    (slides / "P1" / "a.png").write_bytes(png(tinymodel.colour_for("monocyte")))
    log = tmp_path / "nightly.log"
    for _ in range(2):
        assert run_cli(["run", slides, "--out", tmp_path / "r.xlsx", "--model", model_path, "--workers", "0",
                        "--log-file", log]).exit_code == exit_codes.OK
    assert len(re.findall(r"1 patients, 1 crops read \(\d classified, \d unclassified\), 0 unreadable", log.read_text())) == 2
