"""Rewrite the head of a fixed-size ONNX classifier into convolutions (framework-agnostic).

Two head shapes are recognised after the trunk's last feature map F (C x h x w at the
training size R):

- **FC head**: F -> Flatten/Reshape (with Transposes) -> Gemm | MatMul(+Add) -> ...
  The first FC layer becomes a Conv with an (h, w) kernel whose weight is the FC weight
  laid out in the graph's own flatten order (C,H,W for PyTorch/Caffe, H,W,C for Keras/TF);
  later FC layers become 1x1 convs.
- **Global-pool head**: F -> GlobalAveragePool | ReduceMean(H,W) (or the max versions) ->
  Flatten/Reshape/Squeeze -> Gemm | MatMul -> ... The global pool becomes an
  AveragePool/MaxPool with an (h, w) kernel and stride 1, the FC layers 1x1 convs.

Per-feature ops between FC layers stay, their vectors of F values laid out as (1, F, 1, 1)
channel vectors (PRelu slopes, scales, biases); a final Softmax runs over channels.
The image input keeps its name, layout and dtype; batch, height and width become dynamic.
"""

from __future__ import annotations

import numpy as np
import onnx

from convert.flatten_order import (
    MOVEMENT_OPS,
    PASS_OPS,
    UnknownOrder,
    detect_feature_order,
    feature_coordinates,
    named_order,
)
from convert.from_onnx.channel_moves import fold_channel_moves
from convert.from_onnx.graph import (
    BINARY_OPS,
    CHANNEL_AXIS_OPS,
    META_OPS,
    UNARY_OPS,
    GraphIndex,
    attributes,
    image_input,
    node_label,
    opset_version,
    static_dims,
    topological_nodes,
)
from convert.from_onnx.head_build import HeadPlan, Linear, assemble, freeze_auto_pad, read_linear
from convert.from_onnx.pooled_head import flatten_only_head, slide_global_pool
from convert.geometry import detect_layout, trace_graph
from service.errors import ConversionError

FLATTEN_ORDERS = ("auto", "chw", "hwc")
AVERAGE_OPS = {"GlobalAveragePool": "AveragePool", "ReduceMean": "AveragePool"}
MAX_OPS = {"GlobalMaxPool": "MaxPool", "ReduceMax": "MaxPool"}


def _fixed_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with a batch of 1 and all shapes inferred (data propagation resolves Reshapes)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    image = image_input(work.graph)
    dims = image.type.tensor_type.shape.dim
    if not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = 1
    try:
        return onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ConversionError(f"ONNX shape inference failed on the classifier: {exc}") from None


def _window(image: onnx.ValueInfoProto, axes: tuple[int, int]) -> tuple[int, int]:
    dims = static_dims(image)
    window = tuple(dims[a] for a in axes)
    if None in window:
        raise ConversionError(
            f"input {image.name!r} has no fixed height and width ({dims}): export the "
            "classifier at its training input size, the window R of the dense model"
        )
    return window


def classifier_window(model: onnx.ModelProto) -> tuple[int, int]:
    """The fixed input size (h, w) of a classifier: the window R of its dense model."""
    image = image_input(model.graph)
    layout = detect_layout(GraphIndex.build(model.graph), image.name)
    return _window(image, (2, 3) if layout == "NCHW" else (1, 2))


def _head_start(trace, model, index):
    if not trace.collapses:
        raise ConversionError(
            "the model has no fully-connected or global-pool head: its output is already a "
            "feature map (nothing to convert)"
        )
    if len(trace.collapses) > 1:
        names = ", ".join(node_label(node) for node, _ in trace.collapses)
        raise ConversionError(
            f"the feature map collapses at several nodes ({names}): one head only"
        )
    node, source = trace.collapses[0]
    outputs = [value.name for value in model.graph.output]
    if len(outputs) != 1 or outputs[0] not in trace.global_origin:
        raise ConversionError(f"expected one classifier output computed by the head, got {outputs}")
    if node.op_type in ("MatMul", "Gemm") or (
        node.op_type not in MOVEMENT_OPS and node.op_type not in AVERAGE_OPS | MAX_OPS
    ):
        raise ConversionError(
            f"the head starts with {node_label(node)}, which is neither a flatten nor an "
            "average/max global pool (attention or a global operation?): no exact dense form"
        )
    return node, source


def _walk_chain(start: str, index: GraphIndex):
    """Movement nodes from ``start`` up to the first FC node."""
    chain, name = [], start
    while True:
        node = index.sole_consumer(name)
        if node is None:
            producer = index.producer.get(name)
            where = node_label(producer) if producer is not None else f"tensor {name!r}"
            raise ConversionError(
                f"the head is not a flatten -> fully-connected chain: {where} feeds several "
                "nodes or no FC layer (attention or a global operation?): no exact dense form"
            )
        if node.op_type in ("Gemm", "MatMul"):
            return chain, node
        if node.op_type not in MOVEMENT_OPS | PASS_OPS:
            raise ConversionError(
                f"{node_label(node)} sits between the feature map and the first fully-connected "
                "layer; only Flatten, Reshape, Transpose and Squeeze are supported there. "
                "A class token joined to the flattened map, or attention over it, is computed "
                "per image: no exact dense form"
            )
        chain.append(node)
        name = node.output[0]


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


