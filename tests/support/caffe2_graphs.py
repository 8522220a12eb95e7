"""Caffe2-style ONNX classifiers (IR 3, opset 9, weights listed as graph inputs), built by
hand in the shapes the classic ONNX model zoo files have: weights computed by
constant subgraphs, an old Softmax over C x 1 x 1, heads with no FC layer after a global
pool, a padded pool that is global at R, a channel split by Slice.

Every builder returns ``(classifier, window)``. The trunks are unpadded unless a test says
otherwise, so crop-by-crop evaluation in float64 is an exact reference for every cell.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.support.convert_onnx_support import GraphBuilder

CAFFE2_OPSET = 9
CAFFE2_IR = 3
GOOGLENET_FEATURES = "relu9"  # the 6 x 6 map the global-at-R pool reads


def caffe2_style(model: onnx.ModelProto, *, opset: int = CAFFE2_OPSET) -> onnx.ModelProto:
    """``model`` as Caffe2's exporter wrote it: IR 3, an old opset, and every initializer
    also listed as a graph input."""
    model.ir_version = CAFFE2_IR
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    listed = {value.name for value in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            model.graph.input.append(
                helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )
    onnx.checker.check_model(model)
    return model


def _trunk(g: GraphBuilder, *, pad: int = 0) -> None:
    g.conv(4, 3, pad=pad)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(6, 3, pad=pad)
    g.node("Relu")


def reshaped_weight_classifier(*, constant_of_shape_bias: bool = False):
    """Flatten -> Gemm whose weight is ``Reshape(initializer, initializer)`` (and whose
    bias may be ``ConstantOfShape``), Caffe2's AlexNet/VGG style; window 14."""
    g = GraphBuilder(3, seed=11)
    _trunk(g)  # 14 -> 12 -> 6 -> 4: a 6 x 4 x 4 volume
    flat = g.node("Flatten", axis=1)
    stored = g.const(g.rng.standard_normal(5 * 96).astype(np.float32) * 0.2, "stored")
    target = g.const(np.array([5, 96], dtype=np.int64), "target")
    weight = g.node("Reshape", [stored, target])
    if constant_of_shape_bias:
        bias_shape = g.const(np.array([5], dtype=np.int64), "bias_shape")
        value = helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.25])
        bias = g.node("ConstantOfShape", [bias_shape], value=value)
    else:
        bias = g.const(g.rng.standard_normal(5).astype(np.float32), "b")
    g.node("Gemm", [flat, weight, bias], transB=1)
    g.node("Softmax", axis=1)
    return caffe2_style(g.model(14, opset=CAFFE2_OPSET, output_dims=[1, 5])), (14, 14)


def squeezenet_style_classifier():
    """Conv head -> Relu -> GlobalAveragePool -> Softmax(axis=1) on [1, C, 1, 1]: the old
    Softmax flattens C x 1 x 1, a class softmax at R; window 14."""
    g = GraphBuilder(3, seed=12)
    _trunk(g)
    g.conv(5, 1)
    g.node("Relu")
    g.node("GlobalAveragePool")
    g.node("Softmax", axis=1)
    return caffe2_style(g.model(14, opset=CAFFE2_OPSET, output_dims=[1, 5, 1, 1])), (14, 14)


def densenet_style_classifier(*, softmax: bool = False, flatten: bool = False):
    """... -> GlobalAveragePool -> 1x1 Conv (the FC layer as Caffe2 wrote it) -> 4-D output
    (DenseNet-121 of the model zoo), optionally an old Softmax or a Flatten after it."""
    g = GraphBuilder(3, seed=13)
    _trunk(g)
    g.node("GlobalAveragePool")
    g.conv(5, 1)
    if softmax:
        g.node("Softmax", axis=1)
    if flatten:
        g.node("Flatten", axis=1)
    dims = [1, 5] if flatten else [1, 5, 1, 1]
    return caffe2_style(g.model(14, opset=CAFFE2_OPSET, output_dims=dims)), (14, 14)


