"""The alignment of benchmarks/adapt_adabn.py on a constructed two-convolution graph (no data):
the AdaBN row in docs/adaptation.md is only as good as this rescaling."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt_adabn.py"
_spec = importlib.util.spec_from_file_location("adapt_adabn", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _graph(with_bias: bool = True):
    """uint8 NHWC image -> float NCHW -> Conv(3->4) -> Relu -> Conv(4->2, depthwise-free, maybe no bias)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.1
    b1 = rng.normal(size=4).astype(np.float32)
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"] if with_bias else ["r1", "w2"], ["c2"]),
    ]
    if with_bias:
        inits.append(numpy_helper.from_array(np.zeros(2, np.float32), "b2"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.UINT8, [None, 8, 8, 3])],
                          [helper.make_tensor_value_info("c2", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("with_bias", [True, False])
def test_aligned_convolutions_have_the_reference_statistics_on_the_lab_cells(with_bias):
    model = _graph(with_bias)
    rng = np.random.default_rng(1)
    home = rng.integers(0, 120, (40, 8, 8, 3), dtype=np.uint8)
    lab = rng.integers(100, 256, (40, 8, 8, 3), dtype=np.uint8)  # another "stain": brighter
    reference = bench.channel_statistics(model, ["c1", "c2"], home, threads=1)
    before = bench.channel_statistics(model, ["c1", "c2"], lab, threads=1)
    assert not np.allclose(before[0][0], reference[0][0], atol=0.1)  # the shift is real
    aligned = bench.align_convolutions(model, reference, lab, threads=1, max_scale=100.0)
    after = bench.channel_statistics(aligned, ["c1", "c2"], lab, threads=1)
    for (m_ref, s_ref), (m_new, s_new) in zip(reference, after):
        np.testing.assert_allclose(m_new, m_ref, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s_new, s_ref, rtol=1e-3, atol=1e-3)
    # the home cells are not what was aligned: on them the statistics move away
    home_after = bench.channel_statistics(aligned, ["c1"], home, threads=1)
    assert not np.allclose(home_after[0][0], reference[0][0], atol=0.1)


def test_reference_of_another_model_is_refused():
    model = _graph()
    cells = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="do not match"):
        bench.align_convolutions(model, [(np.zeros(4), np.ones(4))], cells, threads=1)
