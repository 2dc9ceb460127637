"""Shared click options of the training-side commands.

Why: `python -m train`, the experiments, the robustness guard and the packer take the same
inputs (a data folder, a split CSV, an input size, a model, a contract); declaring each once
keeps their names, checks and help text the same everywhere. The training options take their
defaults from `TrainConfig`, so a default lives in one place. Light on purpose: `--help` of
every command must answer without TensorFlow.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import click

from batchwbc.engine.preprocess import PREPROCESSING_DESCRIPTIONS, PREPROCESSING_ID

from .backbones import BACKBONES
from .config import TrainConfig

_DEFAULT = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _apply(options: list[Callable], command: Callable) -> Callable:
    """Decorate `command` so `--help` lists `options` in the given order."""
    for option in reversed(options):
        command = option(command)
    return command


# -- inputs every evaluation takes ------------------------------------------------------------

data_folder = click.option("--data", "data_root", required=True, type=click.Path(exists=True, file_okay=False),
                           help="Data root the split's paths are relative to (e.g. ../shared/data).")
split_csv = click.option("--split", "split_csv", required=True, type=click.Path(exists=True, dir_okay=False),
                         help="A split CSV (a run's split.csv or docs/model/test-split.csv).")
input_size = click.option("--size", type=int, required=True, help="Input size S the model takes (SxS).")
keras_model = click.argument("model_path", type=click.Path(exists=True))
keras_models = click.argument("model_paths", nargs=-1, required=True, type=click.Path(exists=True))


def onnx_model(required: bool, help: str = "ONNX model.") -> Callable:
    return click.option("--model", "model_path", required=required, default=None,
                        type=click.Path(exists=True, dir_okay=False), help=help)


def contract(default: str | None, help: str) -> Callable:
    return click.option("--preprocessing", type=click.Choice(sorted(PREPROCESSING_DESCRIPTIONS)), default=default, help=help)


def model_and_data(command: Callable) -> Callable:
    """The arguments every single-model experiment takes: MODEL_PATH --data --split --size."""
    return _apply([keras_model, data_folder, split_csv, input_size], command)


# -- python -m train ------------------------------------------------------------------------------


def _o(*decls: str, **kw) -> Callable:
    """A training option whose default is TrainConfig's (the field is named after the option)."""
    name = next((d for d in decls if not d.startswith("-")), None) or decls[0].lstrip("-").replace("-", "_")
    if "default" not in kw and name in _DEFAULT and _DEFAULT[name] is not dataclasses.MISSING:
        kw["default"] = _DEFAULT[name]
    return click.option(*decls, **kw)


