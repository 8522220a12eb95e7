"""Windows that are global at R: their dense form is a window of their input's size.

A pool or conv whose one window at the window size R covers its whole input along an axis
(from its kernel, pads, dilation and output size at R) reads every real value there, and
its padding only pads. GoogLeNet of the ONNX model zoo ends in a 7x7 average pool with
pads (0, 0, 1, 1) and ``count_include_pad=0`` on a 6x6 map: at R it averages the 36 real
values, so on a larger image its dense form is a 6x6 average, not the 7x7 one it is
written as (which would average 49 real values at every inner cell). Likewise a 3x3 conv
with pad 1 on a 1x1 map uses its centre tap alone at R. :func:`globalize_windows` gives
such an axis the input's size as kernel, no begin pad, the same stride; a conv
keeps the taps that meet real values; an average that counted its pads is multiplied by
cells / kernel (two integers: exact in any float type). Each new node is run against the
old one at R on random values before it replaces it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.convert.from_onnx.graph import GraphIndex, attributes, node_label, window_params
from densemap.service.errors import ConversionError

GLOBAL_AT_R_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
PROBE_RTOL = 1e-5  # float32 onnxruntime runs of the same sums in another order


def replace_node(graph: onnx.GraphProto, node: onnx.NodeProto, nodes: list) -> None:
    """Put ``nodes`` where ``node`` was (the graph's order stays topological)."""
    position = list(graph.node).index(node)
    del graph.node[position]
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)


def _spatial_axes(shape) -> tuple[int, int] | None:
    return (2, 3) if shape is not None and len(shape) == 4 else None


def _global_axes(node, index: GraphIndex) -> list[int]:
    """The spatial axes (0 = H, 1 = W of NCHW) along which ``node``'s one window at R
    covers its whole input, and yields one output position."""
    shape, out = index.shape(node.input[0]), index.shape(node.output[0])
    if _spatial_axes(shape) is None or out is None or len(out) != 4:
        return []
    if None in shape[2:] or None in out[2:]:
        return []
    params = window_params(node, index)
    axes = []
    for a in range(2):
        size, kernel, begin = shape[2 + a], params["kernel"][a], params["pads"][a]
        dilation = params["dilations"][a]
        if out[2 + a] != 1 or dilation != 1:
            continue
        if not begin and not params["pads"][a + 2] and kernel == size:
            continue  # already a window of its input's size
        if kernel - begin >= size:
            axes.append(a)
    return axes


def globalize_windows(graph: onnx.GraphProto, index: GraphIndex) -> bool:
    changed = False
    for node in list(graph.node):
        if node.op_type not in GLOBAL_AT_R_OPS:
            continue
        if attributes(node).get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            continue  # frozen to explicit pads later; SAME pads at R are never global
        axes = _global_axes(node, index)
        if not axes:
            continue
        replacement, inits = _global_form(node, index, axes)
        _check_same_at_window(node, replacement, inits, index)
        replace_node(graph, node, replacement)
        graph.initializer.extend(inits)
        changed = True
    return changed


