"""Ops over the class axis of a one-position map, written as old exporters wrote them.

- **Softmax before opset 13** normalises axis ``axis`` and every axis after it together.
  Where those after it are all 1 at R (C x 1 x 1 after a global pool) it is a softmax over
  ``axis`` alone: :func:`channel_softmaxes` writes it as ``Transpose -> Softmax(last axis)
  -> Transpose``, which stays a class softmax on the map. One over real spatial extent at
  R is left for the geometry tracer to refuse (it is computed per image).
- **Per-feature ops after a flatten of one position** (``GAP -> 1x1 Conv -> Flatten ->
  Softmax``, MobileNet and SqueezeNet as MXNet wrote them): :func:`sink_flatten` moves a
  Flatten/Reshape/Squeeze that only drops the unit axes of a map of one cell at R after
  the activation or softmax reading it (the softmax then runs over the channel axis), so
  the head ends in the flatten and the map is the output.
"""

from __future__ import annotations

import onnx
from onnx import helper

from densemap.convert.from_onnx.global_windows import replace_node
from densemap.convert.from_onnx.graph import (
    CHANNEL_AXIS_OPS,
    GraphIndex,
    attributes,
    opset_version,
    set_attribute,
)


def channel_softmaxes(model: onnx.ModelProto, index: GraphIndex) -> bool:
    if opset_version(model) >= 13:
        return False
    graph, changed = model.graph, False
    for node in list(graph.node):
        if node.op_type not in CHANNEL_AXIS_OPS:
            continue
        shape = index.shape(node.input[0])
        if shape is None or len(shape) < 3:
            continue
        axis = attributes(node).get("axis", 1) % len(shape)
        rest = shape[axis + 1 :]
        if axis == len(shape) - 1 or None in rest or any(n != 1 for n in rest):
            continue
        perm = [a for a in range(len(shape)) if a != axis] + [axis]
        back = [perm.index(a) for a in range(len(shape))]
        name = node.name or node.output[0]
        moved, normalised = f"{name}_class_last", f"{name}_over_classes"
        new = onnx.NodeProto()
        new.CopyFrom(node)
        set_attribute(new, "axis", len(shape) - 1)
        final = node.output[0]
        del new.input[:], new.output[:]
        new.input.append(moved)
        new.output.append(normalised)
        nodes = [
            helper.make_node("Transpose", [node.input[0]], [moved], perm=perm, name=moved),
            new,
            helper.make_node("Transpose", [normalised], [final], perm=back, name=f"{name}_back"),
        ]
        replace_node(graph, node, nodes)
        changed = True
    return changed


SINKABLE = frozenset(
    "Relu LeakyRelu PRelu Sigmoid Tanh Clip Elu Selu Celu HardSigmoid HardSwish Softplus "
    "Softsign Identity Dropout Exp Log Neg Abs Softmax LogSoftmax".split()
)


def _unit_flatten_axis(node, index: GraphIndex) -> int | None:
    """The channel axis of a rank-4 map of one position that ``node`` (Flatten, Reshape or
    Squeeze) turns into [N, C] without reordering anything, else ``None``."""
    if node.op_type not in ("Flatten", "Reshape", "Squeeze"):
        return None
    shape, out = index.shape(node.input[0]), index.shape(node.output[0])
    if shape is None or out is None or len(shape) != 4 or len(out) != 2 or None in shape[1:]:
        return None
    wide = [a for a in range(1, 4) if shape[a] != 1]
    if len(wide) != 1 or out[1] != shape[wide[0]]:
        return None
    return wide[0]


def sink_flatten(model: onnx.ModelProto, index: GraphIndex) -> bool:
    """Move one flatten of a one-position map after the per-feature op reading it."""
    graph, opset = model.graph, opset_version(model)
    for flat in list(graph.node):
        axis = _unit_flatten_axis(flat, index)
        op = index.sole_consumer(flat.output[0]) if axis is not None else None
        if op is None or op.op_type not in SINKABLE or op.input[0] != flat.output[0]:
            continue
        if any(index.constant(name) is None or index.constant(name).size != 1
               for name in op.input[1:] if name):  # fmt: skip
            continue  # a per-feature vector (a PRelu slope) would need laying out: leave it
        if op.op_type in CHANNEL_AXIS_OPS and attributes(op).get("axis", 1) % 2 != 1:
            continue  # over the batch axis: not over the features
        name = op.name or op.output[0]
        moved, result = f"{name}_on_map", op.output[0]
        nodes = _on_map(op, flat.input[0], moved, axis=axis, opset=opset)
        flattened = onnx.NodeProto()
        flattened.CopyFrom(flat)
        flattened.input[0], flattened.output[0] = moved, result
        replace_node(graph, op, [*nodes, flattened])
        graph.node.remove(flat)
        return True
    return False


def _on_map(op, source: str, target: str, *, axis: int, opset: int) -> list:
    """``op`` applied to the rank-4 map ``source`` instead of its flattened features."""
    copy = onnx.NodeProto()
    copy.CopyFrom(op)
    del copy.input[0:1]
    copy.input.insert(0, source)
    copy.output[0] = target
    if op.op_type not in CHANNEL_AXIS_OPS:
        return [copy]
    if opset >= 13:
        set_attribute(copy, "axis", axis)
        return [copy]
    perm = [a for a in range(4) if a != axis] + [axis]  # old softmax: classes last
    back = [perm.index(a) for a in range(4)]
    last, normalised = f"{target}_classes_last", f"{target}_normalised"
    copy.input[0], copy.output[0] = last, normalised
    set_attribute(copy, "axis", 3)
    return [
        helper.make_node("Transpose", [source], [last], perm=perm, name=last),
        copy,
        helper.make_node("Transpose", [normalised], [target], perm=back, name=target),
    ]
