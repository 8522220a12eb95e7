"""Build the convolutional head that replaces a classifier's FC head (see ``head``).

:func:`assemble` writes the Conv (and pool) nodes in place of the FC nodes, fixes the
elementwise ops of the head for an NCHW map, drops the dead flatten chain and makes batch,
height and width dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.convert.from_onnx.fc_head_read import FirstLayer, Linear
from densemap.convert.from_onnx.graph import (
    WINDOW_OPS,
    GraphIndex,
    attributes,
    image_input,
    node_label,
    opset_version,
    remove_dead_nodes,
    set_attribute,
)
from densemap.convert.geometry import Field, Trace
from densemap.service.errors import ConversionError


@dataclass
class FcHeadPlan:
    """Everything :func:`assemble` needs, found by ``from_onnx.fc_head.rewrite_fc_head``. A model
    with several heads has one first layer per head (or one shared) over the same map."""

    source: str  # the trunk's last feature map
    field: Field
    linears: list[Linear]  # every FC layer, the first layers' included
    firsts: list[FirstLayer]
    edits: list[tuple[str, onnx.NodeProto, int]]  # (kind, node, channels at that node)
    outputs: dict[str, int]  # each graph output's channel count
    channels: int
    layout: str


def freeze_auto_pad(graph: onnx.GraphProto, index: GraphIndex) -> None:
    """Replace auto_pad by the explicit pads it gives at the classifier's fixed size."""
    for node in graph.node:
        attrs = attributes(node)
        mode = attrs.get("auto_pad", "NOTSET")
        if node.op_type not in WINDOW_OPS or mode == "NOTSET":
            continue
        shape = index.shape(node.input[0])
        kernel = attrs.get("kernel_shape") or list(index.shape(node.input[1])[2:])
        strides = attrs.get("strides", [1, 1])
        dilations = attrs.get("dilations", [1, 1])
        if mode == "VALID":
            pads = [0, 0, 0, 0]
        elif shape is None or None in shape[2:]:
            continue  # the tracer reports it if the padding depends on the size
        else:
            totals = [
                max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
                for n, s, d, k in zip(shape[2:], strides, dilations, kernel, strict=True)
            ]
            begins = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in totals]
            pads = begins + [t - b for t, b in zip(totals, begins, strict=True)]
        set_attribute(node, "auto_pad", "NOTSET")
        set_attribute(node, "pads", pads)


class _Names:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {init.name for init in graph.initializer} | {v.name for v in graph.input}
        self.used |= {name for node in graph.node for name in (*node.input, *node.output)}
        self.used |= {node.name for node in graph.node}

    def fresh(self, base: str) -> str:
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _canonical(plan: FcHeadPlan, trace: Trace, index: GraphIndex, names: _Names):
    """An NCHW name for the feature map, plus any Transpose node needed to get it."""
    axes = plan.field.axes
    if axes == (2, 3):
        return plan.source, []
    producer = index.producer.get(plan.source)
    if producer is not None and producer.op_type == "Transpose":
        before = trace.fields.get(producer.input[0])
        if before is not None and before.axes == (2, 3):
            return producer.input[0], []
    channel_axis = ({0, 1, 2, 3} - set(axes) - {0}).pop()
    name = names.fresh(f"{plan.source}_nchw")
    perm = [0, channel_axis, *axes]
    return name, [helper.make_node("Transpose", [plan.source], [name], perm=perm, name=name)]


def _conv(linear, weight, names, source, kernel) -> tuple[onnx.NodeProto, list]:
    w_name = names.fresh(f"{linear.output}_conv_weight")
    inits = [numpy_helper.from_array(weight, w_name)]
    inputs = [source, w_name]
    if linear.bias is not None:
        b_name = names.fresh(f"{linear.output}_conv_bias")
        inits.append(numpy_helper.from_array(linear.bias.astype(weight.dtype), b_name))
        inputs.append(b_name)
    node = helper.make_node(
        "Conv",
        inputs,
        [linear.output],
        name=names.fresh(f"{linear.output}_conv"),
        kernel_shape=list(kernel),
        strides=[1, 1],
        pads=[0, 0, 0, 0],
        dilations=[1, 1],
    )
    return node, inits


