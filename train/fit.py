"""The training run in stages: build the model, prepare the data, extend the training set,
fit, calibrate and evaluate, write the record.

Why stages: each stage takes the run's `TrainConfig` and what the stages before it produced,
and nothing else, so a new experiment is a stage option or a small variant of one (a way to
extend the training set lives in train/extend.py), not another branch in one long function.
`run` only calls the stages in order.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from dataclasses import dataclass

import numpy as np

from batchwbc.core import catalogue

from . import calibration, data, evalkit, evaluate, extend, split
from .callbacks import KeepBest, Throughput
from .config import TrainConfig, TrainingError, resolve_preprocessing  # noqa: F401 - TrainingError re-exported


def _copy_weights(path: str, core) -> list[str]:
    """Copy the weights of a saved core into a freshly built one of another input size or head.

    Convolutions do not depend on the input size, so a model trained at 128 px is a good
    start at 160 px. The nested backbone is matched as the core's one nested model
    (models.backbone_of; its name contains the size) and must match exactly; head layers are matched by name and a head layer whose shape
    changed (or that is new) keeps its fresh initialisation. Returns those layers' names.
    """
    import keras

    import train.layers  # noqa: F401 - custom layers for load_model

    from .models import backbone_of

    src = keras.saving.load_model(path, compile=False)
    by_name = {layer.name: layer for layer in src.layers}
    src_backbone, dst_backbone = backbone_of(src), backbone_of(core)
    if [w.shape for w in src_backbone.get_weights()] != [w.shape for w in dst_backbone.get_weights()]:
        raise TrainingError(f"{path} has a different backbone; it cannot initialise this model.")
    fresh = []
    for b in core.layers:
        a = src_backbone if b is dst_backbone else by_name.get(b.name)
        wb = b.get_weights()
        if not wb:
            continue
        wa = a.get_weights() if a is not None else None
        if wa is not None and [w.shape for w in wa] == [w.shape for w in wb]:
            b.set_weights(wa)
        else:
            fresh.append(b.name)
    return fresh


def soft_targets(teacher_npz: str, paths: list[str], labels: np.ndarray, n_classes: int, alpha: float) -> np.ndarray:
    """alpha x the teacher's probabilities + (1 - alpha) x the one-hot label, per training crop.

    The teacher's logits are looked up by crop path (they may come from another input size or
    several views, `python -m train.experiments teacher`); the hard label keeps a share so a
    confidently wrong teacher cannot overrule the annotation.
    """
    with np.load(teacher_npz, allow_pickle=False) as z:
        table = dict(zip(z["paths"].tolist(), z["logits"]))
    missing = [p for p in paths if p not in table]
    if missing:
        raise TrainingError(f"{teacher_npz} has no teacher logits for {len(missing)} training crops (e.g. {missing[0]}).")
    soft = calibration.softmax(np.stack([table[p] for p in paths]).astype(np.float64))
    return (alpha * soft + (1 - alpha) * np.eye(n_classes)[labels]).astype(np.float32)




# -- stage 1: the model (first: a backbone/weights mismatch is reported before minutes of decoding)


def configure_threads(cfg: TrainConfig) -> None:
    """Size TensorFlow's thread pools before its runtime starts (it refuses later).

    Why: TensorFlow's default inter-op pool of 1 on a 2-core PC left the second core idle
    between ops; 2,2 trained Lite0 at 58 img/s against 37 (docs/training.md)."""
    import keras

    if keras.backend.backend() != "tensorflow":  # e.g. JAX on a lent GPU machine
        return
    import tensorflow as tf

    intra, inter = cfg.threads
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # already initialised (a second run in one process, e.g. tests)
        pass


FROZEN_STEM = ("conv_stem", "bn0")


def frozen_early_layers(backbone, n_blocks: int) -> list[str]:
    """Freeze EfficientNet-Lite0's stem and blocks_0 .. blocks_{n-1}; return their names.

    Why: on a CPU the backward pass through the high-resolution early stages costs most of a
    step, and their ImageNet filters (edges, colour blobs) transfer to blood cells; frozen,
    their BatchNorm layers also keep their ImageNet statistics (Keras runs a frozen BN in
    inference mode)."""
    if n_blocks <= 0:
        return []
    prefixes = FROZEN_STEM + tuple(f"blocks_{i}_" for i in range(n_blocks))
    names = []
    for layer in backbone.layers:
        if layer.name.startswith(prefixes) and layer.weights:
            layer.trainable = False
            names.append(layer.name)
    if not any(n.startswith(f"blocks_{n_blocks - 1}_") for n in names):
        raise TrainingError(f"the backbone has no block blocks_{n_blocks - 1}; --freeze-blocks is too large.")
    return names


def build_model(cfg: TrainConfig):
    """(core, backbone): resumed from --resume, or built and optionally initialised from --init-from."""
    import keras

    from . import models

    configure_threads(cfg)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.resume:
        import train.layers  # noqa: F401 - custom layers for load_model

        core = keras.saving.load_model(cfg.resume, compile=False)
        print(f"resumed from {cfg.resume}")
        return core, models.backbone_of(core)
    try:
        core, backbone = models.build_core(
            cfg.backbone, cfg.size, len(catalogue.CLASS_IDS), cfg.weights, cfg.colour_norm, dropout=cfg.dropout,
            bn_momentum=cfg.bn_momentum, head_conv=cfg.head_conv or 0, dense=cfg.head_dense,
        )
    except models.WeightsError as exc:
        raise TrainingError(str(exc)) from None
    if cfg.init_from:
        fresh = _copy_weights(cfg.init_from, core)
        print(f"initialised from {cfg.init_from} (input size {cfg.size})" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    return core, backbone


# -- stage 2: the data, its quality filter and its split ------------------------------------


@dataclass(frozen=True)
class Prepared:
    """The decoded data, the contract it was decoded with and each split's rows in it."""

    ds: data.LoadedData
    preprocessing: str
    idx: dict[str, np.ndarray]

    def labels(self, name: str) -> np.ndarray:
        return self.ds.labels[self.idx[name]]

    def sources(self, name: str) -> list[str]:
        return [self.ds.sources[i] for i in self.idx[name]]


