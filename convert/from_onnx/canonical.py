"""Rewrite a fixed-size ONNX classifier into an equivalent graph before its head is read.

Every rewrite is exact at the window size R, the one size the classifier is defined at,
and is decided from what an op does there, never from how an exporter happened to write it:

- **Old opsets.** A file older than opset 7, which onnxruntime does not run, is upgraded to
  opset 9 by onnx's version converter (or refused naming the opset).
- **Old IR.** IR-3 files list every initializer as a graph input too: such weights are
  inputs a caller may override (not constants, for onnx and for constant folding), and a
  rewrite that adds an initializer without listing it leaves an invalid graph that loses
  every shape after it. The listed weights become plain initializers, at IR >= 4.
- **Constant subgraphs.** A weight computed from constants (``Reshape(initializer,
  initializer)``, a ``ConstantOfShape`` bias) is a constant: onnxscript's constant folder
  turns it into an initializer. Only nodes that do not read the image's values are folded
  (shape arithmetic may: the channel count is static), and the image's batch, height and
  width are symbolic meanwhile, so nothing is fixed to R.
- **Windows that are global at R.** A pool or conv whose one window at R covers its whole
  input along an axis (kernel, pads, dilation, ceil mode) reads every real value there
  (its stride does not matter at R: ``F.avg_pool2d(x, 4)`` on a 4x4 map is a global pool):
  GoogLeNet's final 7x7 average pool with pads (0, 0, 1, 1) on a 6x6 map averages the 36
  real values (``count_include_pad=0``). On a larger image its dense form is a 6x6
  average at stride 1, not the 7x7 one it is written as. Such an axis gets the input's
  size as kernel, no pads, stride 1 (a conv keeps the taps that meet real values; an
  average that counted its pads is scaled back), and the new node is checked against the
  old one at R on random values before it replaces it.
- **Per-feature ops after a flatten of one position** (``GAP -> 1x1 Conv -> Flatten ->
  Softmax``, MobileNet and SqueezeNet as MXNet wrote them): a Flatten/Reshape/Squeeze that
  only drops the unit axes of a map of one cell at R, read by an activation or a softmax
  over the features, moves after that op (the softmax then runs over the channel axis), so
  the head ends in the flatten and the map is the output.
- **Softmax before opset 13** runs over all axes from ``axis`` on, flattened. Where those
  axes after ``axis`` are all 1 at R (C x 1 x 1 after a global pool) it is a softmax over
  ``axis`` alone: it becomes ``Transpose -> Softmax(last axis) -> Transpose``, which stays
  a class softmax on the map. One that spans real spatial extent at R stays (and is refused
  by the geometry tracer: it is computed per image).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from convert.from_onnx.graph import (
    CHANNEL_AXIS_OPS,
    META_OPS,
    GraphIndex,
    attributes,
    image_input,
    node_label,
    opset_version,
    remove_dead_nodes,
    set_attribute,
    topological_nodes,
    window_params,
)
from convert.geometry import detect_layout
from service.errors import ConversionError

MIN_RUNTIME_OPSET = 7  # onnxruntime's oldest supported default-domain opset
UPGRADE_OPSET = 9  # what older files are converted to (Caffe2's zoo files use 9)
FOLD_SIZE_LIMIT = 1 << 31  # elements: fold any weight (VGG's FC weight is 103 M)
GLOBAL_AT_R_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
PROBE_RTOL = 1e-5  # float32 onnxruntime runs of the same sums in another order


def canonical_classifier(model: onnx.ModelProto) -> onnx.ModelProto:
    """An equivalent copy of ``model`` in the form the head reader expects."""
    work = runnable_classifier(model)
    fold_constant_subgraphs(work)
    shaped = shapes_at_window(work)
    index = GraphIndex.build(shaped.graph)
    index.opset = opset_version(work)
    changed = _globalize_windows(work.graph, index)
    changed |= _channel_softmaxes(work, index)
    if changed:
        remove_dead_nodes(work.graph)
    for _ in range(len(work.graph.node)):  # each pass moves one flatten past one op
        index = GraphIndex.build(shapes_at_window(work).graph)
        index.opset = opset_version(work)
        if not _sink_flatten(work, index):
            break
    return work


def runnable_classifier(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that onnxruntime runs: weights as initializers (IR >= 4) and, for
    a file older than opset 7 (onnxruntime's oldest), onnx's version converter to opset 9."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    list_weights_as_initializers(work)
    opset = opset_version(work)
    if opset >= MIN_RUNTIME_OPSET:
        return work
    try:
        inferred = onnx.shape_inference.infer_shapes(work)
        upgraded = onnx.version_converter.convert_version(inferred, UPGRADE_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        reason = " ".join(str(exc).split())[:200]
        raise ConversionError(
            f"the classifier uses opset {opset}, older than onnxruntime runs "
            f"({MIN_RUNTIME_OPSET}), and onnx's version converter could not upgrade it "
            f"({reason}): re-export it at opset {MIN_RUNTIME_OPSET} or later"
        ) from None
    del upgraded.graph.value_info[:]
    return upgraded


def list_weights_as_initializers(model: onnx.ModelProto) -> None:
    """Keep the image as the only graph input (IR 3 also lists every weight), IR >= 4."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)


