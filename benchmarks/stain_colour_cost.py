"""Cost per crop of the OOD reference's stain-colour check (ADR 0011, "Stain-colour check"):
the statistic and the envelope decision on the runtime's batches of model inputs.

    python benchmarks/stain_colour_cost.py [MODEL.onnx with a colour envelope]

Without a model, an envelope is fitted on random crops (the cost does not depend on its values).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from batchwbc.engine import stain_colour
from batchwbc.engine.pipeline import DEFAULT_BATCH_SIZE


def per_crop_us(env: stain_colour.ColourEnvelope, size: int, repeats: int = 2000) -> float:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (DEFAULT_BATCH_SIZE, size, size, 3), dtype=np.uint8)
    stain_colour.outside(env, stain_colour.colour_statistics(batch))
    t = time.perf_counter()
    for _ in range(repeats):
        stain_colour.outside(env, stain_colour.colour_statistics(batch))
    return (time.perf_counter() - t) / repeats / DEFAULT_BATCH_SIZE * 1e6


def main() -> None:
    if len(sys.argv) > 1:
        from batchwbc.engine.model import Classifier

        clf = Classifier(sys.argv[1], threads=1)
        if clf.ood is None or clf.ood.colour is None:
            raise SystemExit(f"{sys.argv[1]} carries no stain-colour envelope")
        env, sizes = clf.ood.colour, [clf.info.input_size]
    else:
        stats = np.random.default_rng(1).normal(130, 3, (200, 2))
        env, sizes = stain_colour.fit_envelope(stats, ["a"] * 100 + ["b"] * 100, 0.9975, 1.2), [128, 144, 224]
    for s in sizes:
        print(f"{s} px model input: {per_crop_us(env, s):.1f} us per crop (batches of {DEFAULT_BATCH_SIZE})")


if __name__ == "__main__":
    main()
