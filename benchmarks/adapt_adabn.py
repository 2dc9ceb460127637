"""Does re-estimating the backbone's normalisation statistics on a lab's cells (AdaBN) help adapt?

The export folds every BatchNorm into its convolution, but the fold is only an affine map per
output channel, so the statistics can still be moved in the ONNX file: for each convolution in
graph order, measure the per-channel mean and spread of its output on the lab's cells (no
labels) and on the training sources' cells, and rescale that convolution's weights and bias
so the lab's statistics become the sources' - what AdaBN does with the BatchNorm statistics
themselves. Later layers are measured after the earlier ones were moved (49 passes for Lite0).

Protocol as benchmarks/adapt_curve.py (same seeds, patient halves and cell draws): per seed,
the pool half's cells without their labels (a sample of --n-pool) align the model, then the
same head refit (`batchwbc.commands.adapt.adapt_head`) on N labelled pool cells, tested on the
other half's patients. Printed beside the unaligned model on the same cells.

    python -m benchmarks.adapt_adabn --model twin.onnx --data ../shared/data/DeepAPL \\
        --reference ../shared/data/PBC_dataset_normal_DIB:700 --reference ../shared/data/AML-Cytomorphology_LMU:150
"""
from __future__ import annotations

import os
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # as `batchwbc adapt` does
    os.environ.setdefault(_var, "1")

import click
import numpy as np


def _session(model, outputs: list[str], threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    for name in outputs:
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def channel_statistics(model, outputs: list[str], cells: np.ndarray, threads: int = 2, batch: int = 64
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, sd) of each named [N, C, H, W] tensor over cells, pixels included.
    onnxruntime runs only the nodes the requested outputs need."""
    sess = _session(model, outputs, threads)
    sums = None
    for i in range(0, len(cells), batch):
        ys = sess.run(outputs, {sess.get_inputs()[0].name: cells[i : i + batch]})
        cur = [(y.sum((0, 2, 3), dtype=np.float64), np.square(y, dtype=np.float64).sum((0, 2, 3)),
                y.shape[0] * y.shape[2] * y.shape[3]) for y in ys]
        sums = cur if sums is None else [(a[0] + c[0], a[1] + c[1], a[2] + c[2]) for a, c in zip(sums, cur)]
    out = []
    for s1, s2, n in sums:
        mean = s1 / n
        out.append((mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))))
    return out


def align_convolutions(model, reference: list[tuple[np.ndarray, np.ndarray]], cells: np.ndarray,
                       threads: int = 2, max_scale: float = 5.0):
    """A copy of the model whose every Conv output has, on `cells`, the reference's per-channel
    mean and sd (scale clipped to [1/max_scale, max_scale]; channels dead in the reference kept)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    if len(convs) != len(reference):
        raise ValueError("reference statistics do not match the model's convolutions")
    for conv, (mean_r, sd_r) in zip(convs, reference):
        ((mean_l, sd_l),) = channel_statistics(m, [conv.output[0]], cells, threads)
        weight = numpy_helper.to_array(inits[conv.input[1]])
        if len(conv.input) < 3:  # a Conv without bias: give it one
            name = conv.output[0] + "/aligned_bias"
            m.graph.initializer.append(numpy_helper.from_array(np.zeros(weight.shape[0], np.float32), name))
            inits[name] = m.graph.initializer[-1]
            conv.input.append(name)
        bias = numpy_helper.to_array(inits[conv.input[2]])
        live = sd_r > 1e-4
        scale = np.where(live, np.clip(sd_r / np.maximum(sd_l, 1e-6), 1 / max_scale, max_scale), 1.0)
        new_bias = np.where(live, (bias - mean_l) * scale + mean_r, bias)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((weight * scale[:, None, None, None]).astype(np.float32), conv.input[1]))
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array(new_bias.astype(np.float32), conv.input[2]))
    return m


def _decode(folder: str, classes: list[str], size: int, preprocessing: str, n: int | None, seed: int = 0):
    from batchwbc.engine.preprocess import UnreadableImage, prepare_file
    from batchwbc.inputs.public_datasets import read_any

    items = [it for it in read_any(folder).items if it.class_id in classes]
    if n is not None and n < len(items):
        items = [items[i] for i in np.random.default_rng(seed).choice(len(items), n, replace=False)]
    kept, arrays = [], []
    for it in items:
        try:
            arrays.append(prepare_file(it.path, size, preprocessing=preprocessing))
            kept.append(it)
        except UnreadableImage:
            pass
    return kept, np.stack(arrays)


def _outputs(model_path: str, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from batchwbc.engine.model import Classifier

    clf = Classifier(model_path, threads=2)
    probs, embs = [], []
    for i in range(0, len(cells), 64):
        p, e = clf.predict_with_embedding(cells[i : i + 64])
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs), np.concatenate(embs).astype(np.float64)


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, help="The unseen source (patient folders), e.g. ../shared/data/DeepAPL.")
@click.option("--reference", "references", multiple=True, required=True,
              help="FOLDER:N - N random cells of a training source for the reference statistics (repeatable).")