def _read_tail(fc, index, model) -> tuple[list[Linear], list]:
    """Read the FC layers and the per-feature ops between them, up to the output. The head
    may branch and join (``x * Sigmoid(x)``); every op must act per feature, because on the
    map the features are channels: vectors of F values are laid out as (1, F, 1, 1)."""
    first = read_linear(fc, index)
    linears, edits = [first], []
    output = model.graph.output[0].name
    features = {first.output: first.weight.shape[0]}  # head tensor -> its feature count
    absorbed = {id(node) for node in first.nodes}
    opset = opset_version(model)
    for node in topological_nodes(model.graph):
        head_inputs = [name for name in node.input if name in features]
        if id(node) in absorbed or not head_inputs or node.op_type in META_OPS:
            continue
        if node.op_type in ("Gemm", "MatMul"):
            if node.input[0] not in features or len(head_inputs) != 1:
                raise ConversionError(f"{node_label(node)} in the head has non-constant weights")
            linear = read_linear(node, index)
            linears.append(linear)
            absorbed.update(id(n) for n in linear.nodes)
            features[linear.output] = linear.weight.shape[0]
            continue
        width = features[head_inputs[0]]
        outside = [n for n in node.input if n and n not in features and index.constant(n) is None]
        if outside or {features[n] for n in head_inputs} != {width}:
            raise ConversionError(
                f"{node_label(node)} combines the head's features with {outside or 'features of another width'}: "
                "only per-feature constants and scalars have a per-channel form"
            )
        if node.op_type in CHANNEL_AXIS_OPS:
            axis = attributes(node).get("axis", 1 if opset < 13 else -1)
            if axis not in (1, -1):
                raise ConversionError(f"{node_label(node)} does not run over the class axis")
            edits.append(("softmax", node, width))
        elif node.op_type in BINARY_OPS | UNARY_OPS - {"BatchNormalization"}:
            edits.append(("broadcast", node, width))  # PRelu slopes, scale and bias vectors
        elif node.op_type not in PASS_OPS | {"BatchNormalization"}:  # BN is per channel
            raise ConversionError(f"{node_label(node)} in the classifier head is not supported")
        features[node.output[0]] = width
    if output not in features:
        raise ConversionError(f"the classifier output {output!r} is not computed by the head")
    return linears, edits


def rewrite_head(model: onnx.ModelProto, *, flatten_order: str = "auto") -> onnx.ModelProto:
    """Turn a fixed-size ONNX classifier into a dense model (see module docstring)."""
    if flatten_order not in FLATTEN_ORDERS:
        raise ConversionError(
            f"flatten_order must be one of {FLATTEN_ORDERS}, got {flatten_order!r}"
        )
    work = _fixed_copy(model)
    if fold_channel_moves(work.graph):  # ShuffleNet's channel shuffle -> Gather on channels
        del work.graph.value_info[:]
        work = _fixed_copy(work)
    freeze_auto_pad(work.graph, GraphIndex.build(work.graph))
    index = GraphIndex.build(work.graph)
    trace = trace_graph(work, index=index, allow_collapse=True)
    if slide_global_pool(work.graph, index, trace):  # SqueezeNet, ConvNeXt heads
        index = GraphIndex.build(work.graph)
        trace = trace_graph(work, index=index, allow_collapse=True)
    _window(image_input(model.graph), (2, 3) if trace.layout == "NCHW" else (1, 2))
    node, source = _head_start(trace, work, index)
    flat_head = flatten_only_head(work, index=index, trace=trace)
    if flat_head is not None:
        _drop_initializer_inputs(flat_head)
        return flat_head
    field, source_shape = trace.fields[source], index.shape(source)
    if source_shape is None or None in source_shape or len(source_shape) != 4:
        raise ConversionError(f"the feature map {source!r} before the head has no known shape")
    kernel = tuple(source_shape[a] for a in field.axes)
    if node.op_type in AVERAGE_OPS or node.op_type in MAX_OPS:
        pool_op, pooled_shape, channel_axis = _global_pool(node, field, index, source_shape)
        chain, fc = _walk_chain(node.output[0], index)
        try:
            flat = detect_feature_order(chain, index, pooled_shape)
        except UnknownOrder:  # only channels remain: any reshape keeps their order
            flat = np.arange(int(np.prod(pooled_shape)))
        channel = np.unravel_index(flat, pooled_shape)[channel_axis]
        coords = (channel, np.zeros_like(channel), np.zeros_like(channel))
        plan_pool, conv_kernel = (pool_op, kernel), (1, 1)
    else:
        chain, fc = _walk_chain(source, index)
        coords = _feature_map_order(chain, index, source_shape, field, flatten_order, fc)
        plan_pool, conv_kernel = None, kernel
    linears, edits = _read_tail(fc, index, work)
    plan = HeadPlan(
        source=source,
        field=field,
        linears=linears,
        edits=edits,
        coords=coords,
        channels=source_shape[({0, 1, 2, 3} - set(field.axes) - {0}).pop()],
        conv_kernel=conv_kernel,
        pool=plan_pool,
        layout=trace.layout,
    )
    dense = assemble(work, index=index, trace=trace, plan=plan)
    _drop_initializer_inputs(dense)
    return dense


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Old exporters (IR 3) list every initializer as a graph input too; the dense model
    adds initializers of its own, so keep the image as the only input, at IR >= 4."""
    weights = {init.name for init in model.graph.initializer}
    image = [value for value in model.graph.input if value.name not in weights]
    if len(image) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(image)
    model.ir_version = max(model.ir_version, 4)