def _first_layer(plan: FcHeadPlan, first: FirstLayer, source: str, names, pooled: dict):
    """The Conv (after a sliding pool, shared between heads) replacing one first FC."""
    nodes = []
    if first.pool is not None and first.pool[1] != (1, 1):
        op, kernel = first.pool
        if op not in pooled:
            pooled[op] = names.fresh(f"{plan.source}_pooled")
            nodes.append(
                helper.make_node(
                    op, [source], [pooled[op]], name=pooled[op], kernel_shape=list(kernel),
                    strides=[1, 1],
                )
            )  # fmt: skip
        source = pooled[op]
    linear = first.linear
    out_channels = linear.weight.shape[0]
    weight = np.zeros((out_channels, plan.channels, *first.conv_kernel), dtype=linear.weight.dtype)
    c, y, x = first.coords
    weight[:, c, y, x] = linear.weight  # feature f of the FC reads element (c[f], y[f], x[f])
    conv, inits = _conv(linear, weight, names, source, first.conv_kernel)
    return [*nodes, conv], inits


def _edit(kind, node, channels, names, opset, index: GraphIndex) -> tuple[list, list]:
    """Adapt one elementwise head op from [N, channels] to [N, channels, h, w]."""
    if kind == "softmax":
        if opset >= 13:
            set_attribute(node, "axis", 1)
            return [node], []
        # before opset 13 Softmax flattens from `axis` on: run it on the last axis of NHWC
        nhwc, out = names.fresh(f"{node.output[0]}_nhwc"), names.fresh(f"{node.output[0]}_sm")
        before = helper.make_node("Transpose", [node.input[0]], [nhwc], perm=[0, 2, 3, 1])
        set_attribute(node, "axis", 3)
        final = node.output[0]
        node.input[0], node.output[0] = nhwc, out
        after = helper.make_node("Transpose", [out], [final], perm=[0, 3, 1, 2])
        return [before, node, after], []
    inits = []
    for position, name in enumerate(node.input):
        value = index.constant(name)
        if value is None or value.size == 1:
            continue
        if value.size != channels:
            raise ConversionError(f"{node_label(node)} combines the scores with a {value.shape}")
        new_name = names.fresh(f"{name}_nchw")
        inits.append(numpy_helper.from_array(value.reshape(1, channels, 1, 1), new_name))
        node.input[position] = new_name
    return [node], inits


def make_dynamic(model: onnx.ModelProto, *, layout: str, outputs: dict[str, int]) -> None:
    """Dynamic batch, height and width on the input; [N, channels, h, w] outputs."""
    graph = model.graph
    image = image_input(graph)
    dims = image.type.tensor_type.shape.dim
    spatial = (2, 3) if layout == "NCHW" else (1, 2)
    for axis, param in ((0, "N"), (spatial[0], "H"), (spatial[1], "W")):
        dims[axis].Clear()
        dims[axis].dim_param = param
    del graph.value_info[:]
    for output in graph.output:
        elem_type = output.type.tensor_type.elem_type
        dims = ["N", outputs[output.name], "cells_h", "cells_w"]
        output.CopyFrom(helper.make_tensor_value_info(output.name, elem_type, dims))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        graph.value_info.extend(inferred.graph.value_info)
    except Exception:  # shapes are an optimisation hint only; the checker runs later
        pass


def assemble(model: onnx.ModelProto, *, index: GraphIndex, trace: Trace, plan: FcHeadPlan):
    """Rewrite ``model`` (a working copy) according to ``plan``; returns it."""
    graph = model.graph
    names = _Names(graph)
    replaced = {id(node) for linear in plan.linears for node in linear.nodes}
    source, canonical = _canonical(plan, trace, index, names)
    pooled: dict[str, str] = {}
    inserts: dict[int, tuple[list, list]] = {}
    for first in plan.firsts:
        inserts[id(first.linear.nodes[0])] = _first_layer(plan, first, source, names, pooled)
    if canonical:  # the NHWC -> NCHW Transpose goes with the first of them (nodes are sorted)
        key = id(plan.firsts[0].linear.nodes[0])
        inserts[key] = ([*canonical, *inserts[key][0]], inserts[key][1])
    firsts = {id(first.linear) for first in plan.firsts}
    for linear in (linear for linear in plan.linears if id(linear) not in firsts):
        out_channels, in_channels = linear.weight.shape
        weight = linear.weight.reshape(out_channels, in_channels, 1, 1)
        node, inits = _conv(linear, weight, names, linear.input, (1, 1))
        inserts[id(linear.nodes[0])] = ([node], inits)
    opset = opset_version(model)
    for kind, node, channels in plan.edits:
        inserts[id(node)] = _edit(kind, node, channels, names, opset, index)
    nodes, initializers = [], []
    for node in list(graph.node):
        new_nodes, inits = inserts.get(id(node), (None, []))
        if new_nodes is not None:
            nodes.extend(new_nodes)
            initializers.extend(inits)
        elif id(node) not in replaced:
            nodes.append(node)
    nodes = [_copy(node) for node in nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    remove_dead_nodes(graph)
    make_dynamic(model, layout=plan.layout, outputs=plan.outputs)
    return model


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
