"""Training throughput: the network alone against the real input pipeline, in one run.

Why: issue 11's runs trained at 10-13 img/s and nobody could tell whether the network, the
input pipeline or other work on the two cores was the bottleneck. This prints, for the same
model, freeze setting and TensorFlow thread pools:

  * model-only: the compiled training step (`train_on_batch`) on one in-memory float batch,
    repeated (no augmentation, no input pipeline: the ceiling for this network on this CPU);
  * pipeline: `python -m train`'s own fit input (train.cvaugment's PyDataset: shuffling,
    OpenCV geometry and stain jitter in a worker thread, class weights);

alternating the two `--repeats` times so machine load hits both alike, and the ratio
pipeline / model-only (issue 18 asks >= 0.8). Images are random uint8 crops: the cost of a
step does not depend on what the pixels show, and the training run decodes every crop once
before the first epoch, so decoding is not part of an epoch.

    python benchmarks/bench_train.py --freeze-blocks 5 --tf-threads 2,2
    python benchmarks/bench_train.py --freeze-blocks 0 --tf-threads 2,1 --size 96
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build(args):
    import keras
    import tensorflow as tf

    from batchwbc.core import catalogue
    from train.fit import frozen_early_layers
    from train.models import build_core

    intra, inter = (int(v) for v in args.tf_threads.split(","))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    keras.utils.set_random_seed(0)
    core, backbone = build_core(args.backbone, args.size, len(catalogue.CLASS_IDS), "none", dense=args.head_dense)
    frozen = frozen_early_layers(backbone, args.freeze_blocks) if args.freeze_blocks else []
    core.compile(optimizer=keras.optimizers.Adam(1e-4),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return core, len(frozen)


def timed_fit(core, data, steps: int, **kw) -> float:
    """Seconds for one `fit` epoch of `steps` batches of the real pipeline."""
    t0 = time.perf_counter()
    core.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, **kw)
    return time.perf_counter() - t0


def timed_steps(core, x, y, steps: int) -> float:
    """Seconds for `steps` compiled training steps on one in-memory batch: the network alone."""
    t0 = time.perf_counter()
    for _ in range(steps):
        core.train_on_batch(x, y)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30, help="Batches per timed epoch.")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tf-threads", default="2,2", help="intra-op,inter-op")
    p.add_argument("--freeze-blocks", type=int, default=5)
    p.add_argument("--head-dense", type=int, default=0)
    p.add_argument("--augment", type=float, default=1.0)
    args = p.parse_args(argv)

    from batchwbc.core import catalogue
    from train import cvaugment

    core, n_frozen = build(args)
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    x = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
    y = rng.integers(0, len(catalogue.CLASS_IDS), n)
    class_weight = {k: 1.0 for k in range(len(catalogue.CLASS_IDS))}
    xb, yb = x[: args.batch_size].astype(np.float32), y[: args.batch_size]
    pipeline = cvaugment.batches(x, y, None, args.batch_size, args.augment, 0)

    timed_steps(core, xb, yb, 3)  # trace both step functions before timing
    timed_fit(core, pipeline, 3, class_weight=class_weight)
    model_only, real = [], []
    for _ in range(args.repeats):
        model_only.append(n / timed_steps(core, xb, yb, args.steps))
        real.append(n / timed_fit(core, pipeline, args.steps, class_weight=class_weight))
    m, r = statistics.median(model_only), statistics.median(real)
    print(f"{args.backbone} {args.size} px, batch {args.batch_size}, TensorFlow threads {args.tf_threads} "
          f"(intra,inter), {n_frozen} early layers frozen ({args.freeze_blocks} blocks + stem)")
    print(f"model-only: {m:6.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in model_only)})")
    print(f"pipeline:   {r:6.1f} img/s  (runs: {', '.join(f'{v:.1f}' for v in real)})")
    print(f"pipeline / model-only: {r / m:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
