"""Keras callbacks of the fit stage, built lazily so importing train.fit needs no TensorFlow."""
from __future__ import annotations

import time
from pathlib import Path


class KeepBest:
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
