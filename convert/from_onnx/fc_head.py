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

Several heads (class scores plus box regression, ...): every graph output is a head, and
each must be computed per feature from the same feature map F, through one flatten or
global pool per head or a shared one; heads may share FC layers. Each output becomes its
own dense map with the same geometry. A head reading another feature map, an output that
is not computed from F, or ops mixing features of different heads' widths are refused.
The image input keeps its name, layout and dtype; batch, height and width become dynamic.
"""

from __future__ import annotations

import onnx

from densemap.convert.flatten_order import PASS_OPS
from densemap.convert.from_onnx.canonical import canonical_classifier, fold_constant_subgraphs
from densemap.convert.from_onnx.channel_moves import fold_channel_moves
from densemap.convert.from_onnx.fc_head_build import FcHeadPlan, assemble, freeze_auto_pad
from densemap.convert.from_onnx.fc_head_read import (
    FirstLayer,
    Linear,
    first_layers,
    read_linear,
    trunk_source,
)
from densemap.convert.from_onnx.graph import (
    BINARY_OPS,
    CHANNEL_AXIS_OPS,
    META_OPS,
    UNARY_OPS,
    GraphIndex,
    attributes,
    image_input,
    node_label,
    opset_version,
    shapes_at_window,
    static_dims,
    topological_nodes,
)
from densemap.convert.from_onnx.pooled_fc_head import (
    convolutional_fc_head,
    flatten_only_fc_head,
    slide_global_pool,
)
from densemap.convert.geometry import detect_layout, trace_graph
from densemap.service.errors import ConversionError

FLATTEN_ORDERS = ("auto", "chw", "hwc")


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


def _read_tail(firsts: list[FirstLayer], index, model) -> tuple[list[Linear], list, dict]:
    """Read the FC layers and the per-feature ops after the first FCs, up to the outputs.
    The heads may share layers, branch and join (``x * Sigmoid(x)``); every op must act per
    feature, because on the map the features are channels: vectors of F values are laid out
    as (1, F, 1, 1). Returns the FC layers, the edits and each output's channel count."""
    linears = [first.linear for first in firsts]
    edits = []
    features = {linear.output: linear.weight.shape[0] for linear in linears}  # tensor -> F
    absorbed = {id(node) for linear in linears for node in linear.nodes}
    opset = opset_version(model)
    for node in topological_nodes(model.graph):
        fc_head_inputs = [name for name in node.input if name in features]
        if id(node) in absorbed or not fc_head_inputs or node.op_type in META_OPS:
            continue
        if node.op_type in ("Gemm", "MatMul"):
            if node.input[0] not in features or len(fc_head_inputs) != 1:
                raise ConversionError(f"{node_label(node)} in the head has non-constant weights")
            linear = read_linear(node, index)
            linears.append(linear)
            absorbed.update(id(n) for n in linear.nodes)
            features[linear.output] = linear.weight.shape[0]
            continue
        width = features[fc_head_inputs[0]]
        outside = [n for n in node.input if n and n not in features and index.constant(n) is None]
        if outside or {features[n] for n in fc_head_inputs} != {width}:
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
    widths = {}
    for value in model.graph.output:
        if value.name not in features:
            raise ConversionError(
                f"the classifier output {value.name!r} is not computed by the head"
            )
        widths[value.name] = features[value.name]
    return linears, edits, widths


def rewrite_fc_head(model: onnx.ModelProto, *, flatten_order: str = "auto") -> onnx.ModelProto:
    """Turn a fixed-size ONNX classifier into a dense model (see module docstring)."""
    if flatten_order not in FLATTEN_ORDERS:
        raise ConversionError(
            f"flatten_order must be one of {FLATTEN_ORDERS}, got {flatten_order!r}"
        )
    work = shapes_at_window(canonical_classifier(model))
    # ShuffleNet's channel shuffle -> Gather on channels; the shape arithmetic on its output
    # (the next block's x.chunk(2, dim=1) bounds, its shuffle's targets) then folds too
    while fold_channel_moves(work.graph):
        fold_constant_subgraphs(work)
        work = shapes_at_window(work)
    freeze_auto_pad(work.graph, GraphIndex.build(work.graph))
    index = GraphIndex.build(work.graph)
    trace = trace_graph(work, index=index, allow_collapse=True)
    if slide_global_pool(work.graph, index, trace):  # SqueezeNet, ConvNeXt heads
        index = GraphIndex.build(work.graph)
        trace = trace_graph(work, index=index, allow_collapse=True)
    _window(image_input(model.graph), (2, 3) if trace.layout == "NCHW" else (1, 2))
    conv_fc_head = convolutional_fc_head(work, index=index, trace=trace)
    if conv_fc_head is not None:  # every output is already one cell at R
        return conv_fc_head
    source, collapses = trunk_source(trace, work)
    if len(work.graph.output) == 1 and len(trace.collapses) == 1:
        flat_fc_head = flatten_only_fc_head(work, index=index, trace=trace)
        if flat_fc_head is not None:  # SqueezeNet: the pooled map is the output
            return flat_fc_head
    field, source_shape = trace.fields[source], index.shape(source)
    firsts = first_layers(collapses, index, source=source, field=field, flatten_order=flatten_order)
    linears, edits, widths = _read_tail(firsts, index, work)
    plan = FcHeadPlan(
        source=source,
        field=field,
        linears=linears,
        firsts=firsts,
        edits=edits,
        outputs=widths,
        channels=source_shape[({0, 1, 2, 3} - set(field.axes) - {0}).pop()],
        layout=trace.layout,
    )
    return assemble(work, index=index, trace=trace, plan=plan)
