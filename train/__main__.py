"""`python -m train --data DIR --out runs/NAME [options]`: train, calibrate and evaluate."""
from __future__ import annotations

import os
import sys

import click

from batchwbc.preprocess import PREPROCESSING_DESCRIPTIONS, PREPROCESSING_ID

from .backbones import BACKBONES


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", "data_root", required=True, type=click.Path(), help="Labelled data: PBC_dataset_normal_DIB, AML-Cytomorphology_LMU, <class_id>/ folders, a folder of those (e.g. ../shared/data), or a file made by `python -m train.packed`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run folder for the model, split and metrics (e.g. runs/NAME).")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default="mobilenetv3small", help="Feature extractor; resnet50 is the paper's, the MobileNets suit a CPU PC.")
@click.option("--weights", default="none", help="'none' (from scratch), 'imagenet' (needs a connection) or PATH to a Keras .h5 weights file for the backbone.")
@click.option("--size", type=int, default=128, help="Input size S (crops are resized to SxS).")
@click.option("--preprocessing", type=click.Choice(sorted(PREPROCESSING_DESCRIPTIONS)), default=None, help=f"Preprocessing contract (batchwbc/preprocess.py): cellcrop-v2 frames the cell, area-v1 resizes the whole crop (the v1 model). Default: with --resume the resumed run's (from its run.json), else {PREPROCESSING_ID}.")
@click.option("--epochs", type=int, default=60, help="Maximum epochs (early stopping usually ends sooner).")
@click.option("--batch-size", type=int, default=32)
@click.option("--lr", type=float, default=2e-3, help="Adam learning rate.")
@click.option("--patience", type=int, default=5, help="Early stopping patience on validation accuracy (best weights restored).")
@click.option("--freeze-epochs", type=int, default=0, help="With pretrained weights: epochs training only the head before unfreezing the backbone.")
@click.option("--fine-tune-lr", type=float, default=None, help="Learning rate after unfreezing (default lr/10).")
@click.option("--balance", type=click.Choice(["weights", "none"]), default="weights", help="Class weighting against class imbalance.")
@click.option("--augment", type=float, default=1.0, help="Augmentation strength (0 disables): rotation/flip, scale, shift, stain jitter.")
@click.option("--colour-norm", type=click.Choice(["instance", "none"]), default="instance", help="Per-image colour standardisation inside the model (guards against scanner colour shortcuts).")
@click.option("--bn-momentum", type=float, default=0.9, help="BatchNorm momentum for the backbone (Keras MobileNets default 0.999 collapses in short runs).")
@click.option("--dropout", type=float, default=0.3)
@click.option("--head-conv", type=int, default=0, help="Width of an extra 1x1 convolution on the backbone's last feature map before pooling (0 = the paper's head only).")
@click.option("--split", "split_spec", default="0.8,0.12,0.08", help="train,val,test fractions (stratified by class and source).")
@click.option("--pin-test", type=click.Path(exists=True, dir_okay=False), default=None, help="A split CSV whose test rows stay in the test split (e.g. docs/model/test-split.csv: compare a new model with the bundled one on the same cells). Patients (DeepAPL) are always split whole.")
@click.option("--seed", type=int, default=42)
@click.option("--review-target-accuracy", type=float, default=0.97, help="The review threshold is the lowest confidence above which validation cells are this accurate.")
@click.option("--limit-per-class", type=int, default=0, help="Use at most N images per class (smoke tests).")
@click.option("--workers", type=int, default=0, help="Decoding threads (0 = all cores).")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False), default=None, help="Start from this model.keras (with --epochs 0: only calibrate and evaluate it).")
@click.option("--zoom-out-source", default=None, help="SOURCE:LOW:HIGH - add zoomed-out copies (factor LOW-HIGH) of that source's training crops, e.g. AML-LMU:0.55:0.75 to show Munich cells at the Barcelona magnification.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), default=None, help="Copy the weights of this model.keras (same backbone, any input size) into the new model before training.")
@click.option("--time-budget-min", type=float, default=0, help="Stop training after this many minutes (0 = no limit); the best model so far is kept.")
@click.option("--degrade", type=float, default=0.0, help="Share of training crops replaced by a lower-quality analyzer's version (shrunk to 0.3-1x, JPEG quality 40-95) before framing; 0 = off.")
@click.option("--degrade-mode", type=click.Choice(["replace", "add"]), default="replace", help="replace: the degraded version replaces the crop; add: it is added as an extra crop (epochs grow by the share).")
@click.option("--degrade-defocus", type=float, default=0.0, help="With --degrade: half the degraded crops are also defocused (Gaussian blur, sigma 0.5 to this many pixels of the original crop); 0 = off.")
@click.option("--degrade-recolour", type=float, default=0.0, help="With --degrade: share of the degraded crops recoloured (Lab colour transfer) like a random training crop, its source drawn uniformly; imitates another lab's stain; 0 = off.")
@click.option("--teacher-logits", type=click.Path(exists=True, dir_okay=False), default=None, help="Distil: an .npz of teacher logits per crop path (`python -m train.diagnose teacher`); targets become a mix of teacher and label.")
@click.option("--distill-alpha", type=float, default=0.7, help="Share of the teacher in the distillation targets.")
@click.option("--train-only", is_flag=True, help="Fit and save the model, skip calibration/evaluation (e.g. on a lent GPU machine; finish with --resume --epochs 0).")
def main(**opt) -> None:
    """Train a batchwbc classifier and write model, split, metrics and plots to --out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pathlib import Path

    from batchwbc.datasets import DatasetError

    data_root = Path(opt["data_root"])
    packed = data_root.suffix == ".npz" and data_root.is_file()
    if not packed and not data_root.is_dir():
        _fail(f"data folder {data_root} does not exist.")
    if not packed and not any(data_root.iterdir()):
        _fail(f"data folder {data_root} is empty.")
    try:
        fractions = tuple(float(x) for x in opt["split_spec"].split(","))
        assert len(fractions) == 3 and abs(sum(fractions) - 1) < 1e-6 and min(fractions) > 0
    except (ValueError, AssertionError):
        _fail("--split must be three positive fractions summing to 1, e.g. 0.8,0.12,0.08.")
    if opt["degrade_defocus"] < 0 or (opt["degrade_defocus"] > 0 and not opt["degrade"]):
        _fail("--degrade-defocus must be a blur size in pixels >= 0 and needs --degrade.")
    if not 0 <= opt["degrade_recolour"] <= 1 or (opt["degrade_recolour"] > 0 and not opt["degrade"]):
        _fail("--degrade-recolour must be a share between 0 and 1 and needs --degrade.")
    w = opt["weights"]
    if w not in ("none", "imagenet") and not Path(w).is_file():
        _fail(f"weights file {w} does not exist (use 'none', 'imagenet' or a path to an .h5 file).")
    from . import fit

    try:
        fit.run(opt, data_root, Path(opt["out_dir"]), fractions)
    except DatasetError as exc:
        _fail(str(exc))
    except fit.TrainingError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
