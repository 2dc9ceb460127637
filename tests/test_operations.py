"""Operations: an empty slides folder, a hard-killed run's workers, onnxruntime's own output."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fuzz_corpus
import tinymodel
from batchwbc.ops import exit_codes
from batchwbc.ops.run_lock import lock_path_for
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
    assert r.exit_code == exit_codes.NO_INPUT == 4, r.output
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
    assert r.exit_code == exit_codes.OK, r.output
    assert sheet_rows(out, "Cells") == []
    patients = [row["Patient"] for row in sheet_rows(out, "Summary")]
    assert patients == ([] if kind == "empty" else ["P1", "P2"])


def test_no_input_code_is_documented():
    from batchwbc.cli import main

    assert "4 no images" in (main.help or "")
    for doc in ("README.md", "docs/usage.md", "docs/operations.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
        assert "--allow-empty" in text and "| 4 " in text, doc


# =========================================================================== hard kill of the parent
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and re-parenting are POSIX")

_GRANDCHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from batchwbc.ops import parent_watch
if {poll_only!r}:
    import threading
    threading.Thread(target=parent_watch._poll_ppid, args=(os.getppid(), 0.2), daemon=True).start()
else:
    parent_watch.watch_parent(os.getppid())
print(os.getpid(), flush=True)
time.sleep(120)
"""
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {code!r}], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def _gone_within(pids, seconds: float) -> list[int]:
    """pids still alive (zombies count as gone) after waiting up to `seconds`."""
    import psutil

    end = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < end:
        still = []
        for pid in alive:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    still.append(pid)
            except psutil.NoSuchProcess:
                pass
        alive = still
        if alive:
            time.sleep(0.1)
    return alive


@posix_only
@pytest.mark.parametrize("poll_only", [False, True], ids=["watch_parent", "getppid-thread-alone"])
def test_watched_child_exits_when_its_parent_is_killed(poll_only):
    code = _GRANDCHILD.format(repo=str(REPO), poll_only=poll_only)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT.format(code=code)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _gone_within([child_pid], 0.5) == [child_pid]  # alive while the parent lives
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone_within([child_pid], 5) == [], "the child outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.fixture(scope="module")
def many_crops(tmp_path_factory) -> Path:
    """600 large crops (hard links to one 1600x1600 JPEG): decoding takes many seconds."""
    return fuzz_corpus.large_crop_slides(tmp_path_factory.mktemp("many") / "slides", 6, 100, "P{}")


