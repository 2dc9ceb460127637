"""What a training run was asked to do: one typed, validated value instead of an option dict.

Why: every experiment used to add a flag and a branch inside the training loop, and its
conflicts with the other flags were checked wherever it happened to be used (some only after
minutes of decoding). `TrainConfig` holds the options of `python -m train` under their CLI
names (its field defaults are the CLI's defaults, train/options.py reads them from here), and
`check()` is the one place that refuses a bad value or a combination that cannot work, in one
sentence. The run's record (run.json "options") is `options()`, so it is unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from batchwbc.engine.preprocess import PREPROCESSING_ID, PREPROCESSING_WHOLE


class TrainingError(Exception):
    """A run that cannot proceed; str is one sentence (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class TrainConfig:
    """The options of `python -m train`, in the order `--help` lists them (see train/options.py
    for each one's help text)."""

    data_root: str
    out_dir: str
    backbone: str = "mobilenetv3small"
    weights: str = "none"
    size: int = 128
    preprocessing: str | None = None
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    patience: int = 5
    freeze_epochs: int = 0
    fine_tune_lr: float | None = None
    balance: str = "weights"
    augment: float = 1.0
    augment_backend: str = "opencv"
    lr_schedule: str = "plateau"
    colour_norm: str = "instance"
    bn_momentum: float = 0.9
    dropout: float = 0.3
    head_conv: int = 0
    head_dense: int = 256
    split_spec: str = "0.8,0.12,0.08"
    pin_test: str | None = None
    seed: int = 42
    review_target_accuracy: float = 0.97
    limit_per_class: int = 0
    workers: int = 0
    resume: str | None = None
    zoom_out_source: str | None = None
    init_from: str | None = None
    time_budget_min: float = 0
    degrade: float = 0.0
    degrade_mode: str = "replace"
    degrade_defocus: float = 0.0
    degrade_recolour: float = 0.0
    teacher_logits: str | None = None
    distill_alpha: float = 0.7
    tf_threads: str = "2,2"
    freeze_blocks: int = 0
    train_only: bool = False
    leave_out_source: str | None = None
    pack_to: str | None = None
    augment_workers: int = 1

    def __post_init__(self) -> None:
        self.check_values()

    # -- the one place options are judged ------------------------------------------------

    def check_values(self) -> None:
        """Refuse values and combinations that cannot work, before anything is decoded or
        built; pure (no file is read), so the config can be built anywhere."""
        _ = self.fractions  # parses --split or raises
        if self.degrade_defocus < 0 or (self.degrade_defocus > 0 and not self.degrade):
            raise TrainingError("--degrade-defocus must be a blur size in pixels >= 0 and needs --degrade.")
        if not 0 <= self.degrade_recolour <= 1 or (self.degrade_recolour > 0 and not self.degrade):
            raise TrainingError("--degrade-recolour must be a share between 0 and 1 and needs --degrade.")
        if self.augment_backend not in ("opencv", "keras"):
            raise TrainingError("--augment-backend must be opencv or keras.")
        if self.lr_schedule not in ("plateau", "cosine"):
            raise TrainingError("--lr-schedule must be plateau or cosine.")
        _ = self.zoom_out  # parses --zoom-out-source or raises
        _ = self.threads  # parses --tf-threads or raises
        if self.head_dense < 0:
            raise TrainingError("--head-dense must be a layer width >= 0 (0 = logits on the pooled features).")
        if self.augment_workers < 1:
            raise TrainingError("--augment-workers must be a number of threads >= 1.")
        if self.pack_to and not self.pack_to.endswith(".npz"):
            raise TrainingError("--pack-to must name an .npz file.")
        if self.pack_to and (self.train_only or self.resume):
            raise TrainingError("--pack-to only prepares data; it cannot be combined with --train-only or --resume.")
        if self.freeze_blocks < 0:
            raise TrainingError("--freeze-blocks must be a number of blocks >= 0.")
        if self.freeze_blocks and self.backbone != "efficientnet_lite0":
            raise TrainingError("--freeze-blocks needs --backbone efficientnet_lite0 (its blocks are named blocks_0, blocks_1, ...).")
        # distillation replaces the training targets crop by crop; copies added to the training
        # set have no teacher logits, and degraded crops would be taught the clean crop's answer
        if self.teacher_logits and self.degrade:
            raise TrainingError("--degrade cannot be combined with --teacher-logits.")
        if self.teacher_logits and self.zoom_out_source:
            raise TrainingError("--teacher-logits cannot be combined with --zoom-out-source.")

    def check_inputs(self) -> None:
        """Refuse a data folder or weights file that is not there (reads the file system)."""
        root = self.data
        if not self.packed and not root.is_dir():
            raise TrainingError(f"data folder {root} does not exist.")
        if not self.packed and not any(root.iterdir()):
            raise TrainingError(f"data folder {root} is empty.")
        if self.pack_to and self.packed:
            raise TrainingError("--pack-to needs the original image folder as --data, not a packed file.")
        w = self.weights
        if w not in ("none", "imagenet") and not Path(w).is_file():
            raise TrainingError(f"weights file {w} does not exist (use 'none', 'imagenet' or a path to an .h5 file).")

    @classmethod
    def from_options(cls, options: dict) -> "TrainConfig":
        """The config for the CLI's options, checked: its inputs exist and its values fit."""
        config = cls(**options)
        config.check_inputs()
        return config

    # -- derived values ---------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return Path(self.data_root)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    @property
    def packed(self) -> bool:
        """The data is a file made by `python -m train.packed`, not a folder of images."""
        return self.data.suffix == ".npz" and self.data.is_file()

    @property
    def fractions(self) -> tuple[float, float, float]:
        """--split as (train, val, test) fractions."""
        message = "--split must be three positive fractions summing to 1, e.g. 0.8,0.12,0.08."
        try:
            fractions = tuple(float(x) for x in self.split_spec.split(","))
        except ValueError:
            raise TrainingError(message) from None
        if len(fractions) != 3 or abs(sum(fractions) - 1) >= 1e-6 or min(fractions) <= 0:
            raise TrainingError(message)
        return fractions  # type: ignore[return-value]

    @property
    def zoom_out(self) -> tuple[str, float, float] | None:
        """--zoom-out-source as (source, low, high), or None."""
        if not self.zoom_out_source:
            return None
        from .rescale import parse_spec

        try:
            return parse_spec(self.zoom_out_source)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None

    @property
    def threads(self) -> tuple[int, int]:
        """--tf-threads as (intra-op, inter-op) thread counts; 0 lets TensorFlow choose."""
        message = "--tf-threads must be two thread counts >= 0, intra-op then inter-op, e.g. 2,2."
        try:
            counts = tuple(int(x) for x in self.tf_threads.split(","))
        except ValueError:
            raise TrainingError(message) from None
        if len(counts) != 2 or min(counts) < 0:
            raise TrainingError(message)
        return counts  # type: ignore[return-value]

    @property
    def distill(self) -> bool:
        return bool(self.teacher_logits)

    def options(self) -> dict:
        """The options under their CLI names, as run.json records them."""
        return dataclasses.asdict(self)


def resolve_preprocessing(explicit: str | None, resume: str | None) -> str:
    """The contract a run decodes with.

    A resumed model must see the pixels it was trained on, and model.keras does not record
    them; the run.json next to it does. So resuming takes the contract from there, and an
    explicit --preprocessing that contradicts it is refused rather than silently retraining
    (or evaluating) a model on the wrong framing. Runs from before contracts were recorded
    used the whole crop (v1).
    """
    recorded = None
    if resume:
        record = Path(resume).parent / "run.json"
        if record.is_file():
            try:
                info = json.loads(record.read_text())
            except (OSError, ValueError):
                info = {}
            recorded = info.get("preprocessing") or (info.get("options") or {}).get("preprocessing") or PREPROCESSING_WHOLE
    if explicit and recorded and explicit != recorded:
        raise TrainingError(
            f"{resume} was trained with preprocessing {recorded}; leave --preprocessing out or pass that one."
        )
    return explicit or recorded or PREPROCESSING_ID
