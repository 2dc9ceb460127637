"""End-to-end throughput against a decode-only baseline, and peak memory, on real crops.

Why a baseline in the same run: a lab PC's speed, disk and background load vary more than
the code does; the ratio "end to end / decode only" on the same files, workers and moment
says how much the model step costs, independent of the machine. Both are the real pipeline
(discovery, worker pool, batching, per-cell records with review thumbnails); the baseline
only skips the model call. Runs alternate (baseline, model, baseline, model, ...) after one
untimed warm-up pass, so page cache and background load hit both alike; medians are reported.
Peak RSS is the sum over the whole process tree (main + decode workers), sampled by psutil.

    python benchmarks/bench_run.py --data ../shared/data --n 3000 [--model PATH] [--repeats 3]
    python benchmarks/bench_run.py --data ../shared/data --n 20000 --repeats 1   # memory at 20k
    python benchmarks/bench_run.py --data ../shared/data --n 2000 --sweep "1:1,1:2,2:1,2:2"

--sweep takes workers:threads[:spin] items (decode processes : onnxruntime threads, and
whether onnxruntime threads may busy-wait; the CLI turns that off) to compare.
The report-writing step is not included (see benchmarks/bench_memory.py for the full CLI).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class TreeRss:
    """Samples the resident memory of this process and all its children."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        procs = [self._proc]
        try:
            procs += self._proc.children(recursive=True)
        except self._psutil.Error:
            pass
        for p in procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeRss":
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def build_slides(data: Path, n: int, dest: Path, per_patient: int, seed: int) -> int:
    """Symlink n real crops (cycling if the data has fewer) into patient folders."""
    import numpy as np

    from batchwbc.inputs.public_datasets import read_any

    items = read_any(data).items
    if not items:
        raise SystemExit(f"no labelled images found in {data}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    for i in range(n):
        src = items[int(order[i % len(items)])].path
        folder = dest / f"P{i // per_patient:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(src), folder / f"c{i:06d}{src.suffix.lower()}")
    return len(items)


def timed_run(slides: Path, size: int, classifier, workers: int, batch: int, threshold: float,
              preprocessing: str | None = None) -> tuple[float, int, int, int]:
    """(seconds, cells done, peak tree RSS, review cells) for discovery + pipeline.

    The baseline (classifier None) must prepare crops with the model's own contract, or the
    ratio would compare two different decoding costs."""
    from batchwbc.core.config import Settings
    from batchwbc.inputs.slide_folders import discover
    from batchwbc.engine.pipeline import Pipeline

    with TreeRss() as rss:
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        crops = discover(slides).crops
        out = Pipeline(size, classifier, threshold, workers=workers, batch_size=batch,
                       max_thumbnails=Settings().review_max_images, preprocessing=preprocessing).run(crops)  # as the CLI does
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - c0
    done = out.decoded if classifier is None else len(out.cells)
    return seconds, done, rss.peak, sum(c.review for c in out.cells), cpu


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished (joined) children, i.e. the worker pool.

    Unlike wall time it hardly depends on what else the machine runs, so it shows the
    pipeline's intrinsic cost per crop even on a busy box."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(slides: Path, model: Path, workers: int, threads: int, batch: int, repeats: int,
            review_threshold: float | None = None, spinning: bool = False) -> dict:
    from batchwbc.engine.model import Classifier

    clf = Classifier(model, threads=threads, spinning=spinning)
    size = clf.info.input_size
    pre = clf.info.preprocessing
    threshold = review_threshold
    if threshold is None:
        threshold = clf.info.review_threshold if clf.info.review_threshold is not None else 0.5
    timed_run(slides, size, None, workers, batch, threshold, pre)  # warm-up: page cache, imports
    base, full, base_rss, full_rss, base_cpu, full_cpu = [], [], [], [], [], []
    n = n_review = 0
    for _ in range(repeats):
        s, n, peak, _, cpu = timed_run(slides, size, None, workers, batch, threshold, pre)
        base.append(n / s)
        base_rss.append(peak)
        base_cpu.append(1000.0 * cpu / max(1, n))
        s, n2, peak, n_review, cpu = timed_run(slides, size, clf, workers, batch, threshold)
        full.append(n2 / s)
        full_rss.append(peak)
        full_cpu.append(1000.0 * cpu / max(1, n2))
    med_b, med_f = statistics.median(base), statistics.median(full)
    return {
        "workers": workers, "onnx_threads": threads, "onnx_spinning": spinning, "batch_size": batch, "cells": n,
        "review_threshold": threshold, "review_cells_pct": round(100.0 * n_review / max(1, n), 1),
        "decode_only_cells_per_s": [round(x, 1) for x in base],
        "end_to_end_cells_per_s": [round(x, 1) for x in full],
        "median_decode_only": round(med_b, 1), "median_end_to_end": round(med_f, 1),
        "ratio": round(med_f / med_b, 3),
        # The ratio a machine whose cores are all busy would reach, from CPU time alone:
        "cpu_bound_ratio": round(statistics.median(base_cpu) / statistics.median(full_cpu), 3),
        "cpu_ms_per_crop_decode_only": round(statistics.median(base_cpu), 2),
        "cpu_ms_per_crop_end_to_end": round(statistics.median(full_cpu), 2),
        "peak_rss_mb_decode_only": round(max(base_rss) / 2**20, 1),
        "peak_rss_mb_end_to_end": round(max(full_rss) / 2**20, 1),
    }


def main() -> None:
    from batchwbc.commands.run import inference_threads
    from batchwbc.engine.model import DEFAULT_MODEL_PATH, Classifier
    from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE, default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="default: the CLI's default (all cores)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads; default: the CLI's choice")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ap.add_argument("--sweep", default=None, help='workers:threads[:spin] items, e.g. "1:2,2:1,2:2,2:2:spin"')
    ap.add_argument("--review-threshold", type=float, default=None,
                    help="default: the model's; review cells cost a thumbnail each (an untrained proxy sends all)")
    ap.add_argument("--per-patient", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    model = args.model or DEFAULT_MODEL_PATH
    if not Path(model).is_file():
        raise SystemExit(f"model {model} does not exist; pass --model PATH (e.g. tests' tiny model or a proxy)")
    info = Classifier(model, threads=1).info
    workers = default_workers() if args.workers is None else args.workers
    threads = inference_threads(os.cpu_count() or 1) if args.threads is None else args.threads
    configs = [(workers, threads, False)]
    if args.sweep:
        configs = []
        for item in args.sweep.split(","):
            parts = item.strip().split(":")
            configs.append((int(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "spin"))

    with tempfile.TemporaryDirectory(prefix="bench_run_") as tmp:
        slides = Path(tmp) / "slides"
        unique = build_slides(args.data, args.n, slides, args.per_patient, args.seed)
        header = {
            "model": str(model), "model_version": info.model_version, "input_size": info.input_size, "preprocessing": info.preprocessing,
            "crops": args.n, "unique_images": min(unique, args.n), "cpus": os.cpu_count(),
            "repeats": args.repeats, "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        }
        print(json.dumps(header))
        results = []
        for w, t, spin in configs:
            r = measure(slides, model, w, t, args.batch_size, args.repeats, args.review_threshold, spin)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"run": header, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
