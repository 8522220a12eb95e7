"""Global-pool heads that are not ``pool -> flatten -> FC`` (ONNX path).

Two classifier heads pool the trunk globally and then do more than flatten:

- **per-position ops after the pool** (ConvNeXt: ``ReduceMean -> Transpose ->
  LayerNormalization over C -> Transpose -> Flatten -> Gemm``): the ops act on one
  position's channels, so on the map they run at every position of the pooled map;
- **no FC at all** (SqueezeNet: ``Conv -> Relu -> GlobalAveragePool -> Flatten``): the
  class scores are the pooled channels.

:func:`slide_global_pool` turns such a global pool (``GlobalAveragePool``/``GlobalMaxPool``,
or ``ReduceMean``/``ReduceMax`` over H and W with ``keepdims``) into an ``AveragePool``/
``MaxPool`` whose kernel is the trunk's output size at R, stride 1: the average over the
whole window becomes an average over an h x w window of the map, and the trunk now goes on
through the per-position ops. :func:`flatten_only_fc_head` then rewrites a head that is only
a flatten of a 1x1 map at R (no FC after it) by dropping the flatten: the map is the output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from densemap.convert.flatten_order import (
    MOVEMENT_OPS,
    PASS_OPS,
    UnknownOrder,
    detect_feature_order,
)
from densemap.convert.from_onnx.fc_head_build import make_dynamic
from densemap.convert.from_onnx.graph import GraphIndex, attributes, node_label, remove_dead_nodes
from densemap.convert.geometry import Trace
from densemap.service.errors import ConversionError

POOLS = {
    "GlobalAveragePool": "AveragePool",
    "GlobalMaxPool": "MaxPool",
    "ReduceMean": "AveragePool",
    "ReduceMax": "MaxPool",
}


def _reads_straight_into_fc(name: str, index: GraphIndex) -> bool:
    """Whether only movement ops lie between ``name`` and a Gemm/MatMul (the usual global
    pool head, which ``rewrite_fc_head`` handles as it is)."""
    node = index.sole_consumer(name)
    while node is not None and node.op_type in MOVEMENT_OPS | PASS_OPS:
        node = index.sole_consumer(node.output[0])
    return node is not None and node.op_type in ("Gemm", "MatMul")


def _pools_space(node: onnx.NodeProto, trace: Trace, index: GraphIndex, source: str) -> bool:
    if node.op_type.startswith("Global"):
        return True
    attrs, field = attributes(node), trace.fields[source]
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    if axes is None or not attrs.get("keepdims", 1):
        return False
    return {int(a) % field.rank for a in axes} == set(field.axes)


def slide_global_pool(graph: onnx.GraphProto, index: GraphIndex, trace: Trace) -> bool:
    """Replace the head's global pool by a sliding pool when per-position ops, or nothing
    but a flatten, follow it; returns whether the graph changed."""
    if len(trace.collapses) != 1:
        return False
    node, source = trace.collapses[0]
    if node.op_type not in POOLS or not _pools_space(node, trace, index, source):
        return False
    if _reads_straight_into_fc(node.output[0], index):
        return False
    field, shape = trace.fields[source], index.shape(source)
    if field.axes != (2, 3) or shape is None or None in shape:
        return False
    kernel = [int(shape[2]), int(shape[3])]
    sliding = helper.make_node(
        POOLS[node.op_type],
        [node.input[0]],
        [node.output[0]],
        name=f"{node.name or node.output[0]}_sliding",
        kernel_shape=kernel,
        strides=[1, 1],
        pads=[0, 0, 0, 0],
    )
    nodes = [sliding if n is node else _copy(n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(graph)  # the ReduceMean's axes input
    return True


def flatten_only_fc_head(model: onnx.ModelProto, *, index: GraphIndex, trace: Trace):
    """The dense model of a classifier whose head only flattens a 1x1 map at R (after
    :func:`slide_global_pool`: SqueezeNet), or ``None`` when the head has more."""
    node, source = trace.collapses[0]
    shape, field = index.shape(source), trace.fields[source]
    if node.op_type not in MOVEMENT_OPS or shape is None or None in shape:
        return None
    if any(shape[a] != 1 for a in field.axes):
        return None
    output = model.graph.output[0].name
    chain, name = [node], node.output[0]
    while name != output:
        following = index.sole_consumer(name)
        if following is None or following.op_type not in MOVEMENT_OPS | PASS_OPS:
            return None
        chain.append(following)
        name = following.output[0]
    channel_axis = ({0, 1, 2, 3} - set(field.axes) - {0}).pop()
    try:
        flat = detect_feature_order(chain, index, tuple(shape))
    except UnknownOrder:  # only channels are left: any reshape keeps their order
        flat = np.arange(int(np.prod(shape)))
    if not np.array_equal(flat, np.arange(shape[channel_axis])):
        raise ConversionError(f"{node_label(node)} reorders the class scores: not supported")
    perm = [0, channel_axis, *field.axes]
    if perm == [0, 1, 2, 3]:
        bridge = helper.make_node("Identity", [source], [output], name=f"{output}_map")
    else:
        bridge = helper.make_node("Transpose", [source], [output], name=f"{output}_map", perm=perm)
    graph = model.graph
    ids = {id(n) for n in chain}
    nodes = [_copy(n) for n in graph.node if id(n) not in ids] + [bridge]
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(graph)
    make_dynamic(model, layout=trace.layout, outputs={output: int(shape[channel_axis])})
    return model


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def convolutional_fc_head(model: onnx.ModelProto, *, index: GraphIndex, trace: Trace):
    """The dense model of a classifier whose every output is already an NCHW map of one
    cell at R (after :func:`slide_global_pool`: GAP -> 1x1 Conv, DenseNet as Caffe2 wrote
    it; conv head -> GAP -> Softmax, SqueezeNet's; a net of convolutions only), or
    ``None`` when space collapses somewhere or an output is not such a map."""
    if trace.collapses:
        return None
    outputs = {}
    for value in model.graph.output:
        field, shape = trace.fields.get(value.name), index.shape(value.name)
        if field is None or field.axes != (2, 3) or shape is None or len(shape) != 4:
            return None
        if tuple(shape[2:]) != (1, 1):
            raise ConversionError(
                f"the output {value.name!r} is already a feature map of {shape[2]}x{shape[3]} "
                "cells at the window size: not a window classifier (nothing to convert)"
            )
        outputs[value.name] = int(shape[1])
    make_dynamic(model, layout=trace.layout, outputs=outputs)
    return model
