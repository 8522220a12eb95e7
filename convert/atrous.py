"""À-trous variants: a dense model with a finer output stride S/k in one pass.

DeepLab's ``output_stride`` rule, applied to the ONNX graph as a DAG: a tensor whose
original jump J exceeds the target T = S/k is computed at jump ``min(J, T)`` with rate
``r = J / min(J, T)``. So in topological order,

- a strided Conv/pool whose output jump would pass T gets the stride that lands on T
  (usually 1), and the rate of everything after it grows by the removed factor;
- every later Conv AND pool reads its input at rate r: dilation *= r and pads *= r
  (same-padding k//2 becomes d*(k-1)/2), so it sees exactly the pixels it saw before;
- parallel branches (a ResNet's downsample path) get the same treatment because the rule
  depends only on each tensor's jump, so their sum stays aligned.

The result equals k x k shift-and-stitch of the dense model on unpadded nets, bit for bit
in exact arithmetic. ceil_mode on a pool whose stride becomes 1 changes nothing (ceil(x/1)
= x). AveragePool has ``dilations`` only from opset 19: older models are converted to opset
19 with ``onnx.version_converter`` first (a depthwise-Conv replacement would not be
bit-identical to the pool and is exact only without padding), or refused with an error.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import numpy_helper

from densemap.convert.from_onnx.graph import (
    WINDOW_OPS,
    GraphIndex,
    attributes,
    node_label,
    opset_version,
    set_attribute,
    window_params,
)
from densemap.convert.geometry import trace_graph
from densemap.service.errors import ConversionError

Pair = tuple[int, int]
AVERAGE_POOL_DILATION_OPSET = 19


def _axis_plan(jump_in: int, stride: int, target: int) -> tuple[int, int] | None:
    """(new stride, input rate) of one window op along one axis, or None if impossible."""
    new_in = min(jump_in, target)
    jump_out = jump_in * stride
    new_out = min(jump_out, target)
    if jump_in % new_in or new_out % new_in or (jump_out >= target and jump_out % target):
        return None
    return new_out // new_in, jump_in // new_in


def _window_nodes(model: onnx.ModelProto):
    index = GraphIndex.build(model.graph)
    trace = trace_graph(model, index=index)
    stride = trace.fields[model.graph.output[0].name].jump
    nodes = []
    for node in model.graph.node:
        if node.op_type in WINDOW_OPS or (node.op_type == "Pad" and node.input[0] in trace.fields):
            nodes.append((node, trace.fields[node.input[0]].jump))
    return index, stride, nodes


def _axis_supported(nodes, index, axis: int, target: int) -> bool:
    for node, jump in nodes:
        stride = 1 if node.op_type == "Pad" else window_params(node, index)["strides"][axis]
        if _axis_plan(jump[axis], stride, target) is None:
            return False
    return True


def supported_strides(dense: onnx.ModelProto) -> tuple[Pair, ...]:
    """Every output stride (h, w) an à-trous variant of ``dense`` can have, coarsest first."""
    index, stride, nodes = _window_nodes(dense)
    per_axis = [
        [
            t
            for t in range(stride[a], 0, -1)
            if stride[a] % t == 0 and _axis_supported(nodes, index, a, t)
        ]
        for a in range(2)
    ]
    return tuple(itertools.product(*per_axis))


def _unsupported(dense, factor, stride) -> ConversionError:
    options = supported_strides(dense)
    heights = sorted({h for h, _ in options}, reverse=True)
    widths = sorted({w for _, w in options}, reverse=True)
    return ConversionError(
        f"output stride {stride} / {factor} is not reachable by removing trailing strides; "
        f"supported output strides: height {heights}, width {widths}"
    )


def _scale_pad_node(node, index, model, rate: Pair, axes: Pair) -> None:
    """Multiply a Pad node's spatial pads by the rate of its input."""
    value = index.constant(node.input[1]) if len(node.input) > 1 else None
    if value is None or (len(node.input) > 3 and node.input[3]):
        raise ConversionError(f"{node_label(node)}: only constant pads over all axes can dilate")
    pads = value.reshape(-1).copy()
    rank = len(pads) // 2
    for axis, r in zip(axes, rate, strict=True):
        pads[axis] *= r
        pads[axis + rank] *= r
    name = f"{node.input[1]}_rate{rate[0]}x{rate[1]}"
    model.graph.initializer.append(numpy_helper.from_array(pads.astype(np.int64), name))
    node.input[1] = name


def _needs_newer_opset(model, target) -> bool:
    """Whether a pool gets dilated that this opset cannot dilate (AveragePool < 19, ...)."""
    opset = opset_version(model)
    oldest = {"AveragePool": AVERAGE_POOL_DILATION_OPSET, "MaxPool": 10, "LpPool": 18}
    _, _, nodes = _window_nodes(model)
    return any(
        opset < oldest.get(node.op_type, 0)
        and any(j > t for j, t in zip(jump, target, strict=True))
        for node, jump in nodes
    )


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        upgraded = onnx.version_converter.convert_version(model, AVERAGE_POOL_DILATION_OPSET)
    except Exception as exc:  # the converter raises assorted types
        raise ConversionError(
            f"dilating this pool needs opset {AVERAGE_POOL_DILATION_OPSET}, and converting "
            f"this opset-{opset_version(model)} model failed ({exc}): re-export it at opset 19"
        ) from None
    return upgraded