def _global_form(node, index: GraphIndex, axes: list[int]):
    """The nodes (and initializers) computing ``node`` with a window of the input's size
    on ``axes``: kernel = size, no begin pad; the stride and the rest as they are. The end
    pad becomes size + begin + end - kernel, so the output has the old node's size at any
    input size (its residual or concatenated partners keep theirs): only cells that
    overhang the image, cropped away, read it."""
    shape = index.shape(node.input[0])
    params = window_params(node, index)
    attrs = attributes(node)
    kernel, pads = list(params["kernel"]), list(params["pads"])
    strides, dilations = list(params["strides"]), list(params["dilations"])
    inits, inputs, cells, divisor = [], list(node.input), 1, 1
    for a in axes:
        size = shape[2 + a]
        if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0):
            cells *= size  # the sum was divided by the window's pads too
            divisor *= kernel[a]
        end = size + pads[a] + pads[a + 2] - kernel[a]  # >= 0: one output at R
        kernel[a], pads[a], pads[a + 2] = size, 0, end
    name = node.name or node.output[0]
    if node.op_type == "Conv":
        weight = index.constant(node.input[1])
        if weight is None:
            raise ConversionError(f"{node_label(node)} has non-constant weights: cannot convert")
        begins = window_params(node, index)["pads"]
        cut = [slice(None), slice(None)]
        for a in range(2):
            cut.append(slice(begins[a], begins[a] + shape[2 + a]) if a in axes else slice(None))
        inputs[1] = f"{name}_at_window"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight[tuple(cut)]), inputs[1]))
    new_attrs = {k: v for k, v in attrs.items() if k != "auto_pad"}
    new_attrs.update(kernel_shape=kernel, pads=pads, strides=strides)
    if "dilations" in attrs:  # not an attribute of every pool at every opset
        new_attrs["dilations"] = dilations
    output = node.output[0] if cells == divisor else f"{name}_mean"
    nodes = [helper.make_node(node.op_type, inputs, [output, *node.output[1:]], name=f"{name}_at_window", **new_attrs)]  # fmt: skip
    if cells != divisor:  # mean x cells / divisor, two integers: exact in any float type
        dtype = helper.tensor_dtype_to_np_dtype(_elem_type(index, node.input[0]))
        for op, value, out in (("Mul", cells, f"{name}_sum"), ("Div", divisor, node.output[0])):
            inits.append(numpy_helper.from_array(np.array(value, dtype=dtype), f"{name}_{op}"))
            nodes.append(helper.make_node(op, [output, f"{name}_{op}"], [out], name=out))
            output = out
    return nodes, inits


def _elem_type(index: GraphIndex, name: str) -> int:
    for value in (*index.graph.input, *index.graph.value_info, *index.graph.output):
        if value.name == name:
            return value.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _check_same_at_window(node, replacement, inits, index: GraphIndex) -> None:
    """Run ``node`` and its replacement on random values of its input's shape at R (one
    image, float32, onnxruntime): they must agree, or the rewrite is not exact."""
    from densemap.convert.runtime import cpu_session

    shape = [1, *index.shape(node.input[0])[1:]]
    feeds = {node.input[0]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    weights = []
    for name in node.input[1:]:
        value = index.constant(name)
        if name and value is not None:
            weights.append(numpy_helper.from_array(value.astype(np.float32), name))
    outputs = []
    for nodes, extra in (([node], []), (replacement, inits)):
        graph = helper.make_graph(
            nodes, "probe",
            [helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
            [*weights, *[_as_float32(i) for i in extra]],
        )  # fmt: skip
        opset = max(index.opset, 7)  # onnxruntime's oldest
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7
        )
        outputs.append(cpu_session(model.SerializeToString()).run(None, feeds)[0])
    before, after = outputs
    scale = max(float(np.abs(before).max()), 1e-30)
    if before.shape != after.shape or float(np.abs(before - after).max()) > PROBE_RTOL * scale:
        raise ConversionError(
            f"{node_label(node)} reads its whole input at the window size R, so its dense form "
            "is a window of that size; that form does not reproduce it at R (ceil mode or "
            "padding densemap cannot express): no exact dense form"
        )


def _as_float32(init: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)


def globalize_at_window(model: onnx.ModelProto, *, window: tuple[int, int]) -> bool:
    """:func:`globalize_windows` on a dense model (dynamic height and width), its shapes
    read at the window size R; in place, returns whether it changed. The torch path's
    dense nets need it (ResNet at R = 32: layer4's 3x3 convs see a 1x1 map at R and use
    their centre tap alone, as the classifier does); the ONNX path rewrites the classifier
    itself (:mod:`densemap.convert.from_onnx.canonical`)."""
    from densemap.convert.from_onnx.graph import image_input, index_at_window, remove_dead_nodes
    from densemap.convert.geometry import detect_layout

    image = image_input(model.graph).name
    axes = (2, 3) if detect_layout(GraphIndex.build(model.graph), image) == "NCHW" else (1, 2)
    try:
        index = index_at_window(model, spatial=dict(zip(axes, window, strict=True)))
    except ConversionError:  # no shapes, no rewrite: the tracer reports what it must
        return False
    if not globalize_windows(model.graph, index):
        return False
    remove_dead_nodes(model.graph)
    return True
