"""`python -m train.diagnose COMMAND ...`: the older name of `python -m train.experiments`,
kept because ADRs 0005-0007 and the model card quote it (train/experiments/)."""
from __future__ import annotations

from .experiments.cli import main

if __name__ == "__main__":
    main()
