"""The float64 evaluator behind exactness tests and ``verify --dtype float64`` agrees with
onnxruntime where onnx.reference alone does not: MaxPool with unequal begin and end pads
(Caffe2's ceil-mode emulation), ceil mode and dilation."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from densemap.convert.runtime import Float64Runner

CASES = [  # kernel, stride, pads (top, left, bottom, right), input size, ceil_mode, dilation
    (3, 2, [0, 0, 1, 1], (14, 14), 0, 1),
    (3, 1, [1, 0, 1, 2], (6, 9), 0, 1),  # onnx.reference alone gives 5x10
    (7, 1, [0, 0, 1, 1], (6, 6), 0, 1),  # onnx.reference alone raises
    (3, 2, [1, 1, 1, 1], (8, 10), 1, 1),
    (2, 2, [0, 0, 0, 0], (7, 7), 1, 1),
    (3, 1, [2, 2, 2, 2], (9, 9), 0, 2),
]


@pytest.mark.parametrize(("kernel", "stride", "pads", "size", "ceil", "dilation"), CASES)
def test_max_pool_matches_onnxruntime(kernel, stride, pads, size, ceil, dilation):
    node = helper.make_node(
        "MaxPool", ["x"], ["y"], kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=pads,
        ceil_mode=ceil, dilations=[dilation] * 2,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    image = np.random.default_rng(0).standard_normal((1, 2, *size)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": image})[0]
    pooled = Float64Runner(model)(image)
    assert pooled.dtype == np.float64 and pooled.shape == expected.shape
    np.testing.assert_array_equal(pooled, expected.astype(np.float64))  # max: no rounding
