"""Memory benchmark: does a very large run keep a flat memory profile?

A nightly run over a growing archive may see 50,000+ crops. This builds such a slides folder
cheaply (hard links, or symlinks across file systems, to a few hundred distinct crops spread
over many patient folders), runs the real CLI in a subprocess and samples the resident memory
of the whole process tree (main process + decode workers) with psutil. It prints the peak and
the RSS at 10 %, 50 % and 90 % of classification, plus the peak while the workbook is written,
so flatness (or growth per cell) is visible at a glance.

Not a test: it takes minutes at 50,000 crops. Examples:

    python benchmarks/bench_memory.py                      # 50,000 crops, bundled model
    python benchmarks/bench_memory.py -n 2000 --workers 1  # quick check
    python benchmarks/bench_memory.py --model m.onnx --source synthetic --json
    python benchmarks/bench_memory.py -n 5000 --review-threshold 0   # other options go to `batchwbc run`

Progress is read from the run's log (the CLI logs "X of N cells" every 30 s when not on a
terminal); between those lines it is interpolated linearly in time.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "PBC_dataset_normal_DIB"

_FOUND = re.compile(r"found (\d+) crops")
_PROGRESS = re.compile(r"(\d+) of (\d+) cells \(")
_SUMMARY = re.compile(r"summary: .*")


# ----------------------------------------------------------------------------- inputs
def real_sources(k: int) -> list[Path]:
    """Up to k real crops, round-robin over the class folders (hidden junk files skipped)."""
    if not SHARED_DATA.is_dir():
        return []
    per_class = [sorted(p for p in d.glob("*.jpg") if not p.name.startswith(".")) for d in sorted(SHARED_DATA.iterdir()) if d.is_dir()]
    out: list[Path] = []
    i = 0
    while len(out) < k and any(i < len(c) for c in per_class):
        out.extend(c[i] for c in per_class if i < len(c))
        i += 1
    return out[:k]


def synthetic_sources(folder: Path, k: int, size: int = 360) -> list[Path]:
    """k distinct smooth JPEG crops of about the size an analyzer exports."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for i in range(k):
        a, b, c = rng.random(3)
        img = np.dstack([(np.sin(6 * xx * a + i) + 1) * 110, (np.cos(5 * yy * b) + 1) * 110, (xx * yy * c) * 255])
        p = folder / f"src{i:04d}.jpg"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        out.append(p)
    return out


def build_slides(root: Path, sources: list[Path], n: int, per_patient: int) -> None:
    """n crops as links to `sources`, `per_patient` per patient folder."""
    root.mkdir(parents=True, exist_ok=True)
    link = os.link
    for i in range(n):
        d = root / f"P{i // per_patient:05d}"
        if i % per_patient == 0:
            d.mkdir()
        src, dst = sources[i % len(sources)], d / f"cell_{i:06d}.jpg"
        try:
            link(src, dst)
        except OSError:  # another file system (or no hard links): symlinks work as well
            link = os.symlink
            link(src, dst)


