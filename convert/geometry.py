"""Geometry of a dense model, computed from its ONNX graph (never guessed).

The tracer walks the graph as a DAG from the image input and keeps, for every spatial
tensor and each of its two spatial axes, the receptive field of its unit 0:

- ``jump``: the input distance between neighbouring units (cumulative stride);
- ``span``: the size of one unit's receptive field;
- ``left``: where unit 0's field starts in the input (negative when padding hangs over).

A Conv/MaxPool/AveragePool with kernel k, stride s, dilation d and leading pad p maps
``(jump, span, left)`` to ``(jump*s, span + d*(k-1)*jump, left - p*jump)``. Elementwise ops
pass the field through; Add/Mul/Concat of spatial tensors take the union of their fields
(their jumps must agree). Any other op on a spatial tensor is an error naming the node,
except the "collapse" ops (Flatten, Reshape, global pools, ...) where a classifier head
starts, which :func:`trace_graph` reports when asked to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import onnx

from densemap.convert.from_onnx.graph import (
    BINARY_OPS,
    CHANNEL_AXIS_OPS,
    COLLAPSE_OPS,
    META_OPS,
    REDUCE_OPS,
    UNARY_OPS,
    WINDOW_OPS,
    GraphIndex,
    attributes,
    image_input,
    node_label,
    opset_version,
    topological_nodes,
    window_params,
)
from densemap.convert.from_onnx.local_ops import local_field
from densemap.service.contract import Geometry
from densemap.service.errors import ConversionError

Pair = tuple[int, int]


@dataclass(frozen=True)
class Field:
    """Receptive field of unit 0 of a spatial tensor, per spatial axis (h, w)."""

    axes: Pair  # positions of the H and W axes in the tensor
    rank: int
    jump: Pair = (1, 1)
    span: Pair = (1, 1)
    left: Pair = (0, 0)
    padded: bool = False


@dataclass
class Trace:
    """What :func:`trace_graph` learnt about a graph."""

    layout: str
    fields: dict[str, Field] = field(default_factory=dict)
    collapses: list[tuple[onnx.NodeProto, str]] = field(default_factory=list)
    global_origin: dict[str, str] = field(default_factory=dict)  # tensor -> collapse node label


def detect_layout(index: GraphIndex, image: str) -> str:
    """NHWC when the image reaches a Transpose(0,3,1,2) before any window op, else NCHW."""
    frontier = [image]
    seen = set(frontier)
    while frontier:
        name = frontier.pop()
        for node in index.consumers.get(name, []):
            if node.op_type == "Transpose":
                return "NHWC" if list(attributes(node).get("perm", [])) == [0, 3, 1, 2] else "NCHW"
            if node.op_type in UNARY_OPS or node.op_type in BINARY_OPS:
                for out in node.output[:1]:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return "NCHW"


def _window_field(node: onnx.NodeProto, source: Field, index: GraphIndex) -> Field:
    if source.rank != 4 or source.axes != (2, 3):
        raise ConversionError(f"{node_label(node)} reads a tensor that is not NCHW")
    p = window_params(node, index)
    jump = tuple(j * s for j, s in zip(source.jump, p["strides"], strict=False))
    span = tuple(
        r + d * (k - 1) * j
        for r, d, k, j in zip(source.span, p["dilations"], p["kernel"], source.jump, strict=False)
    )
    left = tuple(
        x - b * j for x, b, j in zip(source.left, p["pads"][:2], source.jump, strict=False)
    )
    padded = source.padded or any(v != 0 for v in p["pads"])
    return Field(axes=(2, 3), rank=4, jump=jump, span=span, left=left, padded=padded)


def _union(node: onnx.NodeProto, fields: list[Field]) -> Field:
    first = fields[0]
    for other in fields[1:]:
        if other.jump != first.jump or other.axes != first.axes:
            raise ConversionError(
                f"{node_label(node)} combines spatial tensors of different strides "
                f"{first.jump} and {other.jump}: no single dense grid exists"
            )
    left = tuple(min(f.left[a] for f in fields) for a in range(2))
    right = tuple(max(f.left[a] + f.span[a] for f in fields) for a in range(2))
    span = tuple(r - x for r, x in zip(right, left, strict=False))
    padded = any(f.padded for f in fields)
    return replace(first, span=span, left=left, padded=padded)


def _broadcast_field(node: onnx.NodeProto, trace: Trace, index: GraphIndex) -> Field:
    """Field of an elementwise op with numpy broadcasting over spatial and constant inputs."""
    ranks = []
    for name in node.input:
        if name in trace.fields:
            ranks.append(trace.fields[name].rank)
        elif name:
            shape = index.shape(name)
            if shape is None:
                raise ConversionError(
                    f"{node_label(node)}: cannot tell whether input {name!r} broadcasts over "
                    "space (unknown shape)"
                )
            ranks.append(len(shape))
    rank = max(ranks)
    spatial, axes = [], None
    for name in node.input:
        if name in trace.fields:
            f = trace.fields[name]
            shift = rank - f.rank
            f = replace(f, rank=rank, axes=(f.axes[0] + shift, f.axes[1] + shift))
            spatial.append(f)
            axes = f.axes
    for name in node.input:
        if name and name not in trace.fields:
            shape = index.shape(name)
            offset = rank - len(shape)
            for axis in axes:
                if axis - offset >= 0 and shape[axis - offset] != 1:
                    raise ConversionError(
                        f"{node_label(node)} combines the feature map with {name!r} of shape "
                        f"{list(shape)}, which varies over space: a position-dependent "
                        "operation has no dense form"
                    )
    return _union(node, spatial)


def _axis_is_spatial(node: onnx.NodeProto, source: Field, axis: int) -> bool:
    return (axis % source.rank) in source.axes


def _reduce_axes(node: onnx.NodeProto, index: GraphIndex, rank: int) -> set[int] | None:
    attrs = attributes(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else set(range(rank))
    return {int(a) % rank for a in axes}


def _propagate(node: onnx.NodeProto, trace: Trace, index: GraphIndex, source: Field):
    """The field of ``node``'s outputs, or ``None`` when the node collapses space."""
    op, attrs = node.op_type, attributes(node)
    if op in WINDOW_OPS:
        return _window_field(node, source, index)
    if op == "BatchNormalization":
        _check_per_channel(node, index, attrs)
    if op in UNARY_OPS:
        return source
    if op in BINARY_OPS or op == "Concat":
        if op == "Concat" and _axis_is_spatial(node, source, attrs.get("axis", 0)):
            raise ConversionError(f"{node_label(node)} concatenates along a spatial axis")
        return _broadcast_field(node, trace, index)
    if op in CHANNEL_AXIS_OPS or op == "Split":
        axis = attrs.get("axis", 1 if op != "Split" else 0)
        spans_space = _axis_is_spatial(node, source, axis)
        if op in CHANNEL_AXIS_OPS and index.opset < 13:  # old softmax flattens from axis on
            if any(a >= axis % source.rank for a in source.axes):
                raise ConversionError(
                    f"{node_label(node)} (opset {index.opset}, before 13) normalises axis "
                    f"{axis} and every axis after it together, so over the spatial axes too: "
                    "it is computed per image, not per window: no exact dense form"
                )
        if spans_space:
            raise ConversionError(f"{node_label(node)} runs over a spatial axis")
        return source
    if op == "Transpose":
        perm = list(attrs.get("perm", reversed(range(source.rank))))
        return replace(source, axes=(perm.index(source.axes[0]), perm.index(source.axes[1])))
    if op == "Pad":
        return _pad_field(node, index, source, attrs)
    if op in REDUCE_OPS:
        axes = _reduce_axes(node, index, source.rank)
        if axes is not None and not axes & set(source.axes) and attrs.get("keepdims", 1):
            return source
    local = local_field(node, source, index) if node.input[0] in trace.fields else None
    if local is not None:
        return local
    if op in COLLAPSE_OPS:
        return None
    raise ConversionError(
        f"{node_label(node)} is not supported on a feature map (densemap knows convolutions, "
        "pools, elementwise ops and channel concatenation)"
    )