def googlenet_style_classifier(
    *, count_include_pad: int = 0, op: str = "AveragePool", trunk_pad: int = 0
):
    """A 6 x 6 map -> pool kernel 7, stride 1, pads (0, 0, 1, 1) -> Dropout -> Reshape ->
    Gemm -> Softmax: at R the pool averages the 36 real values (GoogLeNet of the model zoo);
    its dense form is a 6 x 6 sliding average. ``op="Conv"``: a 7 x 7 conv with those pads
    instead; ``trunk_pad``: zero padding in the trunk's convs too. Window 16; the pool
    reads ``GOOGLENET_FEATURES``."""
    g = GraphBuilder(3, seed=14)
    g.conv(4, 3 + 2 * trunk_pad, pad=trunk_pad)  # 16 -> 14
    g.node("Relu")
    g.pool("MaxPool", 2, 2)  # 14 -> 7
    g.conv(6, 2 + 2 * trunk_pad, pad=trunk_pad)  # 7 -> 6
    g.node("Relu")
    if op == "Conv":  # a conv whose padding makes it global at R: only 6 x 6 taps meet values
        g.conv(6, 7, pad=[0, 0, 1, 1])
    else:
        attrs = {"count_include_pad": count_include_pad} if op == "AveragePool" else {}
        g.node(op, kernel_shape=[7, 7], strides=[1, 1], pads=[0, 0, 1, 1], **attrs)
    g.node("Dropout")
    target = g.const(np.array([1, -1], dtype=np.int64), "target")
    g.node("Reshape", [g.current, target])
    weight = g.const(g.rng.standard_normal((5, 6)).astype(np.float32), "fc")
    g.node("Gemm", [g.current, weight, g.const(g.rng.standard_normal(5).astype(np.float32))],
           transB=1)  # fmt: skip
    g.node("Softmax", axis=1)
    return caffe2_style(g.model(16, opset=CAFFE2_OPSET, output_dims=[1, 5])), (16, 16)


def channel_split_classifier(*, opset: int = CAFFE2_OPSET):
    """ShuffleNet-V2's ``x.chunk(2, dim=1)`` as the legacy exporter writes it: two Slices on
    axis 1 (attributes before opset 10, constant inputs from 10), one half through a conv,
    Concat, then Flatten -> Gemm. Window 12."""
    g = GraphBuilder(3, seed=15)
    g.conv(8, 3)  # 12 -> 10
    g.node("Relu")
    trunk = g.current
    if opset < 10:
        left = g.node("Slice", [trunk], axes=[1], starts=[0], ends=[4])
        right = g.node("Slice", [trunk], axes=[1], starts=[4], ends=[8])
    else:
        axes = g.const(np.array([1], dtype=np.int64), "axes")
        left = g.node("Slice", [trunk, g.const(np.array([0], np.int64)), g.const(np.array([4], np.int64)), axes])  # fmt: skip
        right = g.node("Slice", [trunk, g.const(np.array([4], np.int64)), g.const(np.array([8], np.int64)), axes])  # fmt: skip
    g.current, g.channels = right, 4
    branch = g.conv(4, 1)
    g.node("Concat", [left, branch], axis=1)
    g.pool("MaxPool", 2, 2)  # 10 -> 5
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 8 * 25)).astype(np.float32) * 0.1, "fc")
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32))], transB=1)
    return caffe2_style(g.model(12, opset=opset, output_dims=[1, 3]), opset=opset), (12, 12)


def shuffle_classifier():
    """A channel shuffle (Reshape to [1, 2, 3, H, W] -> Transpose -> Reshape, the targets
    holding R's H and W) inside an IR-3 trunk: its fold adds an initializer (the channel
    index), which an IR-3 graph must also list as an input. Window 12."""
    g = GraphBuilder(3, seed=16)
    g.conv(6, 3)  # 12 -> 10
    g.node("Relu")
    g.node("Reshape", [g.current, g.const(np.array([1, 2, 3, 10, 10], np.int64), "grouped")])
    g.node("Transpose", perm=[0, 2, 1, 3, 4])
    g.node("Reshape", [g.current, g.const(np.array([1, 6, 10, 10], np.int64), "shuffled")])
    g.conv(4, 3)  # 10 -> 8
    g.node("Relu")
    g.pool("MaxPool", 2, 2)  # 8 -> 4
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 64)).astype(np.float32) * 0.1, "fc")
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32))], transB=1)
    return caffe2_style(g.model(12, opset=CAFFE2_OPSET, output_dims=[1, 3])), (12, 12)


