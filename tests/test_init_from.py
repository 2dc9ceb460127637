"""`--init-from`: weights carry across input sizes and head changes, and only where they fit."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _core(size: int, head_conv: int = 0):
    from train.models import build_core

    core, _ = build_core("mobilenet_025", size, 12, head_conv=head_conv)
    return core


def _saved(tmp_path, core):
    for w in core.weights:  # make the source distinguishable from a fresh initialisation
        w.assign(np.full(w.shape, 0.5, dtype=w.dtype.name if hasattr(w.dtype, "name") else w.dtype))
    path = tmp_path / "src.keras"
    core.save(path)
    return str(path)


def test_same_head_other_size_copies_everything(tmp_path):
    from train.fit import _copy_weights

    src = _saved(tmp_path, _core(32))
    dst = _core(48)
    assert _copy_weights(src, dst) == []
    assert all(np.all(w.numpy() == 0.5) for w in dst.weights)


def test_new_head_convolution_keeps_backbone_and_reinitialises_what_changed(tmp_path):
    from train.fit import _copy_weights

    src = _saved(tmp_path, _core(32))
    dst = _core(32, head_conv=24)
    fresh = _copy_weights(src, dst)
    assert fresh == ["head_conv", "head_conv_bn", "head_norm", "head_dense"]
    from train.models import backbone_of

    backbone = backbone_of(dst)
    assert all(np.all(w.numpy() == 0.5) for w in backbone.weights)
    assert not np.all(dst.get_layer("head_conv").kernel.numpy() == 0.5)
    assert np.all(dst.get_layer("logits").kernel.numpy() == 0.5)  # 256 -> 12 still fits
    out = dst.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0)
    assert out.shape == (2, 12)


def test_another_backbone_is_refused_in_one_sentence(tmp_path):
    from train.fit import TrainingError, _copy_weights
    from train.models import build_core

    src = _saved(tmp_path, _core(32))
    other, _ = build_core("mobilenetv3small", 32, 12)
    with pytest.raises(TrainingError, match="different backbone"):
        _copy_weights(src, other)


def test_the_backbone_is_found_by_type_not_position():
    """Issue 20: `core.layers[2]` named the backbone by accident of position; backbone_of finds
    the one nested model, and says so in one sentence when a model has none."""
    import keras

    from train.config import TrainingError
    from train.models import backbone_of, build_core

    core, net = build_core("mobilenet_025", 32, 12)
    assert backbone_of(core) is net
    inp = keras.Input((4,))
    flat = keras.Model(inp, keras.layers.Dense(2)(inp), name="flat")
    with pytest.raises(TrainingError, match=r"^model flat holds 0 nested models .* its backbone\.$"):
        backbone_of(flat)
