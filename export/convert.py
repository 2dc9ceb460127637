"""Keras run -> ONNX (uint8 images in, calibrated probabilities out, metadata inside).

`export_run` runs the stages below in order, each taking the ExportConfig and what the
stages before it produced."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchwbc.core import catalogue
from batchwbc.engine import model as bm
from batchwbc.engine import model_metadata as meta_keys
from batchwbc.engine.preprocess import PREPROCESSING_DESCRIPTIONS, PREPROCESSING_WHOLE
from train import evalkit

ATTRIBUTION = (
    "PBC_dataset_normal_DIB: Acevedo et al., Data in Brief 30 (2020), doi:10.17632/snkd93bnjr.1, CC BY 4.0; "
    "AML-Cytomorphology_LMU: Matek et al., TCIA (2019), doi:10.7937/tcia.2019.36f5o9ld, CC BY."
)


class ExportError(Exception):
    """An export that cannot proceed; str is one sentence."""


@contextlib.contextmanager
def _scalar_add_fix():
    """Work around a tf2onnx 1.17 transpose-optimizer bug, for the duration of one conversion.

    MobileNetV3's hard-swish computes `x + 3`. When that Add follows a bias-free Conv, the
    optimizer's Add handler tries to fold the constant into the Conv as a bias and calls
    `max(const.shape)`; for a scalar the shape is `()`, max() raises "arg is an empty
    sequence", tf2onnx logs the traceback and discards the whole transpose pass, leaving ~100
    NCHW<->NHWC Transposes (correct, but slower until onnxruntime folds them at load). A
    scalar can never be a per-channel bias, so scalars go to the optimizer's generic
    elementwise handler (a scalar broadcasts the same in any layout). In our exports the
    BatchNorm is folded into each Conv as a bias first, so the crashing path is not reached
    (measured: 27 scalar Adds seen, no traceback, 1 Transpose left); the guard keeps other
    backbones and head variants safe. The parity check verifies the converted numbers, and
    tf2onnx's own warnings are deliberately left visible.
    """
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    original = TransposeOptimizer._add_handler

    def patched(self, trans, node):
        if node.inputs[1].is_const() and node.inputs[1].get_tensor_value(as_list=False).ndim == 0:
            return self._handle_node_having_branches(trans, node)
        return original(self, trans, node)

    TransposeOptimizer._add_handler = patched
    try:
        yield
    finally:
        TransposeOptimizer._add_handler = original


def to_onnx(core, size: int, temperature: float, opset: int):
    """Wrap the core (float 0..255 -> logits) as uint8 -> softmax(logits / T) and convert."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, size, size, 3], tf.uint8, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):
        logits = core(tf.cast(image, tf.float32), training=False)
        return tf.identity(tf.nn.softmax(logits / temperature, axis=-1), name="probs")

    with _scalar_add_fix():
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    return proto, serve


def set_metadata(proto, meta: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, meta)


def ort_session(path: Path):
    import onnxruntime as ort

    from batchwbc.ops.ort_quiet import quiet_session_options

    opts = quiet_session_options()
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ms_per_crop(path: Path, x: np.ndarray, repeats: int = 5) -> float:
    """Median single-thread latency per crop at batch 32 (what a 2-core PC's runtime sees)."""
    import onnxruntime as ort

    from batchwbc.ops.ort_quiet import quiet_session_options

    opts = quiet_session_options()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    b = x[:32]
    sess.run(None, {name: b})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: b})
        times.append((time.perf_counter() - t) / len(b) * 1000)
    return float(np.median(times))


