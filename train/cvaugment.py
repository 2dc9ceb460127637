"""Training augmentation with OpenCV and numpy, fed to Keras batch by batch in a thread.

Why: the Keras augmentation layers (train/models.py build_augmenter: flip, rotation, zoom,
StainJitter) run inside the training graph, one resampling per layer, serially before the
network; measured on this 2-core CPU with EfficientNet-Lite0 at 128 px they halved training
throughput (15.6 against 26-33 img/s). Here the same distribution is drawn per image with one
`cv2.warpAffine` (flip, rotation and zoom composed into one matrix, reflected borders) and the
stain jitter as vectorised numpy, in a `keras.utils.PyDataset` worker thread that prepares the
next batch while the network trains on this one. Validation and evaluation never augment.
"""
from __future__ import annotations

import math

import numpy as np

# the ranges of build_augmenter / StainJitter at strength 1
ZOOM = 0.3
GAIN, SATURATION, CONTRAST, BRIGHTNESS, GAMMA = 0.15, 0.4, 0.25, 0.08, 0.25


def geometry_matrix(size: int, angle_rad: float, zoom: float, flip: bool) -> np.ndarray:
    """The 2x3 affine map (about the crop's centre) that mirrors (optionally), rotates by
    `angle_rad` and scales the content by `zoom`: cells have no orientation, and scanners
    differ in magnification. A vertical flip is a horizontal one plus a half turn, so one
    mirror and a full-circle rotation cover both."""
    c = (size - 1) / 2.0
    cos, sin = math.cos(angle_rad) * zoom, math.sin(angle_rad) * zoom
    rot = np.array([[cos, -sin, c - cos * c + sin * c], [sin, cos, c - sin * c - cos * c]])
    if not flip:
        return rot
    mirror = np.array([[-1.0, 0.0, 2 * c], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return rot @ mirror


def geometric(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Each uint8 crop flipped, rotated and zoomed at random (one resampling per crop)."""
    import cv2

    n, size = images.shape[0], images.shape[1]
    out = np.empty_like(images)
    angles = rng.uniform(-math.pi, math.pi, n)
    zooms = 1.0 / (1.0 + rng.uniform(-ZOOM * strength, ZOOM * strength, n))
    flips = rng.random(n) < 0.5
    for i in range(n):
        m = geometry_matrix(size, float(angles[i]), float(zooms[i]), bool(flips[i]))
        out[i] = cv2.warpAffine(images[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def stain_jitter(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Per-image channel gain, saturation, contrast, brightness and gamma (StainJitter's
    formula and ranges), uint8 in, float32 0..255 out."""
    s = strength
    n = images.shape[0]

    def u(shape, half):
        return rng.uniform(-half * s, half * s, shape).astype(np.float32)

    x = images.astype(np.float32) / 255.0
    x *= 1.0 + u((n, 1, 1, 3), GAIN)
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * (1.0 + u((n, 1, 1, 1), SATURATION))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + (x - mean) * (1.0 + u((n, 1, 1, 1), CONTRAST))
    x += u((n, 1, 1, 1), BRIGHTNESS)
    np.clip(x, 0.0, 1.0, out=x)
    x = np.power(x + 1e-6, np.exp(u((n, 1, 1, 1), GAMMA)))
    x *= 255.0
    return np.clip(x, 0.0, 255.0, out=x)


def augment_batch(images: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A batch of uint8 crops [N,S,S,3] -> augmented float32 0..255 (what the core takes)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError("augment_batch takes a uint8 batch [N, S, S, 3].")
    if strength <= 0:
        return images.astype(np.float32)
    return stain_jitter(geometric(images, rng, strength), rng, strength)


def batches(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None, batch_size: int, strength: float, seed: int,
            workers: int = 1):
    """A keras.utils.PyDataset of augmented, reshuffled-every-epoch training batches; `workers`
    threads prepare batches ahead (cv2 and numpy release the GIL). One keeps a 2-core PC's
    second core for the network; a GPU consumes batches faster than one thread makes them.
    Each batch's random draw depends only on (seed, epoch, batch), so it is the same whatever
    thread makes it."""
    import keras

    class AugmentedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(8, 2 * workers))
            self.epoch = 0
            self.order = np.random.default_rng([seed, 0]).permutation(len(x))

        def __len__(self) -> int:
            return math.ceil(len(x) / batch_size)

        def __getitem__(self, i: int):
            idx = np.sort(self.order[i * batch_size:(i + 1) * batch_size])
            rng = np.random.default_rng([seed, self.epoch, i])
            xb = augment_batch(x[idx], rng, strength)
            if sample_weight is None:
                return xb, y[idx]
            return xb, y[idx], sample_weight[idx]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

    return AugmentedBatches()