def _ceil_to_end_pads(model, node, old_strides, strides, rate, pads) -> bool:
    """Turn the ceil_mode overhang of a pool that changes into explicit end padding.

    ceil_mode lets the last window overhang the input end by up to s-1 input units, which
    the cells of a window R may need (Caffe-style nets). With a new stride or input rate the
    pool's own ceil rounding no longer reaches that far, so the overhang becomes end padding
    of (s-1)*rate: a -inf Pad node before a MaxPool, or end pads of an AveragePool without
    count_include_pad (ignored by the average, like the overhang). True when done; an
    AveragePool with count_include_pad=1 (or pads past its kernel) keeps ceil_mode."""
    attrs = attributes(node)
    if node.op_type not in ("MaxPool", "AveragePool") or not attrs.get("ceil_mode", 0):
        return False
    if list(strides) == list(old_strides) and list(rate) == [1, 1]:
        return False
    ends = [(s - 1) * r for s, r in zip(old_strides, rate, strict=True)]
    if node.op_type == "AveragePool":
        kernel = window_params(node, GraphIndex.build(model.graph))["kernel"]
        if attrs.get("count_include_pad", 0) or any(
            pads[2 + a] + ends[a] >= kernel[a] for a in range(2)
        ):
            return False
        for axis in range(2):
            pads[2 + axis] += ends[axis]
        return True
    all_pads = [0, 0, 0, 0, 0, 0, *ends]
    name = f"{node.output[0]}_ceil_pad"
    if opset_version(model) < 11:
        pad = onnx.helper.make_node(
            "Pad", [node.input[0]], [name], pads=all_pads, value=float("-inf")
        )
    else:
        dtype = numpy_helper.to_array(_value_type_probe(model, node)).dtype
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(all_pads, np.int64), f"{name}_pads"),
                numpy_helper.from_array(np.array(-np.inf, dtype), f"{name}_value"),
            ]
        )
        pad = onnx.helper.make_node("Pad", [node.input[0], f"{name}_pads", f"{name}_value"], [name])
    position = list(model.graph.node).index(node)
    model.graph.node.insert(position, pad)
    node.input[0] = name
    return True


def _value_type_probe(model, node) -> onnx.TensorProto:
    """A zero tensor of the pool input's element type (float32 unless the graph says)."""
    elem = onnx.TensorProto.FLOAT
    for value in (*model.graph.input, *model.graph.value_info):
        if value.name == node.input[0]:
            elem = value.type.tensor_type.elem_type
    return onnx.helper.make_tensor("probe", elem, [], [0])


def make_atrous(dense: onnx.ModelProto, *, factor: Pair | int) -> onnx.ModelProto:
    """A copy of ``dense`` whose output stride is S / factor (per axis)."""
    factor = (factor, factor) if isinstance(factor, int) else tuple(int(k) for k in factor)
    model = onnx.ModelProto()
    model.CopyFrom(dense)
    index, stride, nodes = _window_nodes(model)
    if min(factor) < 1 or any(s % k for s, k in zip(stride, factor, strict=True)):
        raise _unsupported(dense, factor, stride)
    target = tuple(s // k for s, k in zip(stride, factor, strict=True))
    if target not in supported_strides(model):
        raise _unsupported(dense, factor, stride)
    if _needs_newer_opset(model, target):
        model = _upgrade_opset(model)
        index, stride, nodes = _window_nodes(model)
    for node, jump in nodes:
        if node.op_type == "Pad":
            rate = tuple(j // min(j, t) for j, t in zip(jump, target, strict=True))
            if rate != (1, 1):
                _scale_pad_node(node, index, model, rate, (2, 3))
            continue
        params = window_params(node, index)
        plans = [_axis_plan(jump[a], params["strides"][a], target[a]) for a in range(2)]
        strides = [p[0] for p in plans]
        rate = [p[1] for p in plans]
        dilations = [d * r for d, r in zip(params["dilations"], rate, strict=True)]
        pads = [p * rate[i % 2] for i, p in enumerate(params["pads"])]
        present = {attr.name for attr in node.attribute}
        if _ceil_to_end_pads(model, node, params["strides"], strides, rate, pads):
            set_attribute(node, "ceil_mode", 0)
        if "auto_pad" in present:
            set_attribute(node, "auto_pad", "NOTSET")
        if "dilations" in present or dilations != [1, 1]:
            set_attribute(node, "dilations", dilations)
        set_attribute(node, "strides", strides)
        set_attribute(node, "pads", pads)
    del model.graph.value_info[:]
    return model
