"""The exact reference of ``--verify``: the classifier's own head on every window of its own
trunk's output over the whole image.

The classifier is cut where its head starts, decided from what its ops do at its input
size R (never from the converter's rewrite): shape-inferred at R with a batch of 1, the cut
F is the input of the first op (topological order) that reads a spatial map and whose
output is not one larger than 1x1: rank 4 with spatial axes that are not both 1 (Flatten,
Reshape, Gemm, a global pool, a 7x7 pool with pads on a 6x6 map, a 5x5 conv on a 5x5 map all
cut there). Every head must read that same F. Then

- the **trunk** (image -> F, input height and width made dynamic) runs once on the whole
  test image: F_full;
- the **head** (F -> every output, F of its size h x w at R) runs on the windows
  F_full[..., i*k : i*k+h, j*k : j*k+w], k = S / (F's stride), batched.

Cell (i, j) then is what the classifier computes on the crop at (i*S, j*S), except that its
trunk sees the real neighbours where the crop saw zero padding: exactly what a dense model
computes, padded or not. A trunk that cannot run at another size (a constant that depends
on R) raises :class:`TrunkNotDense`; the caller falls back to crops where that is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from densemap.convert.from_onnx.graph import (
    META_OPS,
    MIN_IR_VERSION,
    GraphIndex,
    attributes,
    graph_skeleton,
    image_input,
    topological_nodes,
)
from densemap.convert.geometry import detect_layout, trace_graph
from densemap.service.errors import ConversionError

Pair = tuple[int, int]
SMALL_TENSOR = 64  # elements: shape inference keeps the values of these (Reshape targets)


class TrunkNotDense(ConversionError):
    """The classifier's trunk does not run on an image larger than R."""


@dataclass(frozen=True)
class Cut:
    """Where the classifier's head starts: the feature map F, as seen at R."""

    feature: str
    axes: Pair  # F's spatial axes
    size: Pair  # F's h x w at R
    jump: Pair  # F's stride w.r.t. the image
    layout: str  # the image's, "NCHW" or "NHWC"
    dims: tuple  # F's shape at R with a batch of 1


def find_cut(model: onnx.ModelProto) -> Cut:
    """The one feature map F every head of ``model`` starts from (see the module doc)."""
    index, shapes = _light_index(model)
    image = image_input(model.graph).name
    try:
        trace = trace_graph(model, index=index, allow_collapse=True)
        axes = {name: field.axes for name, field in trace.fields.items()}
    except ConversionError:  # an op past the head's start the tracer refuses (old Softmax)
        trace, axes = None, _axes_through_transposes(model, index, image)
    spatial = {image}
    cuts: list[tuple[onnx.NodeProto, list[str]]] = []
    for node in topological_nodes(model.graph):
        inputs = [name for name in node.input if name in spatial]
        if not inputs or node.op_type in META_OPS:
            continue
        outputs = node.output[:1] if node.op_type == "BatchNormalization" else node.output
        if all(_is_map(name, axes, shapes) for name in outputs if name):
            spatial.update(name for name in outputs if name)
        else:
            cuts.append((node, inputs))
    feature = _common_cut(model, cuts)
    if trace is None:  # the trunk alone must trace (its fields: F's stride)
        trace = trace_graph(_trunk_only(model, feature), index=index)
    field = trace.fields[feature]
    size = tuple(shapes[feature][axis] for axis in field.axes)
    return Cut(feature, field.axes, size, field.jump, trace.layout, shapes[feature])


def _is_map(name: str, axes: dict[str, Pair], shapes) -> bool:
    """Whether ``name`` is a spatial map larger than 1x1 at R."""
    shape = shapes.get(name)
    if name not in axes or shape is None or len(shape) != 4:
        return False
    return tuple(shape[axis] for axis in axes[name]) != (1, 1)


def _axes_through_transposes(model, index: GraphIndex, image: str) -> dict[str, Pair]:
    """Each tensor's spatial axes as the image's, moved by Transposes only (the first
    spatial input's otherwise): enough to find the cut, which the trunk's trace confirms."""
    layout = detect_layout(index, image)
    axes = {image: (2, 3) if layout == "NCHW" else (1, 2)}
    for node in topological_nodes(model.graph):
        source = next((axes[name] for name in node.input if name in axes), None)
        if source is None:
            continue
        if node.op_type == "Transpose":
            perm = [int(p) for p in attributes(node).get("perm", [3, 2, 1, 0])]
            source = (perm.index(source[0]), perm.index(source[1]))
        axes.update(dict.fromkeys((name for name in node.output if name), source))
    return axes


def _trunk_only(model: onnx.ModelProto, feature: str) -> onnx.ModelProto:
    """The nodes that compute ``feature``, F as the output, weights without data."""
    nodes, reads = _needed(topological_nodes(model.graph), [feature], stop=set())
    trunk = graph_skeleton(model, nodes)
    trunk.graph.output.append(helper.make_tensor_value_info(feature, TensorProto.FLOAT, None))
    trunk.graph.initializer.extend(
        TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
        for init in model.graph.initializer
        if init.name in reads
    )
    return trunk


