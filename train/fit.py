"""The training run: data -> split -> model -> fit -> calibrate -> evaluate -> save."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from batchwbc import catalogue
from batchwbc.preprocess import PREPROCESSING_ID, PREPROCESSING_WHOLE

from . import calibration, data, evaluate, split


class TrainingError(Exception):
    """A run that cannot proceed; str is one sentence."""


class _KeepBest:
    """Save the core model whenever validation accuracy improves, so a run cut short (a time
    limit, a lost machine) still leaves its best model behind."""

    def __new__(cls, core, path: Path, budget_s: float):
        import keras

        class CB(keras.callbacks.Callback):
            best = -1.0
            t0 = time.time()

            def on_epoch_end(self, epoch, logs=None):
                acc = float((logs or {}).get("val_accuracy", -1))
                if acc > self.best:
                    self.best = acc
                    core.save(path)
                if budget_s and time.time() - self.t0 > budget_s:
                    print(f"time budget reached after epoch {epoch + 1}; stopping", flush=True)
                    self.model.stop_training = True

        return CB()


class _Throughput:
    """Keras callback printing images/s per epoch (the number the model card quotes)."""

    def __new__(cls, n_train: int):
        import keras

        class CB(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                dt = time.perf_counter() - self.t0
                logs = logs or {}
                logs["epoch_seconds"] = dt
                print(f"epoch {epoch + 1}: {n_train / dt:.0f} img/s, {dt:.0f} s", flush=True)

        return CB()


def _copy_weights(path: str, core) -> list[str]:
    """Copy the weights of a saved core into a freshly built one of another input size or head.

    Convolutions do not depend on the input size, so a model trained at 128 px is a good
    start at 160 px. The nested backbone is matched by position (its name contains the size)
    and must match exactly; head layers are matched by name and a head layer whose shape
    changed (or that is new) keeps its fresh initialisation. Returns those layers' names.
    """
    import keras

    import train.layers  # noqa: F401 - custom layers for load_model

    src = keras.saving.load_model(path, compile=False)
    by_name = {layer.name: layer for layer in src.layers}
    src_backbone, dst_backbone = src.layers[2], core.layers[2]
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


def _degraded(paths: list[str], data_root: Path, size: int, preprocessing: str, share: float,
              seed: int, workers: int, defocus_max: float = 0.0, recolour_share: float = 0.0,
              sources: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, images): a seeded `share` of the training crops, re-decoded from their files,
    degraded like a lower-quality analyzer's export (train.degrade), optionally recoloured like
    another training crop (another stain), and framed again."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from batchwbc.preprocess import decode_rgb, read_bytes, to_model_input

    from .degrade import colour_donors, degrade, lab_stats, random_params, recolour

    if not data_root.is_dir():
        raise TrainingError("--degrade needs the original image files; it cannot work from a packed file.")
    rng = np.random.default_rng(seed + 7)
    pick = np.flatnonzero(rng.random(len(paths)) < share)
    params = random_params(rng, len(pick), defocus_max)
    # drawn after the earlier draws, so runs without recolouring reproduce the earlier ones
    donors = colour_donors(rng, len(pick), sources or [], recolour_share)

    def one(k):
        rgb = decode_rgb(read_bytes(data_root / paths[pick[k]]))
        if donors[k] >= 0:  # the colour statistics of another whole training crop
            rgb = recolour(rgb, *lab_stats([decode_rgb(read_bytes(data_root / paths[donors[k]]))]))
        return to_model_input(degrade(rgb, *params[k]), size, preprocessing)

    out = np.empty((len(pick), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for k, arr in enumerate(pool.map(one, range(len(pick)))):
            out[k] = arr
    what = "scale, JPEG quality" + (f", defocus up to {defocus_max:g} px" if defocus_max > 0 else "")
    what += f", {int((donors >= 0).sum())} recoloured like other crops" if recolour_share > 0 else ""
    print(f"degraded {len(pick)} of {len(paths)} training crops ({what}) before framing")
    return pick, out


def soft_targets(teacher_npz: str, paths: list[str], labels: np.ndarray, n_classes: int, alpha: float) -> np.ndarray:
    """alpha x the teacher's probabilities + (1 - alpha) x the one-hot label, per training crop.

    The teacher's logits are looked up by crop path (they may come from another input size or
    several views, `python -m train.diagnose teacher`); the hard label keeps a share so a
    confidently wrong teacher cannot overrule the annotation.
    """
    with np.load(teacher_npz, allow_pickle=False) as z:
        table = dict(zip(z["paths"].tolist(), z["logits"]))
    missing = [p for p in paths if p not in table]
    if missing:
        raise TrainingError(f"{teacher_npz} has no teacher logits for {len(missing)} training crops (e.g. {missing[0]}).")
    soft = calibration.softmax(np.stack([table[p] for p in paths]).astype(np.float64))
    return (alpha * soft + (1 - alpha) * np.eye(n_classes)[labels]).astype(np.float32)


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


def run(opt: dict, data_root: Path, out: Path, fractions: tuple[float, float, float]) -> dict:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    size = opt["size"]
    # Build the model first: a backbone/weights mismatch is reported before minutes of decoding.
    import keras

    from . import models

    keras.utils.set_random_seed(opt["seed"])
    n_classes = len(catalogue.CLASS_IDS)
    if opt.get("resume"):
        import train.layers  # noqa: F401 - custom layers for load_model

        core = keras.saving.load_model(opt["resume"], compile=False)
        backbone = core.layers[2]
        print(f"resumed from {opt['resume']}")
    else:
        try:
            core, backbone = models.build_core(
                opt["backbone"], size, n_classes, opt["weights"], opt["colour_norm"], dropout=opt["dropout"], bn_momentum=opt["bn_momentum"],
                head_conv=opt.get("head_conv") or 0,
            )
        except models.WeightsError as exc:
            raise TrainingError(str(exc)) from None
        if opt.get("init_from"):
            fresh = _copy_weights(opt["init_from"], core)
            print(f"initialised from {opt['init_from']} (input size {size})" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    print(f"reading {data_root} ...", flush=True)
    preprocessing = resolve_preprocessing(opt.get("preprocessing"), opt.get("resume"))
    if opt.get("resume"):
        print(f"preprocessing {preprocessing} (the resumed run's)" if not opt.get("preprocessing") else f"preprocessing {preprocessing}")
    ds = data.load(data_root, size, opt["workers"], opt["limit_per_class"], opt["seed"], preprocessing)
    train_only = bool(opt.get("train_only"))
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
        if opt.get("pin_test"):
            pinned_paths = {r["path"] for r in split.read_split_csv(Path(opt["pin_test"])) if r["split"] == "test"}
            pinned = [p in pinned_paths for p in ds.paths]
            print(f"{sum(pinned)} images pinned to the test split by {opt['pin_test']}")
        if pinned is None and all(p is None for p in patients):
            assign = np.array(split.stratified_split(strata, fractions, opt["seed"]))
        else:
            assign = np.array(split.grouped_split(strata, patients, fractions, opt["seed"], pinned))
    split.write_split_csv(
        out / "split.csv",
        [(p, catalogue.CLASS_IDS[l], s, a) for p, l, s, a in zip(ds.paths, ds.labels, ds.sources, assign)],
    )
    idx = {name: np.flatnonzero(assign == name) for name in split.SPLITS}
    for name in split.SPLITS:
        print(f"{name}: {len(idx[name])} images")
    if min(len(idx[k]) for k in (("train", "val") if train_only else split.SPLITS)) == 0:
        raise TrainingError("too few images to make train, validation and test splits.")

    trainer = models.build_trainer(core, models.build_augmenter(opt["augment"], opt["seed"]), size)

    x_tr, y_tr = ds.images[idx["train"]], ds.labels[idx["train"]]
    if opt.get("zoom_out_source"):
        from .rescale import parse_spec, zoomed_copies

        try:
            src, lo, hi = parse_spec(opt["zoom_out_source"])
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        pick = np.array([i for i in idx["train"] if ds.sources[i] == src], dtype=int)
        if len(pick) == 0:
            raise TrainingError(f"--zoom-out-source: no training images come from source {src!r}.")
        factors = np.random.default_rng(opt["seed"]).uniform(lo, hi, len(pick))
        x_tr = np.concatenate([x_tr, zoomed_copies(ds.images[pick], factors)])
        y_tr = np.concatenate([y_tr, ds.labels[pick]])
        print(f"added {len(pick)} zoomed-out copies (x{lo}-{hi}) of {src} training crops")
    if opt.get("degrade"):
        if opt.get("teacher_logits"):
            raise TrainingError("--degrade cannot be combined with --teacher-logits.")
        pick, x_deg = _degraded([ds.paths[i] for i in idx["train"]], data_root, size, preprocessing,
                                float(opt["degrade"]), opt["seed"], opt["workers"], float(opt.get("degrade_defocus") or 0.0),
                                float(opt.get("degrade_recolour") or 0.0), [ds.sources[i] for i in idx["train"]])
        if opt.get("degrade_mode") == "add":  # keep every clean crop and add the degraded ones
            x_tr = np.concatenate([x_tr, x_deg])
            y_tr = np.concatenate([y_tr, ds.labels[idx["train"][pick]]])
        else:  # x_tr starts with the training crops in idx order (a copy of ds.images)
            x_tr[pick] = x_deg
    class_weight = None
    if opt["balance"] == "weights":
        counts = np.bincount(y_tr, minlength=n_classes)
        present = counts > 0
        class_weight = {k: float(len(y_tr) / (present.sum() * counts[k])) if counts[k] else 0.0 for k in range(n_classes)}
    x_va = ds.images[idx["val"]]
    y_va = ds.labels[idx["val"]]
    sample_weight = None
    y_va_fit = y_va
    distill = bool(opt.get("teacher_logits"))
    if distill:
        if opt.get("zoom_out_source"):
            raise TrainingError("--teacher-logits cannot be combined with --zoom-out-source.")
        y_tr = soft_targets(opt["teacher_logits"], [ds.paths[i] for i in idx["train"]], y_tr, n_classes, opt.get("distill_alpha", 0.7))
        y_va_fit = np.eye(n_classes, dtype=np.float32)[y_va]  # calibration below still needs y_va as labels
        if class_weight is not None:  # Keras class weights need integer labels; weight the samples instead
            sample_weight = np.array([class_weight[k] for k in ds.labels[idx["train"]]], dtype=np.float32)
            class_weight = None
        print(f"distilling from {opt['teacher_logits']} (alpha {opt.get('distill_alpha', 0.7)})")

    def compile_(lr):
        trainer.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True) if distill else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")] if distill else ["accuracy"],
        )

    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=opt["patience"], restore_best_weights=True, verbose=1),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5, verbose=1),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        _Throughput(len(y_tr)),
        _KeepBest(core, out / "model.keras", 60.0 * (opt.get("time_budget_min") or 0)),
    ]
    if opt["epochs"] > 0:
        (out / "history.csv").unlink(missing_ok=True)
    t_fit = time.time()
    epoch0 = 0
    if opt["freeze_epochs"] > 0 and opt["weights"] != "none":
        backbone.trainable = False
        compile_(opt["lr"])
        h = trainer.fit(x_tr, y_tr, validation_data=(x_va, y_va_fit), epochs=opt["freeze_epochs"], batch_size=opt["batch_size"],
                        class_weight=class_weight, sample_weight=sample_weight, callbacks=callbacks, verbose=2)
        epoch0 = len(h.history["loss"])
        backbone.trainable = True
        compile_(opt["fine_tune_lr"] or opt["lr"] / 10)
    else:
        compile_(opt["lr"])
    if opt["epochs"] > epoch0:
        trainer.fit(x_tr, y_tr, validation_data=(x_va, y_va_fit), epochs=opt["epochs"], initial_epoch=epoch0,
                    batch_size=opt["batch_size"], class_weight=class_weight, sample_weight=sample_weight, callbacks=callbacks, verbose=2)
    fit_seconds = time.time() - t_fit
    if train_only:
        core.save(out / "model.keras")
        # The contract must travel with the model even without metrics: --resume reads it here.
        (out / "run.json").write_text(json.dumps({
            "options": dict(opt), "input_size": size, "preprocessing": preprocessing, "train_only": True,
            "fit_seconds": fit_seconds, "keras": keras.__version__, "backend": keras.backend.backend(),
        }, indent=2, default=str))
        print(f"train-only run finished in {fit_seconds / 60:.1f} min; best model in {out / 'model.keras'}")
        return {}
    if (out / "history.csv").is_file():
        evaluate.plot_history(out / "history.csv", out)

    # Judge only by evaluation-mode predictions on held-out data, never the training curve.
    def logits_of(name):
        x = ds.images[idx[name]].astype(np.float32)
        return core.predict(x, batch_size=128, verbose=0)

    val_logits, test_logits = logits_of("val"), logits_of("test")
    temperature = calibration.fit_temperature(val_logits, y_va)
    val_probs = calibration.softmax(val_logits, temperature)
    threshold = calibration.review_threshold(val_probs, y_va, opt["review_target_accuracy"])
    ece_before, _ = calibration.reliability(calibration.softmax(val_logits), y_va)
    results = {}
    for name, lg in (("val", val_logits), ("test", test_logits)):
        probs = calibration.softmax(lg, temperature)
        srcs = [ds.sources[i] for i in idx[name]]
        results[name] = evaluate.write_artifacts(out, name, probs, ds.labels[idx[name]], srcs)
    np.savez_compressed(out / "logits.npz", val=val_logits, test=test_logits, val_idx=idx["val"], test_idx=idx["test"])
    core.save(out / "model.keras")

    test = results["test"]["summary"]
    record = {
        "options": {k: v for k, v in opt.items()},
        "data_root": str(data_root),
        "input_size": size,
        "preprocessing": preprocessing,
        "classes": list(catalogue.CLASS_IDS),
        "temperature": temperature,
        "review_threshold": threshold,
        "val_ece_uncalibrated": ece_before,
        "val_ece": results["val"]["ece"],
        "test_ece": results["test"]["ece"],
        "counts": {f"{c}|{s}": int(n) for (c, s), n in sorted(ds.scan.counts().items())},
        "split_sizes": {k: int(len(v)) for k, v in idx.items()},
        "dropped": len(ds.dropped),
        "skipped": {f"{s}: {r}": n for (s, r), n in sorted(ds.scan.skipped.items())},
        "test_summary": test,
        "val_summary": results["val"]["summary"],
        "fit_seconds": fit_seconds,
        "total_seconds": time.time() - t_start,
        "epochs_run": (sum(1 for _ in open(out / "history.csv")) - 1) if (out / "history.csv").is_file() else 0,
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}",
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    print(
        f"test: accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}; paper classes: accuracy "
        f"{test['paper10_accuracy']:.4f}, macro-F1 {test['paper10_macro_f1']:.4f}; T={temperature:.3f}, "
        f"review threshold {threshold:.2f}; fit {fit_seconds / 60:.1f} min"
    )
    return record
