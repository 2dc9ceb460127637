"""Custom Keras layers, written with keras.ops only so they run on any Keras backend and
convert to ONNX. Registered so a saved `model.keras` reloads in `export/`."""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="batchwbc")
class ToFloat(keras.layers.Layer):
    """uint8 pixels -> float32 (0..255); the model, not the runtime, owns all arithmetic."""

    def call(self, x):
        return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package="batchwbc")
class InputNormalization(keras.layers.Layer):
    """Map 0..255 RGB to what the backbone expects, optionally after per-image colour
    standardisation.

    colour_norm="instance" standardises each channel of each image by its own mean and
    spread. Scanners and stains differ mostly by a global colour cast (PBC crops are peach,
    Munich crops lavender); removing it in-graph takes away the cheapest shortcut
    ("this colour = myeloblast") while keeping the cell's internal contrast.
    """

    MODES = ("minus1to1", "caffe", "raw255")

    def __init__(self, mode: str = "minus1to1", colour_norm: str = "instance", **kw):
        super().__init__(**kw)
        if mode not in self.MODES:
            raise ValueError(f"unknown input mode {mode}")
        self.mode = mode
        self.colour_norm = colour_norm

    def call(self, x):
        if self.colour_norm == "instance":
            # Computed channels-first: broadcasting a per-image [N,C,1,1] statistic over
            # contiguous planes is several times faster in onnxruntime than over the
            # interleaved channels of NHWC, and the transpose back cancels against the
            # converter's own NHWC->NCHW transpose before the first convolution.
            xt = ops.transpose(x, (0, 3, 1, 2))
            mean = ops.mean(xt, axis=(2, 3), keepdims=True)
            centred = xt - mean
            std = ops.sqrt(ops.mean(ops.square(centred), axis=(2, 3), keepdims=True))
            zt = centred * (1.0 / (std + 1.0))  # +1 (in pixel units) keeps flat images finite
            z = ops.transpose(zt, (0, 2, 3, 1))
            if self.mode == "minus1to1":
                return z * 0.5
            if self.mode == "caffe":
                return ops.flip(z, axis=-1) * 60.0
            return z * 60.0 + 128.0
        if self.mode == "minus1to1":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = ops.flip(x, axis=-1)
            return bgr - ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "colour_norm": self.colour_norm}


@keras.saving.register_keras_serializable(package="batchwbc")
class StainJitter(keras.layers.Layer):
    """Training-only colour augmentation imitating stain and scanner differences: per-channel
    gain (stain balance), brightness, contrast, saturation and gamma, each per image."""

    def __init__(self, strength: float = 1.0, seed: int | None = None, **kw):
        super().__init__(**kw)
        self.strength = float(strength)
        self.seed = seed
        self._gen = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.strength <= 0:
            return x
        s = self.strength
        n = ops.shape(x)[0]

        def u(shape, lo, hi):
            return keras.random.uniform(shape, lo, hi, seed=self._gen)

        x = x / 255.0
        gain = u((n, 1, 1, 3), 1.0 - 0.15 * s, 1.0 + 0.15 * s)
        x = x * gain
        grey = ops.mean(x, axis=-1, keepdims=True)
        sat = u((n, 1, 1, 1), 1.0 - 0.4 * s, 1.0 + 0.4 * s)
        x = grey + (x - grey) * sat
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        con = u((n, 1, 1, 1), 1.0 - 0.25 * s, 1.0 + 0.25 * s)
        x = mean + (x - mean) * con
        x = x + u((n, 1, 1, 1), -0.08 * s, 0.08 * s)
        x = ops.clip(x, 0.0, 1.0)
        gamma = ops.exp(u((n, 1, 1, 1), -0.25 * s, 0.25 * s))
        x = ops.power(x + 1e-6, gamma)
        return ops.clip(x * 255.0, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}