@click.option("--seeds", type=int, multiple=True, default=(0, 1, 2, 3, 4))
@click.option("--sizes", type=int, multiple=True, default=(100, 200))
@click.option("--n-pool", type=int, default=400, help="Unlabelled pool cells the alignment sees.")
@click.option("--save", type=click.Path(file_okay=False), default=None, help="Keep each seed's aligned model here.")
def main(model: str, data: str, references: tuple[str, ...], seeds: tuple[int, ...], sizes: tuple[int, ...],
         n_pool: int, save: str | None) -> None:
    import tempfile

    import onnx

    from batchwbc.commands.adapt import adapt_head
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.onnx_graph import head_parameters
    from benchmarks.adapt_curve import _metrics

    info = Classifier(model, threads=1).info
    classes = list(info.classes)
    t = time.perf_counter()
    home = np.concatenate([_decode(f, classes, info.input_size, info.preprocessing, int(n))[1]
                           for f, n in (r.rsplit(":", 1) for r in references)])
    items, cells = _decode(data, classes, info.input_size, info.preprocessing, None)
    y = np.array([classes.index(it.class_id) for it in items])
    patients = np.array([it.patient or "" for it in items])
    print(f"decoded {len(home)} reference and {len(cells)} unseen-source cells in {time.perf_counter() - t:.0f} s")
    base = onnx.load(model)
    convs = [n.output[0] for n in base.graph.node if n.op_type == "Conv"]
    reference = channel_statistics(base, convs, home)
    probs0, x0 = _outputs(model, cells)
    names = np.unique(patients)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            rng = np.random.default_rng(seed)  # the same draws as adapt_curve.py
            pool_p = list(rng.permutation(names)[: len(names) // 2])
            pool = np.flatnonzero(np.isin(patients, pool_p))
            test = np.flatnonzero(~np.isin(patients, pool_p))
            picks = {n: rng.choice(pool, size=min(n, len(pool)), replace=False) for n in sizes}
            t = time.perf_counter()
            unlabelled = np.random.default_rng(100 + seed).choice(pool, min(n_pool, len(pool)), replace=False)
            aligned = align_convolutions(base, reference, cells[unlabelled])
            path = os.path.join(save or tmp, f"aligned-seed{seed}.onnx")
            if save:
                os.makedirs(save, exist_ok=True)
            onnx.save(aligned, path)
            secs = time.perf_counter() - t
            probs1, x1 = _outputs(path, cells)
            w1, b1, t1 = head_parameters(onnx.load(path))
            w0, b0, t0 = head_parameters(base)
            for label, probs, x, (w, b, temp) in (("as is", probs0, x0, (w0, b0, t0)), ("aligned", probs1, x1, (w1, b1, t1))):
                rows.append((seed, label, 0, _metrics(y[test], probs[test].argmax(1), classes), None))
                for n in sizes:
                    pick = picks[n]
                    fit = adapt_head(x[pick], y[pick], list(patients[pick]), probs[pick], w, b, temp, seed=seed)
                    logits = x[test] @ fit.weight + fit.bias
                    m = _metrics(y[test], logits.argmax(1), classes)
                    z = logits / fit.temperature
                    p = np.exp(z - z.max(axis=1, keepdims=True))
                    m["review"] = float(((p / p.sum(axis=1, keepdims=True)).max(axis=1) < fit.review_threshold).mean())
                    rows.append((seed, label, n, m, secs if label == "aligned" else None))
    print("| seed | model | labelled cells | paper-10 acc | accuracy | macro-F1 | to review |")
    print("|---|---|---|---|---|---|---|")
    for seed, label, n, m, _ in rows:
        review = f"{100 * m['review']:.1f} %" if "review" in m else ""
        print(f"| {seed} | {label} | {n} | {m['acc10']:.3f} | {m['acc']:.3f} | {m['f1']:.3f} | {review} |")
    print("\nmean over seeds:")
    for label in ("as is", "aligned"):
        for n in (0, *sizes):
            ms = [r[3] for r in rows if r[1] == label and r[2] == n]
            review = f", to review {100 * np.mean([m['review'] for m in ms]):.1f} %" if n else ""
            print(f"{label}, n={n}: paper-10 accuracy {np.mean([m['acc10'] for m in ms]):.3f} "
                  f"(sd {np.std([m['acc10'] for m in ms]):.3f}), accuracy {np.mean([m['acc'] for m in ms]):.3f}{review}")
    aligned_s = [r[4] for r in rows if r[4] is not None]
    print(f"alignment: {np.mean(aligned_s):.0f} s per seed on {n_pool} cells")


if __name__ == "__main__":
    main()
