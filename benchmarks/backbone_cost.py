"""Inference cost of candidate backbones as the runtime would pay it (ADR 0010).

Builds each candidate's whole classifier (the project's head, random weights: cost does not
depend on the weights), converts it with the export's own tf2onnx path, and times onnxruntime
on 1 thread at batch 4 (the runtime's default batch), interleaving the candidates so machine
load hits them alike. Prints the median ms/crop per candidate and its ratio to the first.

    python benchmarks/backbone_cost.py --sizes 128 144 --repeats 15
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CANDIDATES = ("mobilenet_025", "mobilenet_075", "efficientnet_lite0")


def build(name: str, size: int):
    import keras

    from train.models import build_core

    if name == "mobilenet_075":  # the offline alpha-0.75 weights file's network (same head)
        net = keras.applications.MobileNet(input_shape=(size, size, 3), include_top=False, weights=None,
                                           pooling="avg", alpha=0.75)
        inp = keras.Input((size, size, 3))
        x = keras.layers.Dense(256, activation="relu")(keras.layers.BatchNormalization()(net(inp)))
        return keras.Model(inp, keras.layers.Dense(13)(x))
    core, _ = build_core(name, size, 13)
    return core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 144])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    import onnxruntime as ort

    from batchwbc.ops.ort_quiet import quiet_session_options
    from export.convert import to_onnx

    rng = np.random.default_rng(0)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for name in CANDIDATES:
                proto, _ = to_onnx(build(name, size), size, 1.0, 17)
                path = Path(tmp) / f"{name}-{size}.onnx"
                path.write_bytes(proto.SerializeToString())
                opts = quiet_session_options()
                opts.intra_op_num_threads = 1
                sessions[(name, size)] = ort.InferenceSession(str(path), sess_options=opts,
                                                              providers=["CPUExecutionProvider"])
        times: dict = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for (name, size), sess in sessions.items():
                x = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
                iname = sess.get_inputs()[0].name
                sess.run(None, {iname: x})
                t = time.perf_counter()
                for _ in range(5):
                    sess.run(None, {iname: x})
                times[(name, size)].append((time.perf_counter() - t) / (5 * args.batch) * 1000)
    base = {size: float(np.median(times[(CANDIDATES[0], size)])) for size in args.sizes}
    print(f"{'backbone':20s}{'size':>6s}{'ms/crop':>10s}{'x base':>8s}")
    for (name, size), ts in times.items():
        med = float(np.median(ts))
        print(f"{name:20s}{size:6d}{med:10.2f}{med / base[size]:8.2f}")


if __name__ == "__main__":
    main()