TRAIN_OPTIONS: list[Callable] = [
    _o("--data", "data_root", required=True, type=click.Path(), help="Labelled data: PBC_dataset_normal_DIB, AML-Cytomorphology_LMU, <class_id>/ folders, a folder of those (e.g. ../shared/data), or a file made by `python -m train.packed`."),
    _o("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder for the model, split and metrics (e.g. runs/NAME)."),
    _o("--backbone", type=click.Choice(sorted(BACKBONES)), help="Feature extractor; resnet50 is the paper's, the MobileNets suit a CPU PC."),
    _o("--weights", help="'none' (from scratch), 'imagenet' (needs a connection) or PATH to a Keras .h5 weights file for the backbone."),
    _o("--size", type=int, help="Input size S (crops are resized to SxS)."),
    contract(None, f"Preprocessing contract (batchwbc/engine/preprocess.py): cellcrop-v2 frames the cell, area-v1 resizes the whole crop (the v1 model). Default: with --resume the resumed run's (from its run.json), else {PREPROCESSING_ID}."),
    _o("--epochs", type=int, help="Maximum epochs (early stopping usually ends sooner)."),
    _o("--batch-size", type=int),
    _o("--lr", type=float, help="Adam learning rate."),
    _o("--patience", type=int, help="Early stopping patience on validation accuracy (best weights restored)."),
    _o("--freeze-epochs", type=int, help="With pretrained weights: epochs training only the head before unfreezing the backbone."),
    _o("--fine-tune-lr", type=float, help="Learning rate after unfreezing (default lr/10)."),
    _o("--balance", type=click.Choice(["weights", "none"]), help="Class weighting against class imbalance."),
    _o("--augment", type=float, help="Augmentation strength (0 disables): rotation/flip, scale, shift, stain jitter."),
    _o("--augment-backend", type=click.Choice(["opencv", "keras"]), help="opencv: augment each batch with OpenCV/numpy in a worker thread (about twice the training throughput on a CPU); keras: the augmentation layers inside the training graph (runs before 2026-12)."),
    _o("--lr-schedule", type=click.Choice(["plateau", "cosine"]), help="plateau: halve the learning rate when validation loss stalls for 2 epochs; cosine: decay it from --fine-tune-lr (or --lr) to 2% over --epochs (set --epochs to what the time budget allows)."),
    _o("--colour-norm", type=click.Choice(["instance", "none"]), help="Per-image colour standardisation inside the model (guards against scanner colour shortcuts)."),
    _o("--bn-momentum", type=float, help="BatchNorm momentum for the backbone (Keras MobileNets default 0.999 collapses in short runs)."),
    _o("--dropout", type=float),
    _o("--head-conv", type=int, help="Width of an extra 1x1 convolution on the backbone's last feature map before pooling (0 = the paper's head only)."),
    _o("--head-dense", type=int, help="Width of the hidden Dense+ReLU layer of the head; 0 = logits straight on the pooled backbone features, so `batchwbc adapt` refits on all of them (1,280 for Lite0)."),
    _o("--split", "split_spec", help="train,val,test fractions (stratified by class and source; patients, where a layout records them, are split whole)."),
    _o("--pin-test", type=click.Path(exists=True, dir_okay=False), help="A split CSV whose test rows stay in the test split (e.g. docs/model/test-split.csv: compare a new model with the bundled one on the same cells)."),
    _o("--seed", type=int),
    _o("--review-target-accuracy", type=float, help="The review threshold is the lowest confidence above which validation cells are this accurate."),
    _o("--limit-per-class", type=int, help="Use at most N images per class (smoke tests)."),
    _o("--workers", type=int, help="Decoding threads (0 = all cores)."),
    _o("--resume", type=click.Path(exists=True, dir_okay=False), help="Start from this model.keras (with --epochs 0: only calibrate and evaluate it)."),
    _o("--zoom-out-source", help="SOURCE:LOW:HIGH - add zoomed-out copies (factor LOW-HIGH) of that source's training crops, e.g. AML-LMU:0.55:0.75 to show Munich cells at the Barcelona magnification."),
    _o("--init-from", type=click.Path(exists=True, dir_okay=False), help="Copy the weights of this model.keras (same backbone, any input size) into the new model before training."),
    _o("--time-budget-min", type=float, help="Stop training after this many minutes (0 = no limit); the best model so far is kept."),
    _o("--degrade", type=float, help="Share of training crops replaced by a lower-quality analyzer's version (shrunk to 0.3-1x, JPEG quality 40-95) before framing; 0 = off."),
    _o("--degrade-mode", type=click.Choice(["replace", "add"]), help="replace: the degraded version replaces the crop; add: it is added as an extra crop (epochs grow by the share)."),
    _o("--degrade-defocus", type=float, help="With --degrade: half the degraded crops are also defocused (Gaussian blur, sigma 0.5 to this many pixels of the original crop); 0 = off."),
    _o("--degrade-recolour", type=float, help="With --degrade: share of the degraded crops recoloured (Lab colour transfer) like a random training crop, its source drawn uniformly; imitates another lab's stain; 0 = off."),
    _o("--teacher-logits", type=click.Path(exists=True, dir_okay=False), help="Distil: an .npz of teacher logits per crop path (`python -m train.experiments teacher`); targets become a mix of teacher and label."),
    _o("--distill-alpha", type=float, help="Share of the teacher in the distillation targets."),
    _o("--tf-threads", help="TensorFlow's intra-op,inter-op thread pools (0 = TensorFlow's choice). On 2 cores 2,2 trained Lite0 at 58 img/s against 37 with 2,1 (docs/training.md)."),
    _o("--freeze-blocks", type=int, help="EfficientNet-Lite0: keep the stem and blocks_0 .. blocks_{N-1} frozen while fine-tuning (5 = stem + stages 1-3: about twice the CPU throughput; docs/training.md); 0 = fine-tune everything."),
    _o("--train-only", is_flag=True, help="Fit and save the model, skip calibration/evaluation (e.g. on a lent GPU machine; finish with --resume --epochs 0)."),
    _o("--leave-out-source", help="Drop this source's training and validation crops after the split (its test crops stay): the leave-one-source-out twin, on the same patients' split as the full run."),
    _o("--pack-to", type=click.Path(dir_okay=False), help="Stop after preparing the data: write the training set as the run would fit it (degraded copies included) and the validation crops to this .npz, for a lent GPU machine (docs/training.md)."),
    _o("--augment-workers", type=int, help="Threads that augment training batches ahead of the step (opencv backend); 1 suits a 2-core PC, a GPU machine wants more."),
]


def train_options(command: Callable) -> Callable:
    """Every option of `python -m train`, one per TrainConfig field and in its order."""
    return _apply(TRAIN_OPTIONS, command)
