"""The pipeline's overhead against an ideal, as issue 11 defines it, in one run.

Three rates on the same real crops, measured alternately after a warm-up:
- decode only: plain OpenCV read + resize to the model's size in 2 processes (the model's own
  framing is *pipeline* work, so it is not in this baseline);
- model only: onnxruntime alone on pre-decoded batches of 4, 2 threads;
- end to end: the whole `batchwbc run` CLI (discovery, framing, model, workbook, thumbnails).
Ideal = 1 / (1/decode + 1/model): what a pipeline with no overhead would reach doing both on
the same cores. Reported: each rate's median, end to end / ideal (target >= 0.80) and the
end-to-end rate (target >= 250 crops/s on this 2-core PC).

    python benchmarks/bench_ideal.py --data ../shared/data --n 5000 [--model PATH] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_run import build_slides  # noqa: E402


def _decode(args: tuple[str, int]) -> int:
    import cv2
    import numpy as np

    path, size = args
    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:  # a truncated file: the pipeline lists it in Errors, the baseline skips it
        return 0
    cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return 1


def decode_rate(files: list[str], size: int, workers: int = 2) -> float:
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        n = sum(pool.map(_decode, [(f, size) for f in files], chunksize=64))
    return n / (time.perf_counter() - t)


def model_rate(model: Path | None, size: int, n: int, threads: int = 2, batch: int = 4) -> float:
    import numpy as np
    import onnxruntime as ort

    from batchwbc.engine.model import DEFAULT_MODEL_PATH
    from batchwbc.ops.ort_quiet import quiet_session_options

    opts = quiet_session_options()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model or DEFAULT_MODEL_PATH), sess_options=opts, providers=["CPUExecutionProvider"])
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    sess.run([out], {name: x})
    t = time.perf_counter()
    for _ in range(n // batch):
        sess.run([out], {name: x})
    return (n // batch) * batch / (time.perf_counter() - t)


def e2e_rate(slides: Path, model: Path | None, n: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "batchwbc", "run", str(slides), "--out", str(out), "--quiet"]
    if model:
        cmd += ["--model", str(model)]
    t = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from batchwbc.engine.model import Classifier, DEFAULT_MODEL_PATH

    size = Classifier(args.model or DEFAULT_MODEL_PATH, threads=1).info.input_size
    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        build_slides(args.data, args.n, slides, 200, 0)
        files = sorted(str(p) for p in slides.rglob("*") if p.is_file() or p.is_symlink())
        decode_rate(files[:500], size)  # warm-up: page cache and imports
        d, m, e = [], [], []
        for _ in range(args.repeats):
            d.append(decode_rate(files, size))
            m.append(model_rate(args.model, size, min(args.n, 2000)))
            e.append(e2e_rate(slides, args.model, len(files), Path(tmp) / "r.xlsx"))
    dm, mm, em = statistics.median(d), statistics.median(m), statistics.median(e)
    ideal = 1 / (1 / dm + 1 / mm)
    print(f"crops {len(files)}, model {args.model or DEFAULT_MODEL_PATH} ({size} px), repeats {args.repeats}")
    print(f"decode only {dm:.0f}/s, model only {mm:.0f}/s, ideal {ideal:.0f}/s, end to end {em:.0f}/s, "
          f"end to end / ideal {em / ideal:.2f}")


if __name__ == "__main__":
    main()
