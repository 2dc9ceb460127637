"""`python -m export runs/NAME --out batchwbc/models/<file>.onnx [--quantize int8]`."""
from __future__ import annotations

import os
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--data", "data_root", default=None, help="Data root the run was trained on (default: the one recorded in run.json).")
@click.option("--model-version", default=None, help="Version string stored in the model (default: <run folder name>).")
@click.option("--parity-images", type=int, default=64, help="Real test images for the Keras-vs-onnxruntime parity check.")
@click.option("--tolerance", type=float, default=1e-4, help="Maximum allowed absolute probability difference in the parity check.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", help="Also build a static int8 (QDQ, per-channel) model; shipped only if it loses < 0.5 accuracy points on the test split.")
@click.option("--opset", type=int, default=17)
def main(run_dir, out_path, data_root, model_version, parity_images, tolerance, quantize, opset) -> None:
    """Convert RUN_DIR's Keras model to ONNX with calibrated probabilities and metadata."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pathlib import Path

    from .convert import ExportConfig, ExportError, export_run

    cfg = ExportConfig(Path(run_dir), Path(out_path), data_root, model_version, parity_images, tolerance, quantize, opset)
    try:
        ok = export_run(cfg)
    except ExportError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
