"""`python -m train.probe --model M.onnx --data DIR --split SPLIT.csv`: the older name of
`python -m train.experiments probe` (the shortcut probe, train/experiments/probe.py), kept
because the model card and ADR 0005 quote it."""
from __future__ import annotations

from .experiments.probe import command as main

if __name__ == "__main__":
    main()