def prepare_data(cfg: TrainConfig) -> Prepared:
    """Read and quality-filter the data, split it (or take a packed file's split), and write
    skipped.csv, dropped.csv and split.csv."""
    out, data_root = cfg.out, cfg.data
    print(f"reading {data_root} ...", flush=True)
    preprocessing = resolve_preprocessing(cfg.preprocessing, cfg.resume)
    if cfg.resume:
        print(f"preprocessing {preprocessing} (the resumed run's)" if not cfg.preprocessing else f"preprocessing {preprocessing}")
    ds = data.load(data_root, cfg.size, cfg.workers, cfg.limit_per_class, cfg.seed, preprocessing)
    if len(ds.labels) == 0:
        raise TrainingError(f"no usable labelled images were found in {data_root}.")
    print(data.count_table(ds.labels, ds.sources))
    for (src, reason), n in sorted(ds.scan.skipped.items()):
        print(f"skipped {n:5d} from {src}: {reason}")
    with open(out / "skipped.csv", "w") as fh:
        fh.write("source,reason,count\n")
        for (src, reason), n in sorted(ds.scan.skipped.items()):
            fh.write(f"{src},\"{reason}\",{n}\n")
    with open(out / "dropped.csv", "w") as fh:
        fh.write("path,reason\n")
        for p, r in ds.dropped:
            fh.write(f"\"{p}\",\"{r}\"\n")
    print(f"quality filter dropped {len(ds.dropped)} images (listed in dropped.csv)")

    if ds.assigned_split is not None:  # a packed file carries the split it was cut from
        assign = np.array(ds.assigned_split)
    else:
        strata = [f"{catalogue.CLASS_IDS[l]}|{s}" for l, s in zip(ds.labels, ds.sources)]
        patients = ds.patients or [None] * len(strata)
        pinned = None
        if cfg.pin_test:
            pinned_paths = {r["path"] for r in split.read_split_csv(Path(cfg.pin_test)) if r["split"] == "test"}
            pinned = [p in pinned_paths for p in ds.paths]
            print(f"{sum(pinned)} images pinned to the test split by {cfg.pin_test}")
        if pinned is None and all(p is None for p in patients):
            assign = np.array(split.stratified_split(strata, cfg.fractions, cfg.seed))
        else:
            assign = np.array(split.grouped_split(strata, patients, cfg.fractions, cfg.seed, pinned))
    idx = {name: np.flatnonzero(assign == name) for name in split.SPLITS}
    if cfg.leave_out_source:
        idx = leave_out(idx, ds.sources, cfg.leave_out_source)
        print(f"left out {cfg.leave_out_source}'s training and validation crops (its test crops stay)")
    # only the rows the run uses: export fits the OOD reference on the split's train/val rows
    used = np.sort(np.concatenate([idx[name] for name in split.SPLITS]))
    split.write_split_csv(
        out / "split.csv",
        [(ds.paths[i], catalogue.CLASS_IDS[ds.labels[i]], ds.sources[i], assign[i]) for i in used],
    )
    for name in split.SPLITS:
        print(f"{name}: {len(idx[name])} images")
    if min(len(idx[k]) for k in (("train", "val") if cfg.train_only else split.SPLITS)) == 0:
        raise TrainingError("too few images to make train, validation and test splits.")
    return Prepared(ds, preprocessing, idx)