@posix_only
@pytest.mark.slow
def test_sigkill_of_the_run_ends_its_decode_workers(tmp_path, model_path, many_crops):
    import psutil

    out, log = tmp_path / "r.xlsx", tmp_path / "run.log"
    run = subprocess.Popen([sys.executable, "-m", "batchwbc", "run", str(many_crops), "--out", str(out),
                            "--model", str(model_path), "--workers", "2", "--log-file", str(log)],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = psutil.Process(run.pid)
        end = time.monotonic() + 60
        workers: list = []
        everyone: list[int] = []
        while time.monotonic() < end:  # both decode workers started and the run is classifying
            workers = [c for c in proc.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
            if len(workers) >= 2 and "found 600 crops" in (log.read_text() if log.exists() else ""):
                break
            time.sleep(0.05)
        assert len(workers) >= 2, "the run never started its decode workers"
        time.sleep(1.0)  # mid-run: workers busy decoding
        everyone = [c.pid for c in proc.children(recursive=True)]
        assert run.poll() is None, "the run finished before it could be killed; give it more crops"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        left = _gone_within(everyone, 5)
        assert left == [], f"processes of the killed run still running: {left}"
        assert not out.exists()  # nothing half-written in its place
    finally:  # never leave this test's processes behind, whatever failed
        if run.poll() is None:
            run.kill()
        for pid in everyone:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def many_labelled(tmp_path_factory) -> Path:
    """A LABELLED folder of 600 large crops in two classes (for adapt and evaluate)."""
    lab = tmp_path_factory.mktemp("lab") / "LAB"
    for cls in ("lymphocyte", "monocyte"):
        fuzz_corpus.large_crop_slides(lab / cls, 3, 100, "P{}")
    return lab


@posix_only
@pytest.mark.slow
@pytest.mark.parametrize("command", ["adapt", "evaluate"])
def test_sigkill_of_adapt_or_evaluate_ends_its_decode_workers(tmp_path, many_labelled, command):
    """adapt (embed.py) and evaluate decode in the same worker pool as run, whose workers
    watch the parent's pid: a kill -9 of the command leaves no worker behind."""
    import onnx
    import psutil

    from batchwbc.engine.onnx_graph import add_embedding_output

    plain = tinymodel.build(tmp_path / "plain.onnx")
    model = tmp_path / "tiny.onnx"
    onnx.save(add_embedding_output(onnx.load(str(plain))), str(model))
    out = tmp_path / ("a.onnx" if command == "adapt" else "e.xlsx")
    cmd = [sys.executable, "-m", "batchwbc", command, str(many_labelled), "--out", str(out), "--model", str(model),
           "--workers", "2"]
    proc_ = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    everyone: list[int] = []
    try:
        proc = psutil.Process(proc_.pid)
        end = time.monotonic() + 60
        workers: list = []
        while time.monotonic() < end and len(workers) < 2:  # both decode workers started
            workers = [c for c in proc.children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
            time.sleep(0.05)
        assert len(workers) >= 2, f"{command} never started its decode workers"
        time.sleep(1.0)  # mid-run: workers busy decoding
        everyone = [c.pid for c in proc.children(recursive=True)]
        assert proc_.poll() is None, f"{command} finished before it could be killed; give it more crops"
        proc_.send_signal(signal.SIGKILL)
        proc_.wait(timeout=10)
        left = _gone_within(everyone, 5)
        assert left == [], f"processes of the killed {command} still running: {left}"
        assert not out.exists()
    finally:  # never leave this test's processes behind, whatever failed
        if proc_.poll() is None:
            proc_.kill()
        for pid in everyone:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


# =========================================================================== onnxruntime output
def _model_with_unused_initializer(path: Path) -> Path:
    """The tiny model plus a weight no node uses: onnxruntime warns about it at load, in colour."""
    import onnx
    from onnx import TensorProto, helper

    tinymodel.build(path)
    m = onnx.load(str(path))
    m.graph.initializer.append(helper.make_tensor("unused_weight", TensorProto.FLOAT, [2], [1.0, 2.0]))
    onnx.save(m, str(path))
    return path


def test_classifier_silences_onnxruntime_before_its_session(tmp_path, monkeypatch):
    import onnxruntime as ort

    from batchwbc.engine.model import Classifier

    calls: list = []
    monkeypatch.setattr(ort, "set_default_logger_severity", lambda level: calls.append(("severity", level)))
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append(("telemetry off",)), raising=False)
    real_session = ort.InferenceSession

    def session(*a, **k):
        calls.append(("session", k["sess_options"].log_severity_level))
        return real_session(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", session)
    Classifier(tinymodel.build(tmp_path / "m.onnx"))
    assert calls == [("severity", 3), ("telemetry off",), ("session", 3)]


def test_quiet_without_telemetry_switch_still_works(tmp_path, monkeypatch):
    """Older or other onnxruntime builds lack disable_telemetry_events."""
    import onnxruntime as ort

    from batchwbc.ops.ort_quiet import quiet_session_options

    monkeypatch.delattr(ort, "disable_telemetry_events", raising=False)
    assert quiet_session_options().log_severity_level == 3


@pytest.mark.parametrize("which", ["unused-initializer model", "bundled model"])
def test_quiet_successful_run_leaves_stderr_empty(tmp_path, which):
    from batchwbc.engine.model import DEFAULT_MODEL_PATH

    if which == "bundled model":
        if not DEFAULT_MODEL_PATH.is_file():
            pytest.skip("no bundled model in this checkout")
        model = DEFAULT_MODEL_PATH
    else:
        model = _model_with_unused_initializer(tmp_path / "unused.onnx")
    r = subprocess.run([sys.executable, "-m", "batchwbc", "run", str(SAMPLES), "--out", str(tmp_path / "r.xlsx"),
                        "--model", str(model), "--workers", "1", "--quiet"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == exit_codes.OK, r.stderr
    # Nothing but batchwbc's own log lines: the bundled model rightly warns DATA_SHIFT on the
    # synthetic drawings in samples/, which is batchwbc's own warning, not onnxruntime's noise.
    own = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (WARNING|ERROR) ")
    foreign = [line for line in r.stderr.splitlines() if line and not own.match(line)]
    assert not foreign and r.stdout == "", (r.stdout, r.stderr)
    assert "\x1b[" not in r.stderr  # no ANSI colour codes from onnxruntime's logger