def _common_cut(model: onnx.ModelProto, cuts) -> str:
    """The one feature map every head starts from (the first cut above each output)."""
    producers = {name: node for node in model.graph.node for name in node.output}
    order = {tuple(node.output): position for position, (node, _) in enumerate(cuts)}
    features = {}
    for output in model.graph.output:
        ancestors, pending = set(), [output.name]
        while pending:
            node = producers.get(pending.pop())
            if node is not None and tuple(node.output) not in ancestors:
                ancestors.add(tuple(node.output))
                pending.extend(node.input)
        firsts = sorted(order[a] for a in ancestors if a in order)
        if not firsts:
            raise ConversionError(
                f"the classifier's output {output.name!r} is still a feature map larger than "
                "1x1 at its input size, or does not read the image: no head to cut the "
                "classifier at (is it a window classifier?)"
            )
        node, inputs = cuts[firsts[0]]
        if len(inputs) != 1:
            raise ConversionError(
                f"the head of output {output.name!r} starts at {node.op_type} "
                f"{node.name!r}, which reads several feature maps {inputs}: verify cannot cut "
                "this classifier into one trunk and a head"
            )
        features[output.name] = inputs[0]
    if len(set(features.values())) > 1:
        raise ConversionError(
            f"the classifier's heads start from different feature maps ({features}): verify "
            "compares every head with one trunk and cannot cut this classifier"
        )
    return next(iter(features.values()))


def _light_index(model: onnx.ModelProto) -> tuple[GraphIndex, dict[str, tuple]]:
    """A :class:`GraphIndex` of ``model`` and every tensor's shape at R with a batch of 1,
    both made without copying the weights' values (a VGG's 500 MB): shape inference runs on
    a copy whose large float initializers have their dims and no data."""
    light, large = graph_skeleton(model), set()
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= SMALL_TENSOR or init.data_type != TensorProto.FLOAT:
            light.graph.initializer.append(init)
        else:
            large.add(init.name)
            light.graph.initializer.append(
                TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
            )
    dims = image_input(light.graph).type.tensor_type.shape.dim
    if not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = 1
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ConversionError(f"ONNX shape inference failed on the classifier: {exc}") from None
    graph = inferred.graph
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim
            )
    for init in model.graph.initializer:
        shapes.setdefault(init.name, tuple(init.dims))
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in large:
            del graph.initializer[index]
    graph_index = GraphIndex.build(graph)
    graph_index.shapes.update({name: shapes[name] for name in large})
    return graph_index, shapes


def split(model: onnx.ModelProto, cut: Cut) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(trunk, head): image -> F with a dynamic height and width, and F -> the outputs.
    ``model`` itself becomes the head (its weights are not copied: a VGG's 500 MB)."""
    image = onnx.ValueInfoProto()
    image.CopyFrom(image_input(model.graph))
    feature = cut.feature
    nodes = topological_nodes(model.graph)
    trunk_nodes, trunk_reads = _needed(nodes, [feature], stop=set())
    outputs = [value.name for value in model.graph.output]
    fc_head_nodes, fc_head_reads = _needed(nodes, outputs, {feature})
    fc_head_nodes = [_copy(node) for node in fc_head_nodes]  # the graph's own are deleted below
    constants = {init.name for init in model.graph.initializer}
    for name in sorted(fc_head_reads - constants):
        raise ConversionError(
            f"the classifier's head reads {name!r} besides the feature map {feature!r} it "
            "starts from: verify cannot cut this classifier into one trunk and a head"
        )
    elem_type = image.type.tensor_type.elem_type
    trunk_input = onnx.ValueInfoProto()
    trunk_input.CopyFrom(image)
    for axis, name in zip(
        (2, 3) if cut.layout == "NCHW" else (1, 2), ("height", "width"), strict=True
    ):
        trunk_input.type.tensor_type.shape.dim[axis].Clear()
        trunk_input.type.tensor_type.shape.dim[axis].dim_param = name
    trunk = graph_skeleton(model, trunk_nodes, [trunk_input])
    batch = image.type.tensor_type.shape.dim[0]
    dims = [batch.dim_value if batch.HasField("dim_value") else "batch", *cut.dims[1:]]
    full = [("feature_height", "feature_width")[cut.axes.index(a)] if a in cut.axes else d
            for a, d in enumerate(dims)]  # fmt: skip
    trunk.graph.output.append(helper.make_tensor_value_info(feature, elem_type, full))
    trunk.graph.initializer.extend(t for t in model.graph.initializer if t.name in trunk_reads)
    kept = [t for t in model.graph.initializer if t.name in fc_head_reads]  # same messages
    graph = model.graph
    del graph.node[:], graph.input[:], graph.value_info[:]
    graph.node.extend(fc_head_nodes)
    graph.input.append(helper.make_tensor_value_info(feature, elem_type, dims))
    names = {t.name for t in kept}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in names:
            del graph.initializer[index]
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return trunk, model


def _needed(nodes, targets, stop: set[str]):
    """The nodes that compute ``targets`` (in order) and every tensor they read."""
    wanted, kept = set(targets), []
    for node in reversed(nodes):
        if any(name in wanted for name in node.output):
            kept.append(node)
            wanted.update(name for name in node.input if name and name not in stop)
    made = {name for node in kept for name in node.output}
    return kept[::-1], wanted - made


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy
