"""Read-only access to an ONNX graph: attributes, constants, shapes, producers, consumers.

The geometry tracer, the head rewriter and the à-trous pass all need the same small set of
facts about a graph; this module computes them once per graph (:class:`GraphIndex`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from densemap.service.errors import ConversionError

# Op vocabulary of the geometry tracer and the head rewriter.
WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
UNARY_OPS = frozenset(
    "Relu LeakyRelu PRelu Sigmoid Tanh Clip Elu Selu Celu HardSigmoid HardSwish Gelu Softplus "
    "Softsign Mish Identity Dropout BatchNormalization LRN Cast Neg Abs Exp Log Sqrt Reciprocal "
    "Erf Floor Ceil Round Sign Not ThresholdedRelu Shrink IsNaN IsInf".split()
)
BINARY_OPS = frozenset("Add Sub Mul Div Pow Max Min Sum Mean Where Equal Greater Less".split())
CHANNEL_AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
META_OPS = frozenset({"Shape", "Size"})
REDUCE_OPS = frozenset(
    "ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare".split()
)
GLOBAL_POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
COLLAPSE_OPS = GLOBAL_POOL_OPS | REDUCE_OPS | {"Flatten", "Reshape", "Squeeze", "MatMul", "Gemm"}


def node_label(node: onnx.NodeProto) -> str:
    """How error messages name a node: op type plus its name (or first output)."""
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes as plain Python values (bytes decoded to str)."""
    values = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        values[attr.name] = value.decode() if isinstance(value, bytes) else value
    return values


def set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    """Set (replace or add) one attribute of ``node``."""
    for index, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[index]
            break
    node.attribute.append(helper.make_attribute(name, value))


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ConversionError("the ONNX model imports no default-domain opset: re-export it")


def image_input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    """The graph's image input: its only input that is not an initializer."""
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        names = [value.name for value in inputs]
        raise ConversionError(
            f"expected a classifier with exactly one image input, found {len(inputs)}: {names}"
        )
    rank = len(inputs[0].type.tensor_type.shape.dim)
    if rank != 4:
        raise ConversionError(
            f"input {inputs[0].name!r} has rank {rank}; densemap converts 2-D image "
            "classifiers with a rank-4 input (NCHW or NHWC)"
        )
    return inputs[0]


def static_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Dimensions of a value's declared shape, ``None`` where symbolic or unknown."""
    return [
        dim.dim_value if dim.HasField("dim_value") else None
        for dim in value.type.tensor_type.shape.dim
    ]


def window_params(node: onnx.NodeProto, index: GraphIndex) -> dict:
    """kernel, strides, dilations and (begin, end) pads of a Conv/pool node, per axis."""
    attrs = attributes(node)
    kernel = attrs.get("kernel_shape")
    if kernel is None and node.op_type == "Conv":
        weight_shape = index.shape(node.input[1])
        kernel = list(weight_shape[2:]) if weight_shape and None not in weight_shape else None
    if kernel is None or len(kernel) != 2:
        raise ConversionError(f"{node_label(node)}: cannot read a 2-D kernel_shape")
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if strides != [1, 1]:
            raise ConversionError(
                f"{node_label(node)} uses auto_pad={auto_pad} with stride {strides}: its padding "
                "depends on the input size, so it has no fixed dense geometry. Re-export the "
                "classifier with explicit pads (densemap freezes them for fixed-size inputs)"
            )
        totals = [d * (k - 1) for d, k in zip(dilations, kernel, strict=False)]
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = begins + [t - b for t, b in zip(totals, begins, strict=False)]
    return {"kernel": kernel, "strides": strides, "dilations": dilations, "pads": pads}


