"""Crop every map output of a dense model to n = (W - R) // S + 1 cells, inside the graph.

A dense trunk can return more cells than the crop rule gives: a ceil_mode pool adds a
partial cell whose window reads past the image, and a trunk that ignores trailing pixels
of R adds one. The written model must stand alone (plain onnxruntime, Triton), so the
crop is part of the graph, computed from the input's dynamic shape::

    hw    = Gather(Shape(input), [h_axis, w_axis])        # int64 [H, W]
    a     = hw - R + S
    cells = ((a + |a|) / 2) / S                           # max(a, 0) // S = max(n, 0)
    out   = Slice(map, starts=[0, 0], ends=cells, axes=[2, 3])

so any H and W give exactly n cells per axis (none for an image smaller than the window).
Every graph output with a map shape (rank 4, NCHW) is cropped the same way: each output is
one head of the same geometry (service/contract.py). Integer ops only, valid from opset 10
(Slice with tensor inputs); ``max(a, 0)`` is written with Abs because integer Max needs
opset 12. Older models are moved to opset 10 with ``onnx.version_converter`` first.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.convert.from_onnx.graph import image_input, opset_version
from densemap.service.errors import ConversionError

Pair = tuple[int, int]
SLICE_INPUTS_OPSET = 10  # Slice reads starts/ends from tensors from opset 10 on
PREFIX = "densemap_cells"


def crop_to_cells(
    model: onnx.ModelProto, *, window: Pair, stride: Pair, layout: str
) -> onnx.ModelProto:
    """``model`` with every rank-4 output cropped to the cells of ``window`` / ``stride``
    (in place, returned; a model below opset 10 is returned as an upgraded copy)."""
    if opset_version(model) < SLICE_INPUTS_OPSET:
        model = _upgrade(model)
    graph = model.graph
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    if any(name.startswith(PREFIX) for name in names):
        return model  # already cropped (a model written by this converter)
    outputs = [value for value in graph.output if _is_map(value)]
    if not outputs:
        return model
    axes = (2, 3) if layout == "NCHW" else (1, 2)
    p = PREFIX
    constants = {
        "hw_axes": axes, "window": window, "stride": stride, "two": (2, 2), "starts": (0, 0),
        "map_axes": (2, 3),
    }  # fmt: skip
    nodes = [_constant(f"{p}_{name}", values) for name, values in constants.items()]
    nodes += [
        helper.make_node("Shape", [image_input(graph).name], [f"{p}_shape"]),
        helper.make_node("Gather", [f"{p}_shape", f"{p}_hw_axes"], [f"{p}_hw"], axis=0),
        helper.make_node("Sub", [f"{p}_hw", f"{p}_window"], [f"{p}_past"]),
        helper.make_node("Add", [f"{p}_past", f"{p}_stride"], [f"{p}_a"]),
        helper.make_node("Abs", [f"{p}_a"], [f"{p}_abs"]),
        helper.make_node("Add", [f"{p}_a", f"{p}_abs"], [f"{p}_twice"]),
        helper.make_node("Div", [f"{p}_twice", f"{p}_two"], [f"{p}_clamped"]),
        helper.make_node("Div", [f"{p}_clamped", f"{p}_stride"], [f"{p}_ends"]),
    ]
    for value in outputs:
        uncropped = f"{p}_uncropped_{value.name}"
        _rename(graph, value.name, uncropped)
        nodes.append(
            helper.make_node(
                "Slice",
                [uncropped, f"{p}_starts", f"{p}_ends", f"{p}_map_axes"],
                [value.name],
                name=f"{p}_crop_{value.name}",
            )
        )
        for dim, name in zip(
            value.type.tensor_type.shape.dim[2:], ("cells_h", "cells_w"), strict=True
        ):
            dim.Clear()
            dim.dim_param = name
    graph.node.extend(nodes)
    return model


def _is_map(value: onnx.ValueInfoProto) -> bool:
    """A tensor output of rank 4 (onnx.checker wants every graph output's shape)."""
    tensor = value.type.tensor_type
    return value.type.HasField("tensor_type") and len(tensor.shape.dim) == 4


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node that makes or reads ``old`` now makes or reads ``new``."""
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
    for value in graph.value_info:
        if value.name == old:
            value.name = new


def _constant(name: str, values) -> onnx.NodeProto:
    """A Constant node (not an initializer: IR-3 graphs must list initializers as inputs)."""
    tensor = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
    return helper.make_node("Constant", [], [name], value=tensor)


def _upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = opset_version(model)
    try:
        return onnx.version_converter.convert_version(model, SLICE_INPUTS_OPSET)
    except Exception as exc:  # the version converter raises assorted types
        raise ConversionError(
            f"cropping the map to its cells in the graph needs opset {SLICE_INPUTS_OPSET} "
            f"(Slice with tensor inputs), and converting this opset-{opset} model failed "
            f"({exc}): re-export the classifier at opset {SLICE_INPUTS_OPSET} or newer"
        ) from None