def quantize_int8(float_path: Path, out_path: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": calib[i : i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    pre = out_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)


def validation_review_share(run_dir: Path, temperature: float, threshold: float) -> float | None:
    """% of the run's validation cells below the review threshold (from logits.npz, written by
    training; batchwbc.core.calibration.review_share_pct), or None for a run without them."""
    from batchwbc.core.calibration import review_share_pct, softmax

    path = run_dir / "logits.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        if "val" not in z or len(z["val"]) == 0:
            return None
        probs = softmax(z["val"].astype(np.float64), temperature)
    return review_share_pct(probs, threshold)


# -- the export in stages ------------------------------------------------------------------------
# Each stage takes the ExportConfig and what the stages before it produced, and nothing else
# (as train/fit.py's stages do), so a new check or output is one stage, not another branch in
# one long function. `export_run` only calls them in order.


@dataclass(frozen=True)
class ExportConfig:
    """What `python -m export` is asked to do (its options, one field each)."""

    run_dir: Path
    out_path: Path
    data_root: str | None = None  # None: the data root run.json records
    model_version: str | None = None  # None: the run folder's name
    parity_images: int = 64
    tolerance: float = 1e-4
    quantize: str = "none"  # "none" or "int8"
    opset: int = 17


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run: its record, the contract it fixes, its data and its model."""

    record: dict[str, Any]  # run.json
    size: int
    preprocessing: str
    temperature: float
    data_root: Path
    core: Any  # the Keras core (float 0..255 -> logits)


@dataclass(frozen=True)
class Converted:
    """The float ONNX model written next to the output, and the held-out images it is judged on."""

    path: Path
    serve: Any  # the tf.function it was converted from (Keras side of the parity check)
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Chosen:
    """The numeric format that ships: its file, its test metrics and how it is described."""

    path: Path
    metrics: dict[str, Any]
    note: str


def load_run(cfg: ExportConfig) -> TrainedRun:
    """Stage 1: the run's record and model; refuses an unfinished run or a missing data folder."""
    run_dir = cfg.run_dir
    if not (run_dir / "run.json").is_file() or not (run_dir / "model.keras").is_file():
        raise ExportError(f"{run_dir} is not a finished training run (run.json and model.keras are needed).")
    run = json.loads((run_dir / "run.json").read_text())
    root = Path(cfg.data_root or run["data_root"])
    if not root.is_dir():
        raise ExportError(f"data folder {root} (needed for the parity check) does not exist; pass --data.")
    import keras

    import train.layers  # noqa: F401 - registers the custom layers for load_model

    core = keras.saving.load_model(run_dir / "model.keras", compile=False)
    # Runs from before the cell-centred contract recorded no preprocessing: they used the whole crop.
    return TrainedRun(run, int(run["input_size"]), run.get("preprocessing", PREPROCESSING_WHOLE),
                      float(run["temperature"]), root, core)


def convert(cfg: ExportConfig, run: TrainedRun) -> Converted:
    """Stage 2: the held-out rows, decoded by the runtime's own preprocessing (train.evalkit),
    and the core converted to a float ONNX file beside the output."""
    x_test, y_test = evalkit.decode_rows(run.data_root, evalkit.split_rows(cfg.run_dir / "split.csv", "test"),
                                         run.size, run.preprocessing)
    proto, serve = to_onnx(run.core, run.size, run.temperature, cfg.opset)
    tmp = cfg.out_path.with_suffix(".tmp.onnx")
    cfg.out_path.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.save(proto, str(tmp))
    return Converted(tmp, serve, x_test, y_test)


def parity_holds(cfg: ExportConfig, conv: Converted) -> bool:
    """Stage 3: Keras (TF) vs onnxruntime on real held-out images, through the shared
    preprocessing; on failure the ONNX file is removed."""
    n = min(cfg.parity_images, len(conv.x_test))
    keras_p = conv.serve(conv.x_test[:n]).numpy()
    onnx_p = evalkit.predict(ort_session(conv.path), conv.x_test[:n], 64)
    diff = float(np.abs(keras_p - onnx_p).max())
    print(f"parity on {n} real test images: max |keras - onnxruntime| = {diff:.2e} (limit {cfg.tolerance:.0e})")
    if diff > cfg.tolerance:
        conv.path.unlink(missing_ok=True)
        print("parity check FAILED: the ONNX model is not written.")
        return False
    return True


def choose_format(cfg: ExportConfig, run: TrainedRun, conv: Converted) -> Chosen:
    """Stage 4: the float model's test metrics and speed; with --quantize int8 a static int8
    model too, which ships only if it loses less than 0.5 accuracy points."""
    from train.evaluate import summary_metrics

    x_test, y_test, tmp = conv.x_test, conv.y_test, conv.path
    float_metrics = summary_metrics(evalkit.predict(ort_session(tmp), x_test, 64), y_test)
    float_ms = ms_per_crop(tmp, x_test)
    print(f"float ONNX on {len(y_test)} test images: accuracy {float_metrics['accuracy']:.4f}, paper-10 accuracy "
          f"{float_metrics['paper10_accuracy']:.4f}, macro-F1 {float_metrics['paper10_macro_f1']:.4f}; {float_ms:.2f} ms/crop (1 thread)")
    if cfg.quantize != "int8":
        return Chosen(tmp, float_metrics, "float32")
    q_path = cfg.out_path.with_suffix(".int8.tmp.onnx")
    val_rows = evalkit.split_rows(cfg.run_dir / "split.csv", "val")[:256]
    x_cal, _ = evalkit.decode_rows(run.data_root, val_rows, run.size, run.preprocessing)
    quantize_int8(tmp, q_path, x_cal)
    q_metrics = summary_metrics(evalkit.predict(ort_session(q_path), x_test, 64), y_test)
    q_ms = ms_per_crop(q_path, x_test)
    loss = (float_metrics["accuracy"] - q_metrics["accuracy"]) * 100
    print(f"int8 ONNX: accuracy {q_metrics['accuracy']:.4f} ({loss:+.2f} points lost), {q_ms:.2f} ms/crop "
          f"({float_ms / q_ms:.2f}x float speed)")
    if loss < 0.5:
        tmp.unlink(missing_ok=True)
        return Chosen(q_path, q_metrics, f"int8 static QDQ per-channel (lost {loss:.2f} accuracy points on test; "
                                         f"{float_ms / q_ms:.2f}x faster)")
    print("int8 model rejected (loses >= 0.5 points); shipping float32.")
    q_path.unlink(missing_ok=True)
    return Chosen(tmp, float_metrics, "float32")


def model_metadata(cfg: ExportConfig, run: TrainedRun, chosen: Chosen) -> dict[str, str]:
    """Stage 5: the metadata the runtime reads (engine/model_metadata.py's contract)."""
    rec, m = run.record, chosen.metrics
    share = validation_review_share(cfg.run_dir, run.temperature, float(rec["review_threshold"]))
    return {
        meta_keys.KEY_FORMAT: meta_keys.FORMAT_VERSION,
        meta_keys.KEY_CLASSES: json.dumps(list(catalogue.CLASS_IDS)),
        meta_keys.KEY_INPUT_SIZE: str(run.size),
        meta_keys.KEY_PREPROCESSING: run.preprocessing,
        meta_keys.KEY_PREPROCESSING_DESC: PREPROCESSING_DESCRIPTIONS[run.preprocessing],
        meta_keys.KEY_TEMPERATURE: f"{run.temperature:.6f}",
        meta_keys.KEY_MODEL_VERSION: cfg.model_version or cfg.run_dir.name,
        meta_keys.KEY_REVIEW_THRESHOLD: f"{float(rec['review_threshold']):.2f}",
        **({meta_keys.KEY_REVIEW_SHARE: f"{share:.1f}"} if share is not None else {}),
        meta_keys.KEY_BACKBONE: str(rec["options"]["backbone"]),
        meta_keys.KEY_TRAINING_DATA: json.dumps({
            "attribution": ATTRIBUTION,
            "counts_class_source": rec.get("counts", {}),
            "split_sizes": rec.get("split_sizes"),
            "split_seed": rec["options"]["seed"],
            "quality_filter_dropped": rec.get("dropped"),
        }),
        meta_keys.KEY_TEST_METRICS: json.dumps({
            "n": m["n"],
            "accuracy": round(m["accuracy"], 4),
            "paper10_accuracy": round(m["paper10_accuracy"], 4),
            "paper10_macro_f1": round(m["paper10_macro_f1"], 4),
            "macro_f1": round(m["macro_f1"], 4),
            "f1_per_class": {k: round(v, 4) for k, v in m["f1_per_class"].items()},
            "test_ece": round(float(rec.get("test_ece", float("nan"))), 4),
            "numeric_format": chosen.note,
        }),
        meta_keys.KEY_NUMERIC_FORMAT: chosen.note,
    }


def write_model(cfg: ExportConfig, chosen: Chosen, meta: dict[str, str]) -> None:
    """Stage 6: metadata and the embedding output `batchwbc adapt` refits on, then the file
    renamed into place."""
    import onnx

    from batchwbc.engine.onnx_graph import GraphError, add_embedding_output

    final = onnx.load(str(chosen.path))
    set_metadata(final, meta)
    try:  # `batchwbc adapt` refits the last layer on this output
        final = add_embedding_output(final)
    except GraphError as exc:
        print(f"no embedding output added ({exc}); `batchwbc adapt` will not accept this model.")
    onnx.save(final, str(chosen.path))
    chosen.path.replace(cfg.out_path)


def add_ood_reference(cfg: ExportConfig, run: TrainedRun) -> None:
    """Stage 7: the out-of-distribution / DATA_SHIFT reference, fitted on this run's training
    cells (ADR 0011); without one the model ships as it is and the runtime says so."""
    from .ood_reference import ReferenceBuildError, build as build_ood, write as write_ood

    out_path = cfg.out_path
    with_ood = out_path.with_suffix(".ood.tmp.onnx")
    try:
        ood_ref = build_ood(out_path, run.data_root, cfg.run_dir / "split.csv")
        size = write_ood(out_path, ood_ref, with_ood)
        bm.Classifier(with_ood)  # the runtime must accept it, or the model ships without it
        with_ood.replace(out_path)
        colour = ("" if ood_ref.colour is None else f", {100 * ood_ref.colour.info['held_out_outside']:.2f}% outside "
                  f"the stain-colour envelope")
        print(f"OOD reference stored ({size / 1000:.0f} kB): {ood_ref.describe()}, "
              f"{100 * ood_ref.info['held_out_unclassified']:.2f}% of held-out training cells unclassified{colour}")
    except (ReferenceBuildError, bm.ModelError, ValueError, np.linalg.LinAlgError) as exc:
        with_ood.unlink(missing_ok=True)
        print(f"no OOD reference stored ({exc}); the runtime will label no crop unclassified and raise no DATA_SHIFT.")


def report_written(cfg: ExportConfig, note: str) -> None:
    """Stage 8: re-open the file through the runtime's own loader (it must be self-sufficient)."""
    out_path = cfg.out_path
    info = bm.Classifier(out_path).info
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, sha256 {info.sha256[:12]}..., {note}); "
          f"classes {len(info.classes)}, input {info.input_size}, review threshold {info.review_threshold}")


def export_run(cfg: ExportConfig) -> bool:
    """The whole export; False when the parity check fails (nothing is written)."""
    run = load_run(cfg)
    conv = convert(cfg, run)
    if not parity_holds(cfg, conv):
        return False
    chosen = choose_format(cfg, run, conv)
    write_model(cfg, chosen, model_metadata(cfg, run, chosen))
    add_ood_reference(cfg, run)
    report_written(cfg, chosen.note)
    return True
