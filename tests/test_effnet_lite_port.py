"""EfficientNet-Lite0 ported to Keras: the legacy .pth reader and the port against PyTorch's outputs.

The reference outputs in tests/data were computed with PyTorch (tests/data/make_effnet_lite0_reference.py,
torch 2.13.0 CPU, efficientnet-lite-pytorch 0.1.0) so that neither CI nor the runtime needs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.torch_legacy import TorchLegacyError, load_state_dict

DATA = Path(__file__).parent / "data"


def test_legacy_reader_reproduces_torch_tensors():
    sd = load_state_dict(DATA / "torch_legacy_sample.pth")
    base = np.arange(24, dtype=np.float32).reshape(4, 6) / np.float32(7.0)
    assert list(sd) == ["conv.weight", "transposed", "offset_view", "bn.num_batches_tracked", "empty"]
    np.testing.assert_allclose(sd["conv.weight"].ravel(), np.linspace(-1, 1, 54, dtype=np.float32), atol=1e-6)
    np.testing.assert_array_equal(sd["transposed"], base.T)
    np.testing.assert_array_equal(sd["offset_view"], base[1:, 2:])
    assert sd["bn.num_batches_tracked"].dtype == np.int64 and int(sd["bn.num_batches_tracked"]) == 12345
    assert sd["empty"].shape == (0,)


def test_legacy_reader_refuses_other_files(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"PK\x03\x04 not a legacy pickle")
    with pytest.raises((TorchLegacyError, Exception)):
        load_state_dict(bad)
    import pickle

    bad.write_bytes(pickle.dumps(42))
    with pytest.raises(TorchLegacyError, match="magic"):
        load_state_dict(bad)


@pytest.fixture(scope="module")
def lite0_pth() -> Path:
    pytest.importorskip("keras")
    from train.effnet_lite import PortError, packaged_weights

    try:
        return packaged_weights()
    except PortError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("size,name", [(144, "cat"), (224, "noise")])
def test_keras_port_matches_pytorch_reference(lite0_pth, size, name):
    import cv2
    import keras

    from train import effnet_lite

    ref = np.load(DATA / "effnet_lite0_reference.npz")
    if name == "cat":
        img = cv2.imread(str(DATA / "chelsea144.png"))[:, :, ::-1]
    else:
        img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    model = effnet_lite.from_pth(lite0_pth, (size, size, 3), include_top=True)
    features = keras.Model(model.input, model.get_layer("avg_pool").output)
    x = ((img.astype(np.float32) - effnet_lite.INPUT_MEAN) / effnet_lite.INPUT_SCALE)[None]
    f = features.predict(x, verbose=0)[0]
    logits = model.predict(x, verbose=0)[0]
    assert np.abs(f - ref[f"{name}{size}_features"]).max() <= 1e-4
    assert np.abs(logits - ref[f"{name}{size}_logits"]).max() <= 1e-4
    if name == "cat":  # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat
        assert int(np.argmax(logits)) in (281, 282, 285)


def test_strict_load_refuses_a_state_dict_of_another_network(lite0_pth):
    pytest.importorskip("keras")
    from train import effnet_lite

    state = load_state_dict(lite0_pth)
    state.pop("_blocks.5._bn1.running_var")
    with pytest.raises(effnet_lite.PortError, match="_blocks.5._bn1.running_var"):
        effnet_lite.load_weights(effnet_lite.build((64, 64, 3)), state)
    state = load_state_dict(lite0_pth)
    state["_extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(effnet_lite.PortError, match="no layer"):
        effnet_lite.load_weights(effnet_lite.build((64, 64, 3)), state)