def default_model(workdir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from batchwbc.engine.model import DEFAULT_MODEL_PATH

    if DEFAULT_MODEL_PATH.is_file():
        return DEFAULT_MODEL_PATH
    sys.path.insert(0, str(REPO / "tests"))
    import tinymodel  # needs the `test` extra (onnx)

    print("bundled model not found; using the tiny test model (decode cost is realistic, inference is not)")
    return tinymodel.build(workdir / "tiny.onnx", size=224)


# ----------------------------------------------------------------------------- sampling
@dataclass
class Trace:
    t: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # whole tree, bytes
    main_rss: list[int] = field(default_factory=list)
    procs: list[int] = field(default_factory=list)
    marks: list[tuple[float, int]] = field(default_factory=list)  # (t, cells done) from the log
    total: int | None = None
    t_found: float | None = None


def tree_rss(proc) -> tuple[int, int, int]:
    import psutil

    try:
        main = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0, 0
    total = main
    for k in kids:
        try:
            total += k.memory_info().rss
        except psutil.Error:
            pass
    return total, main, 1 + len(kids)


def read_log(log: Path, trace: Trace, now: float, pos: int) -> int:
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            fh.seek(pos)
            chunk = fh.read()
            pos = fh.tell()
    except FileNotFoundError:
        return pos
    for line in chunk.splitlines():
        if trace.total is None and (m := _FOUND.search(line)):
            trace.total, trace.t_found = int(m.group(1)), now
            trace.marks.append((now, 0))
        elif m := _PROGRESS.search(line):
            trace.marks.append((now, int(m.group(1))))
    return pos


def progress_at(trace: Trace, t: float) -> float | None:
    """Fraction of cells done at time t, interpolated between log marks."""
    if not trace.marks or not trace.total or t < trace.marks[0][0]:
        return None
    times = [m[0] for m in trace.marks]
    i = bisect.bisect_right(times, t) - 1
    t0, d0 = trace.marks[i]
    if i + 1 < len(trace.marks):
        t1, d1 = trace.marks[i + 1]
        d = d0 + (d1 - d0) * (t - t0) / max(1e-9, t1 - t0)
    else:
        d = d0
    return min(1.0, d / trace.total)


def run_and_sample(cmd: list[str], log: Path, interval: float) -> tuple[int, Trace, float]:
    import psutil

    trace = Trace()
    t_start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = psutil.Process(p.pid)
    pos = 0
    while p.poll() is None:
        now = time.monotonic() - t_start
        total, main, n = tree_rss(proc)
        if total:
            trace.t.append(now)
            trace.rss.append(total)
            trace.main_rss.append(main)
            trace.procs.append(n)
        pos = read_log(log, trace, now, pos)
        time.sleep(interval)
    wall = time.monotonic() - t_start
    read_log(log, trace, wall, pos)
    return p.returncode, trace, wall


def classification_end(trace: Trace, wall: float) -> float:
    """When classification ended: the last progress mark at 100 %, else the end of the run."""
    for t, d in trace.marks:
        if trace.total and d >= trace.total:
            return t
    return wall


def summarize(trace: Trace, rc: int, wall: float, log_text: str, n: int) -> dict:
    mb = 1 / (1024 * 1024)
    t_class_end = classification_end(trace, wall)
    # Without 100 % mark, assume progress reached the end at the last mark's rate.
    if trace.marks and trace.total and trace.marks[-1][1] < trace.total:
        t_last, d_last = trace.marks[-1]
        if len(trace.marks) >= 2 and d_last > 0:
            rate = d_last / max(1e-9, t_last - trace.marks[0][0])
            t_class_end = min(wall, t_last + (trace.total - d_last) / max(rate, 1e-9))
        else:
            t_class_end = wall * 0.98  # tiny runs: classification is nearly the whole run
        trace.marks.append((t_class_end, trace.total))
    at = {}
    for f in (0.1, 0.5, 0.9):
        idx = next((i for i, t in enumerate(trace.t) if (progress_at(trace, t) or 0) >= f), None)
        at[f"rss_mb_at_{int(f * 100)}pct"] = round(trace.rss[idx] * mb, 1) if idx is not None else None
    writing = [r for t, r in zip(trace.t, trace.rss) if t >= t_class_end]
    classifying = [r for t, r in zip(trace.t, trace.rss) if trace.t_found is not None and trace.t_found <= t < t_class_end]
    summary_line = next((m.group(0) for m in _SUMMARY.finditer(log_text)), None)
    out = {
        "crops": n,
        "exit_code": rc,
        "wall_s": round(wall, 1),
        "cells_per_s": round(n / wall, 1) if wall else None,
        "samples": len(trace.t),
        "max_processes": max(trace.procs, default=0),
        "peak_rss_mb": round(max(trace.rss, default=0) * mb, 1),
        "peak_main_rss_mb": round(max(trace.main_rss, default=0) * mb, 1),
        "peak_rss_mb_classifying": round(max(classifying, default=0) * mb, 1),
        "peak_rss_mb_writing": round(max(writing) * mb, 1) if writing else None,
        **at,
        "summary": summary_line,
    }
    if at["rss_mb_at_10pct"] and at["rss_mb_at_90pct"]:
        out["growth_10_to_90pct_mb"] = round(at["rss_mb_at_90pct"] - at["rss_mb_at_10pct"], 1)
        out["growth_per_1000_cells_kb"] = round(1024 * out["growth_10_to_90pct_mb"] / (0.8 * n / 1000), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--crops", type=int, default=50_000)
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: bundled, else a tiny test model)")
    ap.add_argument("--source", default="auto", help="'auto' (real crops from ../shared/data if present), 'synthetic', or a folder of JPEGs")
    ap.add_argument("--distinct", type=int, default=300, help="distinct source crops the links point to")
    ap.add_argument("--per-patient", type=int, default=100, help="crops per patient folder")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the slides (default: a temp folder, removed)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args, cli_extra = ap.parse_known_args(argv)  # anything else goes to `batchwbc run` as is

    try:
        import psutil  # noqa: F401
    except ImportError:
        print("this benchmark needs psutil (pip install -e .[test])", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="batchwbc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.source == "synthetic":
            sources = synthetic_sources(work / "sources", args.distinct)
        elif args.source == "auto":
            sources = real_sources(args.distinct) or synthetic_sources(work / "sources", args.distinct)
        else:
            sources = sorted(p for p in Path(args.source).rglob("*.jpg") if not p.name.startswith("."))[: args.distinct]
        if not sources:
            print("no source crops found", file=sys.stderr)
            return 2
        slides = work / "slides"
        if slides.exists():
            shutil.rmtree(slides)
        t0 = time.monotonic()
        build_slides(slides, sources, args.crops, args.per_patient)
        print(f"built {args.crops} crops ({len(sources)} distinct) in {time.monotonic() - t0:.1f} s under {slides}", file=sys.stderr)
        model = args.model or default_model(work)
        out, log = work / "report.xlsx", work / "run.log"
        for f in (out, log):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "batchwbc", "run", str(slides), "--out", str(out), "--model", str(model), "--log-file", str(log)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.batch_size is not None:
            cmd += ["--batch-size", str(args.batch_size)]
        cmd += cli_extra
        rc, trace, wall = run_and_sample(cmd, log, args.interval)
        log_text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        result = summarize(trace, rc, wall, log_text, args.crops)
        result["command"] = " ".join(cmd[1:])
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            width = max(len(k) for k in result)
            for k, v in result.items():
                print(f"{k.ljust(width)}  {v}")
        if rc not in (0, 3):
            print(log_text[-3000:], file=sys.stderr)
        return 0 if rc in (0, 3) else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
