"""Build an untrained stand-in for the bundled model, with the real architecture's cost.

Throughput depends on the network's size, not on its weights; until the trained model
exists this gives the benchmark a model that costs what the shipped one will (the training
default backbone and input size), exported through the project's own export code. Its
predictions are meaningless. Needs the `train` extras (TensorFlow) - dev machines only.

    python benchmarks/make_proxy_model.py --out /tmp/proxy.onnx [--backbone mobilenetv3small --size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backbone", default="mobilenetv3small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import onnx

    from batchwbc.core import catalogue
    from batchwbc.engine import model as bm
    from batchwbc.engine.preprocess import PREPROCESSING_DESCRIPTION, PREPROCESSING_ID
    from export.convert import set_metadata, to_onnx
    from train.models import build_core

    core, _ = build_core(args.backbone, args.size, len(catalogue.CLASS_IDS), "none")
    proto = to_onnx(core, args.size, 1.0, args.opset)
    if isinstance(proto, tuple):  # newer export code also returns the tf.function
        proto = proto[0]
    set_metadata(proto, {
        bm.KEY_FORMAT: bm.FORMAT_VERSION,
        bm.KEY_CLASSES: json.dumps(list(catalogue.CLASS_IDS)),
        bm.KEY_INPUT_SIZE: str(args.size),
        bm.KEY_PREPROCESSING: PREPROCESSING_ID,
        bm.KEY_PREPROCESSING_DESC: PREPROCESSING_DESCRIPTION,
        bm.KEY_MODEL_VERSION: f"proxy-untrained-{args.backbone}-{args.size}",
        bm.KEY_REVIEW_THRESHOLD: "0.5",
        bm.KEY_BACKBONE: args.backbone,
    })
    onnx.save(proto, str(args.out))
    info = bm.Classifier(args.out).info
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB), input {info.input_size}, {len(info.classes)} classes")


if __name__ == "__main__":
    main()
