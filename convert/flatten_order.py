"""Which feature map element each input of the first fully-connected layer reads.

Between the trunk and the first Gemm/MatMul, classifiers move data without computing:
Flatten, Reshape, Transpose (Keras/TF flatten H,W,C), Squeeze. Pushing an index array
through exactly those ops gives, for every feature f of the FC input, the (c, y, x) element
of the feature map it reads. That is the flatten order, read from the graph, whatever the
framework. When a Reshape's target cannot be resolved, the caller falls back on an order
the user names (``chw`` for PyTorch/Caffe, ``hwc`` for Keras/TensorFlow).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from densemap.convert.from_onnx.graph import GraphIndex, attributes, node_label
from densemap.service.errors import ConversionError

MOVEMENT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
PASS_OPS = frozenset({"Identity", "Dropout"})


class UnknownOrder(Exception):
    """A Reshape target in the flatten chain could not be resolved from the graph."""


def _axes_of(node: onnx.NodeProto, index: GraphIndex, rank: int) -> list[int] | None:
    axes = attributes(node).get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        if value is None:
            raise UnknownOrder(node.input[1])
        axes = value.reshape(-1).tolist()
    return None if axes is None else [int(a) % rank for a in axes]


SHAPE_FOLD_OPS = frozenset(
    "Shape Constant Gather Unsqueeze Squeeze Concat Cast Slice Identity Mul Div Add Sub "
    "ReduceProd Range".split()
)


def fold_shape_tensor(name: str, index: GraphIndex) -> np.ndarray | None:
    """The value of a small shape computation (``Shape -> Gather -> Unsqueeze -> Concat``
    of the legacy torch exporter) when every Shape reads a tensor of known static shape.
    onnx's own data propagation skips it before opset 14 (Reshape-13, Unsqueeze-11)."""
    nodes, pending, seen = [], [name], set()
    while pending:
        tensor = pending.pop()
        if tensor in seen or index.constant(tensor) is not None:
            continue
        seen.add(tensor)
        node = index.producer.get(tensor)
        if node is None or node.op_type not in SHAPE_FOLD_OPS or len(nodes) > 32:
            return None
        nodes.append(node)
        if node.op_type == "Shape":
            shape = index.shape(node.input[0])
            if shape is None or None in shape:
                return None
        else:
            pending.extend(n for n in node.input if n)
    from onnx.reference import ReferenceEvaluator

    leaves = {n for node in nodes for n in node.input if n and index.constant(n) is not None}
    inputs = {node.input[0] for node in nodes if node.op_type == "Shape"}
    graph = onnx.helper.make_graph(
        [node for node in index.graph.node if any(node is n for n in nodes)],
        "shape",
        [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)],
        [numpy_helper.from_array(np.asarray(index.constant(n)), n) for n in sorted(leaves)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", index.opset)])
    feeds = {n: np.zeros(index.shape(n), dtype=np.float32) for n in inputs}
    for n in inputs:
        graph.input.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    try:
        return np.asarray(ReferenceEvaluator(model).run(None, feeds)[0])
    except Exception:  # an op the reference runtime rejects: fall back on the named order
        return None


def _reshape_target(node: onnx.NodeProto, index: GraphIndex, size_in: tuple[int, ...]) -> list:
    target = index.constant(node.input[1])
    if target is None:
        target = fold_shape_tensor(node.input[1], index)
    if target is None:
        shape = index.shape(node.output[0])
        if shape is None or None in shape:
            raise UnknownOrder(node.output[0])
        return list(shape)
    target = [int(v) for v in target.reshape(-1)]
    if not attributes(node).get("allowzero", 0):
        target = [size_in[i] if v == 0 else v for i, v in enumerate(target)]
    return target


def move_indices(node: onnx.NodeProto, index: GraphIndex, array: np.ndarray) -> np.ndarray:
    """Apply one data-movement node to an array of element indices."""
    op, attrs = node.op_type, attributes(node)
    if op in PASS_OPS:
        return array
    if op == "Transpose":
        return np.transpose(array, attrs.get("perm"))
    if op == "Flatten":
        axis = attrs.get("axis", 1) % max(array.ndim, 1)
        return array.reshape(int(np.prod(array.shape[:axis])), -1)
    if op == "Reshape":
        return array.reshape(_reshape_target(node, index, array.shape))
    if op == "Squeeze":
        axes = _axes_of(node, index, array.ndim)
        if axes is None:
            axes = [a for a, n in enumerate(array.shape) if n == 1]
        return np.squeeze(array, axis=tuple(axes))
    if op == "Unsqueeze":
        axes = _axes_of(node, index, array.ndim + 1)
        return np.expand_dims(array, axis=tuple(sorted(axes)))
    raise ConversionError(f"{node_label(node)} is not a data-movement op")


def detect_feature_order(
    chain: list[onnx.NodeProto], index: GraphIndex, source_shape: tuple[int, ...]
) -> np.ndarray:
    """For each FC input feature, its flat index into ``source_shape`` (batch 0 only).

    Raises :class:`UnknownOrder` when a Reshape target is not known.
    """
    array = np.arange(int(np.prod(source_shape)), dtype=np.int64).reshape(source_shape)
    for node in chain:
        array = move_indices(node, index, array)
    if array.ndim != 2:
        raise ConversionError(
            f"the fully-connected layer reads a rank-{array.ndim} tensor; expected [N, features]"
        )
    return array[0]


def feature_coordinates(
    flat: np.ndarray, source_shape: tuple[int, ...], *, channel_axis: int, spatial_axes: tuple
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split flat indices into (channel, y, x) arrays; checks they cover batch item 0 once."""
    coords = np.unravel_index(flat, source_shape)
    other = [a for a in range(len(source_shape)) if a not in (channel_axis, *spatial_axes)]
    if any(np.any(coords[a] != 0) for a in other):
        raise ConversionError("the head mixes batch items: it is not a per-image classifier")
    channel = coords[channel_axis]
    y = coords[spatial_axes[0]] if spatial_axes else np.zeros_like(channel)
    x = coords[spatial_axes[1]] if spatial_axes else np.zeros_like(channel)
    cells = [source_shape[channel_axis], *(source_shape[a] for a in spatial_axes)]
    expected = int(np.prod(cells))
    keys = (channel * 1_000_003 + y) * 1_000_003 + x
    if len(flat) != expected or len(np.unique(keys)) != expected:
        raise ConversionError(
            f"the fully-connected layer reads {len(flat)} features but the feature map has "
            f"{expected} elements: the flatten is not a plain reordering"
        )
    return channel, y, x


def named_order(order: str, channels: int, height: int, width: int):
    """(channel, y, x) per feature for a flatten in ``chw`` or ``hwc`` order."""
    features = np.arange(channels * height * width)
    if order == "chw":
        c, y, x = np.unravel_index(features, (channels, height, width))
    else:
        y, x, c = np.unravel_index(features, (height, width, channels))
    return c, y, x