def spatial_softmax_classifier():
    """An old Softmax(axis=1) over C x 2 x 2 at R: it normalises over space too, per image
    (no dense form). Window 10."""
    g = GraphBuilder(3, seed=17)
    g.conv(4, 3)  # 10 -> 8
    g.pool("MaxPool", 4, 4)  # 8 -> 2
    g.node("Softmax", axis=1)
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 16)).astype(np.float32), "fc")
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32))], transB=1)
    return caffe2_style(g.model(10, opset=CAFFE2_OPSET, output_dims=[1, 3])), (10, 10)


def strided_global_pool_classifier():
    """``F.avg_pool2d(x, 4)`` on a 4x4 map (CIFAR ResNets' head): stride 4, one output at
    R; the map's stride must stay the trunk's, not 4 times it. Window 12."""
    g = GraphBuilder(3, seed=18)
    g.conv(4, 3)  # 12 -> 10
    g.node("Relu")
    g.pool("MaxPool", 2, 2)  # 10 -> 5
    g.conv(6, 2)  # 5 -> 4
    g.pool("AveragePool", 4, 4)
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 6)).astype(np.float32), "fc")
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32))], transB=1)
    return caffe2_style(g.model(12, opset=CAFFE2_OPSET, output_dims=[1, 3])), (12, 12)


def spatial_batchnorm_classifier():
    """BatchNormalization with statistics per position (spatial=0, opset 7): tied to R."""
    g = GraphBuilder(3, seed=19)
    g.conv(2, 3)  # 8 -> 6
    stats = [g.const(g.rng.random((2, 6, 6)).astype(np.float32) + 0.5) for _ in range(4)]
    g.node("BatchNormalization", [g.current, *stats], spatial=0)
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 72)).astype(np.float32), "fc")
    g.node("Gemm", [g.current, weight, g.const(np.zeros(3, np.float32))], transB=1)
    return caffe2_style(g.model(8, opset=7, output_dims=[1, 3]), opset=7), (8, 8)


def flatten_then_softmax_classifier(*, conv: bool = True, opset: int = 7):
    """GAP -> [1x1 Conv] -> Flatten -> Softmax: MobileNet/SqueezeNet as MXNet's exporter
    wrote them (opset 7): no FC layer, the softmax after the flatten. Window 14."""
    g = GraphBuilder(3, seed=20)
    _trunk(g)
    g.node("GlobalAveragePool")
    if conv:
        g.conv(5, 1)
    g.node("Flatten", axis=1)
    g.node("Softmax", axis=1)
    dims = [1, 5 if conv else 6]
    return caffe2_style(g.model(14, opset=opset, output_dims=dims), opset=opset), (14, 14)


def opset6_classifier():
    """Opset 6 (older than onnxruntime runs): BatchNormalization with ``is_test``, Gemm with
    ``broadcast``. Window 14."""
    g = GraphBuilder(3, seed=22)
    g.conv(4, 3)  # 14 -> 12
    stats = [g.const(g.rng.random(4).astype(np.float32) + 0.5) for _ in range(4)]
    g.node("BatchNormalization", [g.current, *stats], epsilon=1e-5)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)  # 12 -> 6
    g.node("Flatten", axis=1)
    weight = g.const(g.rng.standard_normal((3, 144)).astype(np.float32) * 0.1, "fc")
    g.node("Gemm", [g.current, weight, g.const(g.rng.standard_normal(3).astype(np.float32))],
           transB=1)  # fmt: skip
    g.node("Softmax", axis=1)
    model = g.model(14, opset=7, output_dims=[1, 3])
    for node in model.graph.node:
        if node.op_type == "Gemm":
            node.attribute.append(helper.make_attribute("broadcast", 1))
        if node.op_type == "BatchNormalization":
            node.attribute.append(helper.make_attribute("is_test", 1))
    model.opset_import[0].version = 6
    return caffe2_style(model, opset=6), (14, 14)