def _check_per_channel(node: onnx.NodeProto, index: GraphIndex, attrs: dict) -> None:
    """BatchNormalization acts per channel unless it is ``spatial=0`` (opset < 9), which
    normalises every position with statistics of its own: tied to R, no dense form."""
    stats = [index.constant(name) for name in node.input[1:5]]
    if attrs.get("spatial", 1) == 0 or any(v is not None and v.ndim > 1 for v in stats):
        raise ConversionError(
            f"{node_label(node)} normalises each position of the window with statistics of "
            "its own (spatial=0): they are tied to positions at R, so it has no dense form"
        )


def _pad_field(node, index, source, attrs) -> Field:
    pads = attrs.get("pads")
    if pads is None and len(node.input) > 1:
        value = index.constant(node.input[1])
        pads = None if value is None else value.reshape(-1).tolist()
    axes = list(range(source.rank))
    if len(node.input) > 3 and node.input[3]:
        value = index.constant(node.input[3])
        axes = None if value is None else [int(a) % source.rank for a in value.reshape(-1)]
    if pads is None or axes is None:
        raise ConversionError(f"{node_label(node)} has non-constant pads")
    begins = dict(zip(axes, pads[: len(axes)], strict=False))
    ends = dict(zip(axes, pads[len(axes) :], strict=False))
    shift = tuple(begins.get(a, 0) for a in source.axes)
    padded = source.padded or any(begins.get(a, 0) > 0 or ends.get(a, 0) > 0 for a in source.axes)
    left = tuple(x - s * j for x, s, j in zip(source.left, shift, source.jump, strict=False))
    return replace(source, left=left, padded=padded)