def leave_out(idx: dict[str, np.ndarray], sources: list[str], source: str) -> dict[str, np.ndarray]:
    """The split without one source's training and validation rows; its test rows stay.

    Why after the split and not by reading less data: the leave-one-source-out twin then trains
    on exactly the other sources' rows of the full run (same patients in train, val and test),
    so the two models differ by one source and nothing else."""
    src = np.asarray(sources)
    if not (src == source).any():
        raise TrainingError(f"--leave-out-source: no crop comes from source {source!r} (sources: {', '.join(sorted(set(sources)))}).")
    return {name: rows if name == "test" else rows[src[rows] != source] for name, rows in idx.items()}


# -- stage 3: the training set, extended by the variants the options ask for -----------------


def extend_training_set(cfg: TrainConfig, prep: Prepared) -> extend.TrainingSet:
    """The training crops, then zoomed-out or degraded copies (train/extend.py)."""
    ds, tr = prep.ds, prep.idx["train"]
    crops = extend.Crops(
        all_images=ds.images, index=tr, labels=prep.labels("train"), sources=prep.sources("train"),
        paths=[ds.paths[i] for i in tr], data_root=cfg.data, size=cfg.size, preprocessing=prep.preprocessing,
        seed=cfg.seed, workers=cfg.workers,
    )
    return extend.extend(crops, extend.variants(cfg))


