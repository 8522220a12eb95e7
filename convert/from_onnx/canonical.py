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
- **Windows that are global at R** (GoogLeNet's padded 7x7 average on a 6x6 map) become
  windows of their input's size: :mod:`densemap.convert.from_onnx.global_windows`.
- **Ops over the class axis of a one-position map** (Softmax before opset 13 over C x 1 x 1,
  activations and softmaxes after a flatten of one position) are written so that they stay
  over the classes on the map: :mod:`densemap.convert.from_onnx.class_axis`.
"""

from __future__ import annotations

import onnx

from densemap.convert.from_onnx.class_axis import channel_softmaxes, sink_flatten
from densemap.convert.from_onnx.global_windows import globalize_windows
from densemap.convert.from_onnx.graph import (
    META_OPS,
    GraphIndex,
    image_input,
    index_at_window,
    opset_version,
    remove_dead_nodes,
    topological_nodes,
)
from densemap.convert.geometry import detect_layout
from densemap.service.errors import ConversionError

MIN_RUNTIME_OPSET = 7  # onnxruntime's oldest supported default-domain opset
UPGRADE_OPSET = 9  # what older files are converted to (Caffe2's zoo files use 9)
FOLD_SIZE_LIMIT = 1 << 31  # elements: fold any weight (VGG's FC weight is 103 M)


def canonical_classifier(model: onnx.ModelProto) -> onnx.ModelProto:
    """An equivalent copy of ``model`` in the form the head reader expects."""
    work = runnable_classifier(model)
    fold_constant_subgraphs(work)
    index = index_at_window(work)
    changed = globalize_windows(work.graph, index)
    if channel_softmaxes(work, index) or changed:
        remove_dead_nodes(work.graph)
        index = index_at_window(work)
    while sink_flatten(work, index):  # each moves one flatten past one op: it ends
        index = index_at_window(work)
    return work


def runnable_classifier(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that onnxruntime runs (:func:`make_runnable`)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return make_runnable(work)


def make_runnable(work: onnx.ModelProto) -> onnx.ModelProto:
    """``work``, edited in place, or its upgrade: what onnxruntime runs. Weights become
    initializers (IR >= 4) and a file older than opset 7 (onnxruntime's oldest) goes through
    onnx's version converter to opset 9."""
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
