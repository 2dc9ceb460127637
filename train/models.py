"""Backbone + head builders. The core model maps float 0..255 RGB to logits; softmax and
temperature are added at export, augmentation only in the training wrapper."""
from __future__ import annotations

from pathlib import Path

import keras

from .backbones import BACKBONES, Backbone  # noqa: F401 - re-exported
from .config import TrainingError
from .layers import InputNormalization, StainJitter, ToFloat


class WeightsError(Exception):
    """A weights file that does not fit the chosen backbone; str is one sentence."""


def backbone_of(core: keras.Model) -> keras.Model:
    """The backbone of a core built by `build_core` (or loaded from its model.keras): the one
    nested keras.Model among the core's layers.

    Why by type and not `core.layers[2]`: the position is an accident of the layers before it
    (the input, the input normalisation); one more layer there and the index would silently
    name a head layer, whose weights --init-from would then copy across as the "backbone"."""
    nested = [layer for layer in core.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise TrainingError(f"model {core.name} holds {len(nested)} nested models where a core built by "
                            "train.models.build_core holds exactly one, its backbone.")
    return nested[0]


def _build_lite0(size: int, weights: str | None, pooling: str | None) -> keras.Model:
    from . import effnet_lite

    net = effnet_lite.build((size, size, 3), pooling=pooling)
    if weights is None:
        return net
    path = effnet_lite.packaged_weights() if weights == "imagenet" else weights
    try:
        effnet_lite.load_weights(net, _read_state(path))
    except (effnet_lite.PortError, ValueError) as exc:  # a state dict of another network
        raise WeightsError(f"weights file {path} does not match backbone efficientnet_lite0 ({exc}).") from None
    return net


def _read_state(path: str):
    from .torch_legacy import TorchLegacyError, load_state_dict

    try:
        return load_state_dict(path)
    except (TorchLegacyError, OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"weights file {path} is not a readable PyTorch legacy state dict ({exc}).") from None


def build_backbone(name: str, size: int, weights: str, bn_momentum: float | None, pooling: str | None = "avg") -> keras.Model:
    spec = BACKBONES[name]
    w = None if weights in ("none", "", None) else weights
    if w not in (None, "imagenet") and not Path(w).is_file():
        raise WeightsError(f"weights file {w} does not exist.")
    if name == "efficientnet_lite0":
        net = _build_lite0(size, w, pooling)
        if bn_momentum is not None:
            for layer in net.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = bn_momentum
        return net
    factory = getattr(keras.applications, spec.factory)
    try:
        net = factory(input_shape=(size, size, 3), include_top=False, weights=w, pooling=pooling, **dict(spec.kwargs))
    except (ValueError, OSError, KeyError) as exc:
        if w is None or w == "imagenet":
            raise
        raise WeightsError(f"weights file {w} does not match backbone {name} ({str(exc).splitlines()[0][:160]}).") from None
    if bn_momentum is not None:
        # Keras' MobileNets use momentum 0.999: after a short from-scratch run the moving
        # statistics lag the weights and eval-mode predictions can collapse to one class.
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    return net


def build_core(
    backbone: str,
    size: int,
    n_classes: int,
    weights: str = "none",
    colour_norm: str = "instance",
    dense: int = 256,
    dropout: float = 0.3,
    l2: float = 1e-4,
    bn_momentum: float | None = 0.9,
    head_conv: int = 0,
) -> tuple[keras.Model, keras.Model]:
    """(core, backbone): core maps [N,S,S,3] float 0..255 to logits; head as in the paper
    (normalisation, Dense 256 ReLU with L2, dropout) with logits out for temperature scaling.

    head_conv > 0 adds a 1x1 convolution of that width (BN, ReLU) on the backbone's last
    feature map, before pooling: capacity where the map is smallest (4x4-5x5 for a 128-160 px
    input), so it costs far less at run time than widening the network (ADR 0005).

    dense = 0 puts the logits straight on the pooled features (a linear head): the embedding
    `batchwbc adapt` refits on is then the backbone's full width (1,280 for Lite0), not a
    256-d bottleneck trained for the source labs only (ADR 0012)."""
    net = build_backbone(backbone, size, weights, bn_momentum, pooling=None if head_conv else "avg")
    inp = keras.Input((size, size, 3), dtype="float32", name="rgb")
    x = InputNormalization(BACKBONES[backbone].input_mode, colour_norm, name="input_norm")(inp)
    x = net(x)
    if head_conv:
        x = keras.layers.Conv2D(head_conv, 1, use_bias=False, kernel_regularizer=keras.regularizers.L2(l2), name="head_conv")(x)
        x = keras.layers.BatchNormalization(momentum=bn_momentum or 0.99, name="head_conv_bn")(x)
        x = keras.layers.ReLU(name="head_conv_relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = keras.layers.BatchNormalization(momentum=bn_momentum or 0.99, name="head_norm")(x)
    if dense:
        x = keras.layers.Dense(dense, activation="relu", kernel_regularizer=keras.regularizers.L2(l2), name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(n_classes, name="logits", dtype="float32")(x)
    return keras.Model(inp, logits, name=f"core_{backbone}"), net


def build_augmenter(strength: float, seed: int) -> keras.Sequential:
    """Rotations/flips (cells have no orientation), scale (Munich crops are ~1.6x larger than
    PBC ones) and stain/scanner colour jitter. No shifts: crops are centred on the cell, and
    each geometric layer is a full resampling that costs CPU time per epoch."""
    if strength <= 0:
        return keras.Sequential([], name="augment")
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom((-0.3 * strength, 0.3 * strength), fill_mode="reflect", seed=seed + 2),
            StainJitter(strength, seed=seed + 4),
        ],
        name="augment",
    )


def build_trainer(core: keras.Model, augmenter: keras.Model, size: int) -> keras.Model:
    """uint8 input -> augmentation (training only) -> core -> logits."""
    inp = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = ToFloat(name="to_float")(inp)
    x = augmenter(x)
    return keras.Model(inp, core(x), name="trainer")