def write_pack(cfg: TrainConfig, prep: Prepared, ts: extend.TrainingSet) -> None:
    """--pack-to: the training set exactly as this run would fit it (degraded crops in place)
    and the validation crops, for a lent GPU machine that cannot see the data folder. Test
    crops are never packed.

    WebP at quality 85 so the whole set fits one trip (64 MiB: 35.7 MiB for 11,467 crops at
    144 px). WebP stores colour at half resolution, which cost a model trained only on such
    crops 1.6 points of validation accuracy on the original ones: finish such a model with a
    few epochs on the original crops (ADR 0013)."""
    from . import packed

    tr, va = prep.idx["train"], prep.idx["val"]
    if len(ts.y) != len(tr):
        raise TrainingError("--pack-to cannot pack copies added to the training set (--degrade-mode add, "
                            "--zoom-out-source): they have no source or path of their own.")
    ds = prep.ds
    images = np.concatenate([ts.x, ds.images[va]])
    n = packed.write(Path(cfg.pack_to), images, np.concatenate([ts.y, prep.labels("val")]),
                     prep.sources("train") + prep.sources("val"), [ds.paths[i] for i in np.concatenate([tr, va])],
                     ["train"] * len(tr) + ["val"] * len(va), prep.preprocessing, quality=85,
                     note=json.dumps(cfg.options(), default=str))
    print(f"packed {n} crops ({len(tr)} training as fitted, {len(va)} validation) into {cfg.pack_to} "
          f"({Path(cfg.pack_to).stat().st_size / 2**20:.1f} MiB)")


# -- stage 4: fit ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """What the fit is asked to reproduce: labels, or with --teacher-logits soft targets."""

    train: np.ndarray
    val: np.ndarray
    class_weight: dict[int, float] | None
    sample_weight: np.ndarray | None
    soft: bool


def targets(cfg: TrainConfig, prep: Prepared, ts: extend.TrainingSet) -> Targets:
    """Class weights against imbalance (--balance weights), and distillation targets."""
    n_classes = len(catalogue.CLASS_IDS)
    class_weight = None
    if cfg.balance == "weights":
        counts = np.bincount(ts.y, minlength=n_classes)
        present = counts > 0
        class_weight = {k: float(len(ts.y) / (present.sum() * counts[k])) if counts[k] else 0.0 for k in range(n_classes)}
    y_va = prep.labels("val")
    if not cfg.distill:
        return Targets(ts.y, y_va, class_weight, None, False)
    # TrainConfig refuses extending the set with distillation: ts.y is the training crops' labels
    soft = soft_targets(cfg.teacher_logits, [prep.ds.paths[i] for i in prep.idx["train"]], ts.y, n_classes, cfg.distill_alpha)
    sample_weight = None
    if class_weight is not None:  # Keras class weights need integer labels; weight the samples instead
        sample_weight = np.array([class_weight[k] for k in prep.labels("train")], dtype=np.float32)
        class_weight = None
    print(f"distilling from {cfg.teacher_logits} (alpha {cfg.distill_alpha})")
    return Targets(soft, np.eye(n_classes, dtype=np.float32)[y_va], class_weight, sample_weight, True)