@dataclass
class GraphIndex:
    """Producers, consumers, constant values and known static shapes of one graph."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    opset: int = 20

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph=graph)
        for init in graph.initializer:
            index.constants[init.name] = numpy_helper.to_array(init)
        for value in (*graph.input, *graph.value_info, *graph.output):
            if value.type.tensor_type.HasField("shape"):
                index.shapes[value.name] = tuple(static_dims(value))
        for node in graph.node:
            for name in node.output:
                index.producer[name] = node
            for name in node.input:
                if name:
                    index.consumers[name].append(node)
            if node.op_type == "Constant" and node.output:
                attr = node.attribute[0]
                if attr.name == "value":
                    index.constants[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_float", "value_int"):
                    index.constants[node.output[0]] = np.array(helper.get_attribute_value(attr))
                elif attr.name in ("value_floats", "value_ints"):
                    index.constants[node.output[0]] = np.array(helper.get_attribute_value(attr))
        index._fold_constant_identities()
        for name, array in index.constants.items():
            index.shapes.setdefault(name, tuple(array.shape))
        return index

    def _fold_constant_identities(self) -> None:
        """The legacy torch exporter de-duplicates equal initializers (all-zero biases of
        VGG's FC layers) and reads the copies through ``Identity`` nodes: their outputs are
        the same constants. Chains resolve because each pass follows one more link."""
        pending = [n for n in self.graph.node if n.op_type == "Identity" and n.input]
        while pending:
            remaining = [n for n in pending if n.input[0] not in self.constants]
            for node in pending:
                if node.input[0] in self.constants:
                    self.constants[node.output[0]] = self.constants[node.input[0]]
            if len(remaining) == len(pending):
                return
            pending = remaining

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant output), else ``None``."""
        if not name:
            return None
        return self.constants.get(name)

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(name)

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading ``name``'s values; ``None`` when it is a graph output, unread
        or read by several nodes. Shape/Size nodes read only the shape and do not count."""
        outputs = {value.name for value in self.graph.output}
        readers = [n for n in self.consumers.get(name, []) if n.op_type not in ("Shape", "Size")]
        if name in outputs or len(readers) != 1:
            return None
        return readers[0]


def shapes_at_window(model: onnx.ModelProto, *, spatial=None) -> onnx.ModelProto:
    """A copy of ``model`` with a batch of 1 (and, given ``spatial`` as {axis: size}, those
    image dimensions: a dense model's H and W at R) and every shape inferred."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    del work.graph.value_info[:]
    dims = image_input(work.graph).type.tensor_type.shape.dim
    fixed = {0: 1} if not dims[0].HasField("dim_value") else {}
    for axis, size in {**fixed, **(spatial or {})}.items():
        dims[axis].Clear()
        dims[axis].dim_value = size
    try:
        return onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ConversionError(f"ONNX shape inference failed on the classifier: {exc}") from None


def index_at_window(model: onnx.ModelProto, *, spatial=None) -> GraphIndex:
    """The :class:`GraphIndex` of :func:`shapes_at_window`'s copy, with the model's opset."""
    index = GraphIndex.build(shapes_at_window(model, spatial=spatial).graph)
    index.opset = opset_version(model)
    return index


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where every node follows the producers of its inputs."""
    available = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    available.add("")
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted({n for node in remaining for n in node.input} - available)
            raise ConversionError(
                f"the ONNX graph is not a DAG or reads undefined tensors {missing[:5]}: "
                "check it with onnx.checker"
            )
        pending = remaining
    return ordered


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers that no longer contribute to a graph output."""
    live = {value.name for value in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(topological_nodes(graph)):
        if any(name in live for name in node.output):
            kept.append(node)
            live.update(name for name in node.input if name)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [init for init in graph.initializer if init.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [value for value in graph.input if value.name in live]
    del graph.input[:]
    graph.input.extend(inputs)


MIN_IR_VERSION = 4  # initializers need not be graph inputs


def graph_skeleton(model: onnx.ModelProto, nodes=None, inputs=None) -> onnx.ModelProto:
    """``model`` without initializers and value_info, at IR >= 4: its nodes (or ``nodes``),
    inputs (or ``inputs``), outputs (unless other nodes are given), opsets and functions."""
    part = onnx.ModelProto()
    part.ir_version = max(model.ir_version, MIN_IR_VERSION)
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = model.graph.name
    part.graph.node.extend(model.graph.node if nodes is None else nodes)
    part.graph.input.extend(model.graph.input if inputs is None else inputs)
    if nodes is None:
        part.graph.output.extend(model.graph.output)
    return part
