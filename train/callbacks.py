"""Keras callbacks of the fit stage, built lazily so importing train.fit needs no TensorFlow."""
from __future__ import annotations

import time
from pathlib import Path


class KeepBest:
    """Save the core model whenever validation accuracy improves, so a run cut short (a time
    limit, a lost machine) still leaves its best model behind."""

    def __new__(cls, core, path: Path, budget_s: float, history: Path | None = None):
        import keras

        class CB(keras.callbacks.Callback):
            best = best_so_far(history)
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


def best_so_far(history: Path | None) -> float:
    """The best validation accuracy an interrupted run already logged (-1 without one), so a
    continued run does not overwrite its best model with a worse one."""
    import csv

    if history is None or not history.is_file():
        return -1.0
    with open(history, newline="") as fh:
        values = [float(r["val_accuracy"]) for r in csv.DictReader(fh) if r.get("val_accuracy")]
    return max(values, default=-1.0)


class Throughput:
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