def fit(cfg: TrainConfig, core, backbone, prep: Prepared, ts: extend.TrainingSet) -> float:
    """Fit the core (head first with --freeze-epochs), keeping the best model on disk; returns
    the seconds it took."""
    import keras

    from . import models

    out = cfg.out
    y = targets(cfg, prep, ts)
    x_val = prep.ds.images[prep.idx["val"]]
    if cfg.augment_backend == "opencv":
        from . import cvaugment

        # the core takes float 0..255; the worker thread augments each batch ahead of the step
        trainer = core
        train_data = cvaugment.batches(ts.x, y.train, y.sample_weight, cfg.batch_size, cfg.augment, cfg.seed,
                                       workers=cfg.augment_workers)
        x_val = x_val.astype(np.float32)
        fit_data: dict = dict(x=train_data)
        steps_per_epoch = len(train_data)
    else:
        trainer = models.build_trainer(core, models.build_augmenter(cfg.augment, cfg.seed), cfg.size)
        fit_data = dict(x=ts.x, y=y.train, batch_size=cfg.batch_size, sample_weight=y.sample_weight)
        steps_per_epoch = -(-len(y.train) // cfg.batch_size)

    def compile_(lr, decay_epochs: int = 0):
        if decay_epochs > 0 and cfg.lr_schedule == "cosine":
            lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=decay_epochs * steps_per_epoch, alpha=0.02)
        trainer.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True) if y.soft else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")] if y.soft else ["accuracy"],
        )

    backups = out / "backup"
    resuming = backups.is_dir() and any(backups.iterdir())
    if resuming:
        print(f"continuing the interrupted run from {backups} (delete it to start afresh)", flush=True)
    elif cfg.epochs > 0:
        (out / "history.csv").unlink(missing_ok=True)

    def callbacks(phase: str) -> list:
        """One phase's callbacks; BackupAndRestore keeps weights, optimizer and epoch after every
        epoch, so running the same command again after a lost session continues the run."""
        cbs = [
            keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=cfg.patience, restore_best_weights=True, verbose=1),
            keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
            Throughput(len(y.train)),
            KeepBest(core, out / "model.keras", 60.0 * (cfg.time_budget_min or 0), out / "history.csv"),
            keras.callbacks.BackupAndRestore(str(backups / phase)),
        ]
        if cfg.lr_schedule == "plateau":
            cbs.insert(1, keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5, verbose=1))
        return cbs

    common = dict(validation_data=(x_val, y.val), class_weight=y.class_weight, verbose=2, **fit_data)
    t_fit = time.time()
    epoch0 = 0
    pretrained = cfg.weights != "none" or bool(cfg.init_from)  # a head on a trained backbone is fitted first
    if cfg.freeze_epochs > 0 and pretrained:
        if not (resuming and (backups / "fine-tune").is_dir()):  # the head phase finished before the break
            backbone.trainable = False
            compile_(cfg.lr)
            trainer.fit(epochs=cfg.freeze_epochs, callbacks=callbacks("head"), **common)
        epoch0 = cfg.freeze_epochs
        backbone.trainable = True
        frozen = frozen_early_layers(backbone, cfg.freeze_blocks)
        if frozen:
            print(f"fine-tuning with the stem and blocks_0..blocks_{cfg.freeze_blocks - 1} frozen ({len(frozen)} layers)", flush=True)
        compile_(cfg.fine_tune_lr or cfg.lr / 10, cfg.epochs - epoch0)
    else:
        backbone.trainable = True  # a resumed model keeps the trainable flags it was saved with
        frozen_early_layers(backbone, cfg.freeze_blocks)
        compile_(cfg.lr, cfg.epochs)
    if cfg.epochs > epoch0:
        trainer.fit(epochs=cfg.epochs, initial_epoch=epoch0, callbacks=callbacks("fine-tune"), **common)
    if (out / "model.keras").is_file():  # calibrate the best epoch, not the last one fitted
        core.load_weights(out / "model.keras")
    return time.time() - t_fit


def write_train_only_record(cfg: TrainConfig, core, prep: Prepared, fit_seconds: float) -> None:
    """Save the model and a run.json without metrics: the contract must travel with the model,
    since --resume reads it there."""
    import keras

    import train.layers  # noqa: F401 - custom layers for load_model

    out = cfg.out
    core.save(out / "model.keras")
    # the same model without the optimizer's state: a third of the size, for the trip back
    keras.saving.load_model(out / "model.keras", compile=False).save(out / "model.keras")
    (out / "run.json").write_text(json.dumps({
        "options": cfg.options(), "input_size": cfg.size, "preprocessing": prep.preprocessing, "train_only": True,
        "fit_seconds": fit_seconds, "keras": keras.__version__, "backend": keras.backend.backend(),
    }, indent=2, default=str))
    print(f"train-only run finished in {fit_seconds / 60:.1f} min; best model in {out / 'model.keras'}")


# -- stage 5: calibrate and evaluate ----------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    temperature: float
    review_threshold: float
    val_ece_uncalibrated: float
    results: dict  # split -> evaluate.write_artifacts(...)


