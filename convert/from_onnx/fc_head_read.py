"""Read a classifier's head from an ONNX graph: where it reads the trunk, its FC layers.

:func:`trunk_source` finds the feature map F every head reads (the trunk's last) and the
nodes where it collapses: a Flatten/Reshape or a global pool, one per head or shared.
:func:`first_layers` follows each of them through movement ops (Flatten, Reshape,
Transpose, Squeeze) to the FC layers that read F, with the (c, y, x) element each of their
input features reads (the flatten order, read from the graph). :func:`read_linear` turns a
Gemm or MatMul(+Add) into an effective ``(O, I)`` weight and a bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from densemap.convert.flatten_order import (
    MOVEMENT_OPS,
    PASS_OPS,
    UnknownOrder,
    detect_feature_order,
    feature_coordinates,
    named_order,
)
from densemap.convert.from_onnx.graph import GraphIndex, attributes, node_label
from densemap.convert.geometry import Field
from densemap.service.errors import ConversionError

AVERAGE_OPS = {"GlobalAveragePool": "AveragePool", "ReduceMean": "AveragePool"}
MAX_OPS = {"GlobalMaxPool": "MaxPool", "ReduceMax": "MaxPool"}


@dataclass
class Linear:
    """One FC layer: ``output = input @ weight.T + bias``."""

    nodes: list[onnx.NodeProto]
    input: str
    output: str
    weight: np.ndarray  # (O, I)
    bias: np.ndarray | None  # (O,)


@dataclass
class FirstLayer:
    """An FC layer that reads the trunk's feature map (flattened or globally pooled): it
    becomes a Conv with a ``conv_kernel`` kernel, after a sliding ``pool`` if any."""

    linear: Linear
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]  # (c, y, x) per FC input feature
    conv_kernel: tuple[int, int]
    pool: tuple[str, tuple[int, int]] | None  # (AveragePool | MaxPool, kernel)


def _constant_weight(node: onnx.NodeProto, index: GraphIndex, name: str) -> np.ndarray:
    value = index.constant(name)
    if value is None:
        raise ConversionError(f"{node_label(node)} has non-constant weights: cannot convert")
    if value.dtype.kind != "f":
        raise ConversionError(f"{node_label(node)} has {value.dtype} weights; expected floats")
    return value


def _bias(node: onnx.NodeProto, value: np.ndarray, outputs: int) -> np.ndarray:
    if value.size == 1:
        return np.full(outputs, value.reshape(-1)[0], dtype=value.dtype)
    if value.size != outputs:
        raise ConversionError(f"{node_label(node)} has a bias of shape {list(value.shape)}")
    return value.reshape(outputs)


def read_linear(node: onnx.NodeProto, index: GraphIndex) -> Linear:
    """The FC layer computed by a Gemm, or by a MatMul and the Add that may follow it."""
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if attrs.get("transA", 0):
            raise ConversionError(f"{node_label(node)} transposes its input (transA=1)")
        b = _constant_weight(node, index, node.input[1])
        weight = (b if attrs.get("transB", 0) else b.T) * b.dtype.type(attrs.get("alpha", 1.0))
        bias = None
        if len(node.input) > 2 and node.input[2]:
            c = _constant_weight(node, index, node.input[2])
            bias = _bias(node, c * c.dtype.type(attrs.get("beta", 1.0)), weight.shape[0])
        return Linear([node], node.input[0], node.output[0], weight, bias)
    b = _constant_weight(node, index, node.input[1])
    if b.ndim != 2:
        raise ConversionError(f"{node_label(node)} multiplies by a rank-{b.ndim} tensor")
    linear = Linear([node], node.input[0], node.output[0], b.T, None)
    add = index.sole_consumer(node.output[0])
    if add is not None and add.op_type == "Add":
        other = [name for name in add.input if name != node.output[0]]
        value = index.constant(other[0]) if len(other) == 1 else None
        if value is not None and value.size in (1, b.shape[1]):
            linear.nodes.append(add)
            linear.output = add.output[0]
            linear.bias = _bias(add, value, b.shape[1])
    return linear


def trunk_source(trace, model) -> tuple[str, list[onnx.NodeProto]]:
    """The trunk's last feature map, which every head reads, and the nodes where it
    collapses into the heads (a flatten or global pool per head, or one shared)."""
    if not trace.collapses:
        raise ConversionError(
            "the model has no fully-connected or global-pool head: its output is already a "
            "feature map (nothing to convert)"
        )
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node, source in trace.collapses:
        readers.setdefault(source, []).append(node)
    if len(readers) > 1:
        reads = "; ".join(
            f"{node_label(nodes[0])} reads {source!r}" for source, nodes in readers.items()
        )
        raise ConversionError(
            f"the heads read different feature maps ({reads}): every head must read the same "
            "trunk output (a head on an earlier layer has another geometry, no common grid)"
        )
    for value in model.graph.output:
        if value.name not in trace.global_origin:
            raise ConversionError(
                f"the output {value.name!r} is not computed by a classifier head (a feature "
                "map or a constant?): every output must be computed from the trunk's "
                "flattened or globally pooled output"
            )
    ((source, nodes),) = readers.items()
    for node in nodes:
        if node.op_type in ("MatMul", "Gemm") or (
            node.op_type not in MOVEMENT_OPS and node.op_type not in AVERAGE_OPS | MAX_OPS
        ):
            raise ConversionError(
                f"the head starts with {node_label(node)}, which is neither a flatten nor an "
                "average/max global pool (attention or a global operation?): no exact dense form"
            )
    return source, nodes


def _fc_branches(name: str, index: GraphIndex, chain: list) -> list[tuple[list, onnx.NodeProto]]:
    """(movement nodes, first FC node) for every FC layer reading ``name`` through
    Flatten/Reshape/Transpose/Squeeze only; the heads may share the flatten."""
    outputs = {value.name for value in index.graph.output}
    readers = [n for n in index.consumers.get(name, []) if n.op_type not in ("Shape", "Size")]
    if name in outputs:
        raise ConversionError(
            f"the output {name!r} is the feature map itself, flattened or pooled, not computed "
            "by a fully-connected head: it has no per-window dense form beside the heads"
        )
    if not readers:
        producer = index.producer.get(name)
        where = node_label(producer) if producer is not None else f"tensor {name!r}"
        raise ConversionError(
            f"the head is not a flatten -> fully-connected chain: {where} feeds no FC layer "
            "(attention or a global operation?): no exact dense form"
        )
    branches = []
    for node in readers:
        if node.op_type in ("Gemm", "MatMul"):
            if node.input[0] != name or index.constant(node.input[1]) is None:
                raise ConversionError(
                    f"{node_label(node)} multiplies the flattened feature map by a tensor that "
                    "is not a constant weight (attention or a global operation?): no exact "
                    "dense form"
                )
            branches.append((chain, node))
        elif node.op_type in MOVEMENT_OPS | PASS_OPS and node.input[0] == name:
            branches += _fc_branches(node.output[0], index, [*chain, node])
        else:
            raise ConversionError(
                f"{node_label(node)} sits between the feature map and the first fully-connected "
                "layer; only Flatten, Reshape, Transpose and Squeeze are supported there. "
                "A class token joined to the flattened map, or attention over it, is computed "
                "per image: no exact dense form"
            )
    return branches


def _global_pool(node, field, index, source_shape):
    axes = set(field.axes)
    if node.op_type.startswith("Reduce"):
        rank = len(source_shape)
        attrs = attributes(node)
        raw = attrs.get("axes")
        if raw is None and len(node.input) > 1:
            value = index.constant(node.input[1])
            raw = None if value is None else value.reshape(-1).tolist()
        if raw is None or {int(a) % rank for a in raw} != axes:
            raise ConversionError(f"{node_label(node)} must reduce exactly the H and W axes")
        keep = attrs.get("keepdims", 1)
    else:
        keep = 1
    channel_axis = ({0, 1, 2, 3} - axes - {0}).pop()
    pooled_shape = tuple(1 if a in axes else n for a, n in enumerate(source_shape))
    if not keep:
        channel_axis -= sum(1 for a in axes if a < channel_axis)
        pooled_shape = tuple(n for a, n in enumerate(source_shape) if a not in axes)
    pool_op = (AVERAGE_OPS | MAX_OPS)[node.op_type]
    return pool_op, pooled_shape, channel_axis


def _feature_map_order(chain, index, source_shape, field, flatten_order, fc):
    """(c, y, x) per FC input feature, detected from the graph or named by the user."""
    channel_axis = ({0, 1, 2, 3} - set(field.axes) - {0}).pop()
    channels, height, width = (source_shape[a] for a in (channel_axis, *field.axes))
    try:
        flat = detect_feature_order(chain, index, source_shape)
    except UnknownOrder as unknown:
        if flatten_order == "auto" and channels > 1 and height * width > 1:
            raise ConversionError(
                f"cannot tell the flatten order feeding {node_label(fc)} (tensor {unknown} has "
                "no known shape): pass flatten_order 'chw' (PyTorch, Caffe) or 'hwc' (Keras, "
                "TensorFlow); on the command line --flatten-order chw|hwc"
            ) from None
        order = "chw" if flatten_order == "auto" else flatten_order
        return named_order(order, channels, height, width)
    coords = feature_coordinates(
        flat, source_shape, channel_axis=channel_axis, spatial_axes=field.axes
    )
    if flatten_order != "auto" and not all(
        np.array_equal(a, b)
        for a, b in zip(coords, named_order(flatten_order, channels, height, width), strict=True)
    ):
        raise ConversionError(
            f"the graph flattens the feature map in another order than flatten_order="
            f"{flatten_order!r}: leave it on 'auto', the graph's order is exact"
        )
    return coords


def first_layers(
    collapses, index: GraphIndex, *, source: str, field: Field, flatten_order: str
) -> list[FirstLayer]:
    """Every FC layer that reads the feature map ``source`` through ``collapses``."""
    source_shape = index.shape(source)
    if source_shape is None or None in source_shape or len(source_shape) != 4:
        raise ConversionError(f"the feature map {source!r} before the head has no known shape")
    kernel = tuple(source_shape[a] for a in field.axes)
    firsts = []
    for node in collapses:
        if node.op_type in AVERAGE_OPS or node.op_type in MAX_OPS:
            pool_op, pooled_shape, channel_axis = _global_pool(node, field, index, source_shape)
            for chain, fc in _fc_branches(node.output[0], index, []):
                try:
                    flat = detect_feature_order(chain, index, pooled_shape)
                except UnknownOrder:  # only channels remain: any reshape keeps their order
                    flat = np.arange(int(np.prod(pooled_shape)))
                channel = np.unravel_index(flat, pooled_shape)[channel_axis]
                coords = (channel, np.zeros_like(channel), np.zeros_like(channel))
                linear = read_linear(fc, index)
                firsts.append(FirstLayer(linear, coords, (1, 1), (pool_op, kernel)))
        else:
            for chain, fc in _fc_branches(node.output[0], index, [node]):
                coords = _feature_map_order(chain, index, source_shape, field, flatten_order, fc)
                firsts.append(FirstLayer(read_linear(fc, index), coords, kernel, None))
    return firsts
