"""Fold data-movement chains of an ONNX trunk that only reorder channels.

ShuffleNet's channel shuffle is ``Reshape(N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) ->
Reshape(N, C, H, W)``. Exported at the window size R, its Reshape targets hold R's H and W,
so the chain as it is would break on a larger image, and the geometry tracer cannot follow
a rank-5 tensor. But what it computes is a permutation of the channels, the same at every
position: ``Gather(x, perm, axis=1)``, which is per position and runs at any size.

:func:`fold_channel_moves` finds every chain of data-movement nodes (Reshape, Flatten,
Transpose, Squeeze, Unsqueeze, Gather with constant or shape-computed indices) that starts
and ends at the same rank-4 shape, pushes an index array through it at R (so the order is
read from the graph, never assumed) and replaces it with

- ``Identity`` when nothing moves (the dynamo exporter's ``as_strided`` after a global pool,
  ``Reshape(-1) -> Gather``, in ConvNeXt's head), or
- ``Gather(axis=a)`` when only axis ``a`` is permuted; the geometry tracer then accepts it
  only on the channel axis (a permutation of H or W has no dense form).

Chains that mix elements in any other way are left alone (the tracer reports them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.convert.flatten_order import UnknownOrder, fold_shape_tensor, move_indices
from densemap.convert.from_onnx.graph import GraphIndex, attributes, remove_dead_nodes
from densemap.service.errors import ConversionError

MOVE_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather"})
MAX_CHAIN = 6


def _move(node: onnx.NodeProto, index: GraphIndex, array: np.ndarray) -> np.ndarray:
    if node.op_type != "Gather":
        return move_indices(node, index, array)
    indices = index.constant(node.input[1])
    if indices is None:
        indices = fold_shape_tensor(node.input[1], index)
    if indices is None:
        raise UnknownOrder(node.input[1])
    axis = attributes(node).get("axis", 0) % array.ndim
    return np.take(array, indices.astype(np.int64), axis=axis)


def _chain(start: onnx.NodeProto, index: GraphIndex):
    """(nodes, moved index array) of the movement chain from ``start`` back to its input's
    rank-4 shape, or None."""
    shape = index.shape(start.input[0])
    if shape is None or len(shape) != 4 or None in shape:
        return None
    array = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    nodes, node = [], start
    while len(nodes) < MAX_CHAIN:
        try:
            array = _move(node, index, array)
        except (UnknownOrder, ConversionError, ValueError, IndexError, np.exceptions.AxisError):
            return None  # an unknown target, or not a plain movement: left to the tracer
        nodes.append(node)
        if array.shape == tuple(shape):
            # a size-1 axis hides what a Transpose does to it at R (a 1x1 map's H/W swap
            # looks like the identity): only Transpose-free chains are read there
            hidden = 1 in shape[1:] and any(n.op_type == "Transpose" for n in nodes)
            return None if hidden else (nodes, array)
        readers = index.consumers.get(node.output[0], [])
        outputs = {value.name for value in index.graph.output}
        if len(readers) != 1 or node.output[0] in outputs:
            return None
        node = readers[0]
        if node.op_type not in MOVE_OPS or node.input[0] != nodes[-1].output[0]:
            return None
    return None


def _permuted_axis(array: np.ndarray) -> tuple[int | None, np.ndarray | None] | None:
    """(None, None) for the identity; (axis, perm) when only ``axis`` is permuted, the same
    way at every position of the others; None for any other reordering."""
    coords = np.unravel_index(array, array.shape)
    grid = np.indices(array.shape)
    moved = [a for a in range(array.ndim) if not np.array_equal(coords[a], grid[a])]
    if not moved:
        return None, None
    if len(moved) != 1:
        return None
    axis = moved[0]
    perm = np.moveaxis(coords[axis], axis, 0).reshape(array.shape[axis], -1)
    if not np.all(perm == perm[:, :1]):
        return None
    return axis, perm[:, 0].astype(np.int64)


def fold_channel_moves(graph: onnx.GraphProto) -> int:
    """Replace the channel-only movement chains of ``graph`` (see the module docstring);
    returns how many were folded."""
    folded = 0
    while True:
        index = GraphIndex.build(graph)
        for node in graph.node:
            if node.op_type not in MOVE_OPS:
                continue
            found = _chain(node, index)
            kind = None if found is None else _permuted_axis(found[1])
            if kind is None or (
                kind[0] is not None and len(found[0]) == 1 and node.op_type == "Gather"
            ):
                continue
            _replace(graph, found[0], kind)
            folded += 1
            break
        else:
            if folded:
                remove_dead_nodes(graph)
            return folded


def _replace(graph: onnx.GraphProto, chain: list[onnx.NodeProto], kind) -> None:
    axis, perm = kind
    first, last = chain[0], chain[-1]
    name = f"{first.name or first.output[0]}_channels"
    if axis is None:
        new = helper.make_node("Identity", [first.input[0]], [last.output[0]], name=name)
    else:
        indices = f"{name}_perm"
        graph.initializer.append(numpy_helper.from_array(perm, indices))
        new = helper.make_node(
            "Gather", [first.input[0], indices], [last.output[0]], name=name, axis=axis
        )
    ids = {id(n) for n in chain}
    nodes = [new if n is last else _copy(n) for n in graph.node if id(n) not in ids or n is last]
    del graph.node[:]
    graph.node.extend(nodes)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
