"""Keras run -> ONNX (uint8 images in, calibrated probabilities out, metadata inside)."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

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


def export_run(run_dir: Path, out_path: Path, data_root: str | None, model_version: str | None,
               parity_images: int, tolerance: float, quantize: str, opset: int) -> bool:
    import keras

    import train.layers  # noqa: F401 - registers the custom layers for load_model

    from train.evaluate import summary_metrics

    if not (run_dir / "run.json").is_file() or not (run_dir / "model.keras").is_file():
        raise ExportError(f"{run_dir} is not a finished training run (run.json and model.keras are needed).")
    run = json.loads((run_dir / "run.json").read_text())
    size = int(run["input_size"])
    # Runs from before the cell-centred contract recorded no preprocessing: they used the whole crop.
    preprocessing = run.get("preprocessing", PREPROCESSING_WHOLE)
    temperature = float(run["temperature"])
    root = Path(data_root or run["data_root"])
    if not root.is_dir():
        raise ExportError(f"data folder {root} (needed for the parity check) does not exist; pass --data.")
    core = keras.saving.load_model(run_dir / "model.keras", compile=False)

    # the run's held-out rows, decoded by the runtime's own preprocessing (train.evalkit)
    x_test, y_test = evalkit.decode_rows(root, evalkit.split_rows(run_dir / "split.csv", "test"), size, preprocessing)
    proto, serve = to_onnx(core, size, temperature, opset)
    version = model_version or run_dir.name
    tmp = out_path.with_suffix(".tmp.onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    import onnx

    onnx.save(proto, str(tmp))

    # Parity: Keras (TF) vs onnxruntime on real held-out images, through the shared preprocessing.
    n = min(parity_images, len(x_test))
    keras_p = serve(x_test[:n]).numpy()
    sess = ort_session(tmp)
    onnx_p = evalkit.predict(sess, x_test[:n], 64)
    diff = float(np.abs(keras_p - onnx_p).max())
    print(f"parity on {n} real test images: max |keras - onnxruntime| = {diff:.2e} (limit {tolerance:.0e})")
    if diff > tolerance:
        tmp.unlink(missing_ok=True)
        print("parity check FAILED: the ONNX model is not written.")
        return False

    probs = evalkit.predict(sess, x_test, 64)
    float_metrics = summary_metrics(probs, y_test)
    float_ms = ms_per_crop(tmp, x_test)
    print(f"float ONNX on {len(y_test)} test images: accuracy {float_metrics['accuracy']:.4f}, paper-10 accuracy "
          f"{float_metrics['paper10_accuracy']:.4f}, macro-F1 {float_metrics['paper10_macro_f1']:.4f}; {float_ms:.2f} ms/crop (1 thread)")
    chosen, chosen_metrics, quant_note = tmp, float_metrics, "float32"
    if quantize == "int8":
        q_path = out_path.with_suffix(".int8.tmp.onnx")
        val_rows = evalkit.split_rows(run_dir / "split.csv", "val")[:256]
        x_cal, _ = evalkit.decode_rows(root, val_rows, size, preprocessing)
        quantize_int8(tmp, q_path, x_cal)
        q_probs = evalkit.predict(ort_session(q_path), x_test, 64)
        q_metrics = summary_metrics(q_probs, y_test)
        q_ms = ms_per_crop(q_path, x_test)
        loss = (float_metrics["accuracy"] - q_metrics["accuracy"]) * 100
        print(f"int8 ONNX: accuracy {q_metrics['accuracy']:.4f} ({loss:+.2f} points lost), {q_ms:.2f} ms/crop "
              f"({float_ms / q_ms:.2f}x float speed)")
        if loss < 0.5:
            chosen, chosen_metrics = q_path, q_metrics
            quant_note = f"int8 static QDQ per-channel (lost {loss:.2f} accuracy points on test; {float_ms / q_ms:.2f}x faster)"
            tmp.unlink(missing_ok=True)
        else:
            print("int8 model rejected (loses >= 0.5 points); shipping float32.")
            q_path.unlink(missing_ok=True)

    counts = run.get("counts", {})
    share = validation_review_share(run_dir, temperature, float(run["review_threshold"]))
    meta = {
        meta_keys.KEY_FORMAT: meta_keys.FORMAT_VERSION,
        meta_keys.KEY_CLASSES: json.dumps(list(catalogue.CLASS_IDS)),
        meta_keys.KEY_INPUT_SIZE: str(size),
        meta_keys.KEY_PREPROCESSING: preprocessing,
        meta_keys.KEY_PREPROCESSING_DESC: PREPROCESSING_DESCRIPTIONS[preprocessing],
        meta_keys.KEY_TEMPERATURE: f"{temperature:.6f}",
        meta_keys.KEY_MODEL_VERSION: version,
        meta_keys.KEY_REVIEW_THRESHOLD: f"{float(run['review_threshold']):.2f}",
        **({meta_keys.KEY_REVIEW_SHARE: f"{share:.1f}"} if share is not None else {}),
        meta_keys.KEY_BACKBONE: str(run["options"]["backbone"]),
        meta_keys.KEY_TRAINING_DATA: json.dumps({
            "attribution": ATTRIBUTION,
            "counts_class_source": counts,
            "split_sizes": run.get("split_sizes"),
            "split_seed": run["options"]["seed"],
            "quality_filter_dropped": run.get("dropped"),
        }),
        meta_keys.KEY_TEST_METRICS: json.dumps({
            "n": chosen_metrics["n"],
            "accuracy": round(chosen_metrics["accuracy"], 4),
            "paper10_accuracy": round(chosen_metrics["paper10_accuracy"], 4),
            "paper10_macro_f1": round(chosen_metrics["paper10_macro_f1"], 4),
            "macro_f1": round(chosen_metrics["macro_f1"], 4),
            "f1_per_class": {k: round(v, 4) for k, v in chosen_metrics["f1_per_class"].items()},
            "test_ece": round(float(run.get("test_ece", float("nan"))), 4),
            "numeric_format": quant_note,
        }),
        meta_keys.KEY_NUMERIC_FORMAT: quant_note,
    }
    from batchwbc.engine.onnx_graph import GraphError, add_embedding_output

    final = onnx.load(str(chosen))
    set_metadata(final, meta)
    try:  # `batchwbc adapt` refits the last layer on this output
        final = add_embedding_output(final)
    except GraphError as exc:
        print(f"no embedding output added ({exc}); `batchwbc adapt` will not accept this model.")
    onnx.save(final, str(chosen))
    chosen.replace(out_path)
    # The out-of-distribution / DATA_SHIFT reference, fitted on this run's training cells (ADR 0011).
    from .ood_reference import ReferenceBuildError, build as build_ood, write as write_ood

    with_ood = out_path.with_suffix(".ood.tmp.onnx")
    try:
        ood_ref = build_ood(out_path, root, run_dir / "split.csv")
        size = write_ood(out_path, ood_ref, with_ood)
        bm.Classifier(with_ood)  # the runtime must accept it, or the model ships without it
        with_ood.replace(out_path)
        print(f"OOD reference stored ({size / 1000:.0f} kB): {ood_ref.describe()}, "
              f"{100 * ood_ref.info['held_out_unclassified']:.2f}% of held-out training cells unclassified")
    except (ReferenceBuildError, bm.ModelError, ValueError, np.linalg.LinAlgError) as exc:
        with_ood.unlink(missing_ok=True)
        print(f"no OOD reference stored ({exc}); the runtime will label no crop unclassified and raise no DATA_SHIFT.")
    # Re-open through the runtime's own loader: the file must be self-sufficient.
    info = bm.Classifier(out_path).info
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB, sha256 {info.sha256[:12]}..., {quant_note}); "
          f"classes {len(info.classes)}, input {info.input_size}, review threshold {info.review_threshold}")
    return True