def _image_dependent(graph: onnx.GraphProto, image: str) -> set[str]:
    """Output names of every node whose value depends on the image's values. Shape and
    Size read only its shape: what is computed from them may fold where it does not
    depend on the (symbolic) batch, height and width: ``x.chunk(2, dim=1)``'s bounds."""
    dependent = {image}
    for node in topological_nodes(graph):
        if node.op_type not in META_OPS and any(name in dependent for name in node.input):
            dependent.update(node.output)
    return dependent


def fold_constant_subgraphs(model: onnx.ModelProto) -> None:
    """Fold every node that computes from constants alone into an initializer (in place)."""
    import onnxscript.optimizer

    image = image_input(model.graph)
    dependent = _image_dependent(model.graph, image.name)
    if all(any(n in dependent for n in node.output) or node.op_type == "Constant"
           for node in model.graph.node):  # fmt: skip
        return
    del model.graph.value_info[:]  # shapes inferred at R would fold H and W to R's
    dims = image.type.tensor_type.shape.dim
    kept = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for dim, copy in zip(dims, kept, strict=True):
        copy.CopyFrom(dim)
    symbolic = {0: "densemap_batch"}
    layout = detect_layout(GraphIndex.build(model.graph), image.name)
    channel_axis = 1 if layout == "NCHW" else 3
    symbolic.update({a: f"densemap_{a}" for a in range(1, 4) if a != channel_axis})
    for axis, name in symbolic.items():
        dims[axis].Clear()
        dims[axis].dim_param = name

    def should_fold(node) -> bool:  # everything computed from constants alone, nothing else
        return not any(out.name in dependent for out in node.outputs)

    try:
        onnxscript.optimizer.fold_constants(
            model,
            onnx_shape_inference=True,  # static channel counts inside shape arithmetic
            input_size_limit=FOLD_SIZE_LIMIT,
            output_size_limit=FOLD_SIZE_LIMIT,
            should_fold=should_fold,
        )
    except Exception as exc:  # noqa: BLE001 - the folder raises many types
        reason = " ".join(str(exc).split())[:200]
        raise ConversionError(
            f"folding the classifier's constant subgraphs failed: {reason}"
        ) from None
    image = image_input(model.graph)
    for dim, copy in zip(image.type.tensor_type.shape.dim, kept, strict=True):
        dim.CopyFrom(copy)


def shapes_at_window(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with a batch of 1 and every shape inferred at R."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    dims = image_input(work.graph).type.tensor_type.shape.dim
    if not dims[0].HasField("dim_value"):
        dims[0].Clear()
        dims[0].dim_value = 1
    try:
        return onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ConversionError(f"ONNX shape inference failed on the classifier: {exc}") from None


# -- windows that are global at R ---------------------------------------------------------


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
        dilation, stride = params["dilations"][a], params["strides"][a]
        if out[2 + a] != 1 or (size > 1 and dilation != 1):
            continue
        if not begin and not params["pads"][a + 2] and kernel == size and stride == 1:
            continue  # already a window of its input's size at stride 1
        if kernel - begin >= size:
            axes.append(a)
    return axes


def _globalize_windows(graph: onnx.GraphProto, index: GraphIndex) -> bool:
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
        _replace(graph, node, replacement)
        graph.initializer.extend(inits)
        changed = True
    return changed


def _replace(graph: onnx.GraphProto, node: onnx.NodeProto, nodes: list) -> None:
    position = list(graph.node).index(node)
    del graph.node[position]
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)


def _global_form(node, index: GraphIndex, axes: list[int]):
    """The nodes (and initializers) computing ``node`` with a window of the input's size
    on ``axes``: kernel = size, no pads, stride 1; the rest as it is."""
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
        kernel[a], pads[a], pads[a + 2], strides[a], dilations[a] = size, 0, 0, 1, 1
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
    new_attrs = {k: v for k, v in attrs.items() if k not in ("auto_pad", "ceil_mode")}
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
    from convert.runtime import cpu_session

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


# -- Softmax before opset 13 -----------------------------------------------------------


def _channel_softmaxes(model: onnx.ModelProto, index: GraphIndex) -> bool:
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
        _replace(graph, node, nodes)
        changed = True
    return changed


# -- per-feature ops after a flatten of one position --------------------------------------

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


def _sink_flatten(model: onnx.ModelProto, index: GraphIndex) -> bool:
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
        _replace(graph, op, [*nodes, flattened])
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