def calibrate_and_evaluate(cfg: TrainConfig, core, prep: Prepared) -> Evaluation:
    """Temperature and review threshold from validation logits, metrics and plots for val and
    test, logits.npz and the final model.keras. Judged only by evaluation-mode predictions on
    held-out data, never the training curve."""
    out = cfg.out
    if (out / "history.csv").is_file():
        evaluate.plot_history(out / "history.csv", out)

    def logits_of(name):
        return evalkit.predict(core, prep.ds.images[prep.idx[name]], 128)

    val_logits, test_logits = logits_of("val"), logits_of("test")
    y_va = prep.labels("val")
    temperature = calibration.fit_temperature(val_logits, y_va)
    val_probs = calibration.softmax(val_logits, temperature)
    threshold = calibration.review_threshold(val_probs, y_va, cfg.review_target_accuracy)
    ece_before, _ = calibration.reliability(calibration.softmax(val_logits), y_va)
    results = {}
    for name, lg in (("val", val_logits), ("test", test_logits)):
        probs = calibration.softmax(lg, temperature)
        results[name] = evaluate.write_artifacts(out, name, probs, prep.labels(name), prep.sources(name))
    np.savez_compressed(out / "logits.npz", val=val_logits, test=test_logits, val_idx=prep.idx["val"], test_idx=prep.idx["test"])
    core.save(out / "model.keras")
    return Evaluation(temperature, threshold, ece_before, results)


# -- stage 6: the record ------------------------------------------------------------------------


def write_record(cfg: TrainConfig, prep: Prepared, ev: Evaluation, fit_seconds: float, t_start: float) -> dict:
    """run.json: options, contract, calibration, metrics and provenance (what export reads)."""
    import keras

    out, ds = cfg.out, prep.ds
    test = ev.results["test"]["summary"]
    record = {
        "options": cfg.options(),
        "data_root": str(cfg.data),
        "input_size": cfg.size,
        "preprocessing": prep.preprocessing,
        "classes": list(catalogue.CLASS_IDS),
        "temperature": ev.temperature,
        "review_threshold": ev.review_threshold,
        "val_ece_uncalibrated": ev.val_ece_uncalibrated,
        "val_ece": ev.results["val"]["ece"],
        "test_ece": ev.results["test"]["ece"],
        # the training data's class x source counts (export names the model's sources from them)
        "counts": {f"{c}|{s}": int(n) for (c, s), n in sorted(ds.scan.counts().items()) if s != cfg.leave_out_source},
        "split_sizes": {k: int(len(v)) for k, v in prep.idx.items()},
        "dropped": len(ds.dropped),
        "skipped": {f"{s}: {r}": n for (s, r), n in sorted(ds.scan.skipped.items())},
        "test_summary": test,
        "val_summary": ev.results["val"]["summary"],
        "fit_seconds": fit_seconds,
        "total_seconds": time.time() - t_start,
        "epochs_run": (sum(1 for _ in open(out / "history.csv")) - 1) if (out / "history.csv").is_file() else 0,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}",
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    print(
        f"test: accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}; paper classes: accuracy "
        f"{test['paper10_accuracy']:.4f}, macro-F1 {test['paper10_macro_f1']:.4f}; T={ev.temperature:.3f}, "
        f"review threshold {ev.review_threshold:.2f}; fit {fit_seconds / 60:.1f} min"
    )
    return record


def run(cfg: TrainConfig) -> dict:
    """The whole run; returns the record (empty with --train-only)."""
    t_start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.pack_to:  # data only: no model to build (nothing here draws from a global random state)
        prep = prepare_data(cfg)
        write_pack(cfg, prep, extend_training_set(cfg, prep))
        return {}
    core, backbone = build_model(cfg)
    prep = prepare_data(cfg)
    ts = extend_training_set(cfg, prep)
    fit_seconds = fit(cfg, core, backbone, prep, ts)
    if cfg.train_only:
        write_train_only_record(cfg, core, prep, fit_seconds)
        return {}
    ev = calibrate_and_evaluate(cfg, core, prep)
    return write_record(cfg, prep, ev, fit_seconds, t_start)