def trace_graph(
    model: onnx.ModelProto, *, index: GraphIndex | None = None, allow_collapse: bool = False
) -> Trace:
    """Trace receptive fields from the image input through the whole graph.

    With ``allow_collapse`` the nodes where space collapses (a classifier head) are
    recorded in ``Trace.collapses`` and their outputs marked global; a global tensor that
    meets a spatial one again (squeeze-and-excitation, attention) is an error naming the
    global node. Without it, any collapse is an error.
    """
    index = index or GraphIndex.build(model.graph)
    index.opset = opset_version(model)
    image = image_input(model.graph).name
    trace = Trace(layout=detect_layout(index, image))
    trace.fields[image] = Field(axes=(2, 3) if trace.layout == "NCHW" else (1, 2), rank=4)
    for node in topological_nodes(model.graph):
        spatial = [name for name in node.input if name in trace.fields]
        origins = [trace.global_origin[n] for n in node.input if n in trace.global_origin]
        if not spatial:
            if origins:
                trace.global_origin.update(dict.fromkeys(node.output, origins[0]))
            continue
        if origins:
            raise ConversionError(
                f"{origins[0]} is a global (per-image) operation whose result feeds the feature "
                f"map again at {node_label(node)} (squeeze-and-excitation, attention or global "
                "context): such a model has no exact dense form"
            )
        if node.op_type in META_OPS:
            continue
        if node.input[0] not in trace.fields and node.op_type not in BINARY_OPS | {"Concat"}:
            raise ConversionError(f"{node_label(node)} takes the feature map as a parameter")
        result = _propagate(node, trace, index, trace.fields[spatial[0]])
        if result is None:
            if not allow_collapse:
                raise ConversionError(
                    f"{node_label(node)} collapses the feature map; a dense model must stay "
                    "fully convolutional up to its output"
                )
            trace.collapses.append((node, spatial[0]))
            trace.global_origin.update(dict.fromkeys(node.output, node_label(node)))
            continue
        for name in node.output if node.op_type != "BatchNormalization" else node.output[:1]:
            if name:
                trace.fields[name] = result
    return trace


def compute_geometry(
    model: onnx.ModelProto, *, window: Pair, output: str | None = None
) -> Geometry:
    """The :class:`~densemap.service.contract.Geometry` of a dense model for training window R, at
    its output named ``output`` (default: the first)."""
    window = (window, window) if isinstance(window, int) else tuple(window)
    trace = trace_graph(model)
    output = output or model.graph.output[0].name
    result = trace.fields.get(output)
    if result is None:
        raise ConversionError(f"the model output {output!r} is not a feature map")
    if result.rank != 4 or result.axes != (2, 3):
        raise ConversionError(f"the model output {output!r} is not NCHW")
    effective = tuple(
        min(r, x + s) - max(0, x) for r, x, s in zip(window, result.left, result.span, strict=False)
    )
    too_small = [a for a in range(2) if result.left[a] + result.span[a] > window[a]]
    # a ceil_mode pool whose last window overhangs R reads past the window's end: the
    # classifier saw nothing there, the dense pass sees real pixels (like end padding)
    overhang = bool(too_small) and any(
        node.op_type in WINDOW_OPS and attributes(node).get("ceil_mode", 0)
        for node in model.graph.node
    )
    if not result.padded and too_small and not overhang:
        raise ConversionError(
            f"the window {window} is smaller than the receptive field {result.span} of one "
            "output cell: use the classifier's real input size"
        )
    if min(effective) < 1:
        raise ConversionError(f"no output cell sees the window {window}")
    return Geometry(
        window=window,
        stride=result.jump,
        receptive_field=result.span,
        receptive_field_offset=result.left,
        effective_window=effective,
        padded=result.padded or overhang,
    )
