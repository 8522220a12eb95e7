"""Activation memory of one pass, estimated from the model graph at a concrete input size.

At load, the graph is copied without its weights (large initializers become typed graph
inputs), so ONNX shape inference at any (H, W) is cheap. The estimate is the peak of live
activation bytes when the nodes run in order and each tensor is freed after its last use,
which is how onnxruntime plans its buffers. Weights and the cuDNN workspace are not counted.
The same number decides whether a request is tiled and whether it is refused.

On CPU, onnxruntime's full graph optimization runs convolutions in the blocked NCHWc
layout: every 4-D activation's channels are padded to a multiple of the block (8 with
AVX2, 16 with AVX-512), so a net of few channels holds up to that many times its NCHW
bytes (docs/engine.md "Measurements behind the code"). ``channel_block`` rounds
the channels of the 4-D activations that follow a Conv up the same way
(:func:`nchwc_block` on CPU, 1 on CUDA).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference

from densemap.service.errors import ModelLoadError

_KEEP_INITIALIZER_ELEMENTS = 64  # small constants (shapes, axes) stay: inference may read them


def _element_size(elem_type: int) -> int:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph whose large initializers are typed inputs (no weight bytes)."""
    graph = model.graph
    kept, typed_inputs = [], []
    for tensor in graph.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= _KEEP_INITIALIZER_ELEMENTS and (
            tensor.data_location != onnx.TensorProto.EXTERNAL
        ):
            kept.append(tensor)
        else:
            typed_inputs.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    skeleton = helper.make_graph(
        list(graph.node), graph.name, inputs + typed_inputs, list(graph.output), kept
    )
    copy = helper.make_model(skeleton, opset_imports=list(model.opset_import))
    copy.ir_version = model.ir_version
    return copy


def infer_at_size(
    skeleton: onnx.ModelProto, input_name: str, layout: str, height: int, width: int
) -> onnx.ModelProto:
    """``skeleton`` with every shape inferred for a batch of one height x width image."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    for value in model.graph.input:
        if value.name == input_name:
            dims = value.type.tensor_type.shape.dim
            axes = (2, 3) if layout == "NCHW" else (1, 2)
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
            for axis, size in zip(axes, (height, width), strict=True):
                dims[axis].ClearField("dim_param")
                dims[axis].dim_value = size
    return shape_inference.infer_shapes(model)


def nchwc_block() -> int:
    """onnxruntime's NCHWc channel block on this CPU: 16 with AVX-512, 8 on other x86-64
    (AVX2), 1 where the blocked layout is not used."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 1
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if " avx512f" in flags else 8


MAC_OPS = frozenset(("Conv", "ConvTranspose", "Gemm", "MatMul"))


def _dims(value) -> list[int] | None:
    dims = value.type.tensor_type.shape.dim
    if dims and all(d.HasField("dim_value") for d in dims):
        return [d.dim_value for d in dims]
    return None


def graph_macs(graph: onnx.GraphProto) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, Gemm and MatMul nodes of a graph
    whose shapes are inferred: what one pass computes (elementwise ops are not counted)."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(value)
        if dims is not None:
            shapes[value.name] = dims
    total = 0
    for node in graph.node:
        if node.op_type not in MAC_OPS or len(node.input) < 2:
            continue
        first, weight, out = (
            shapes.get(name) for name in (node.input[0], node.input[1], node.output[0])
        )
        if weight is None or out is None or first is None:
            continue
        if node.op_type == "Conv":  # weight [out, in/groups, kh, kw]: groups counted
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":  # weight [in, out/groups, kh, kw]
            total += int(np.prod(first, dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
        else:  # every output element sums over the shared (inner) axis of the first input
            inner = first[0] if node.op_type == "Gemm" and _transposed(node) else first[-1]
            total += int(np.prod(out, dtype=np.int64)) * int(inner)
    return total


def _transposed(node) -> bool:
    return any(a.name == "transA" and a.i for a in node.attribute)


def conv_macs(model: onnx.ModelProto, input_name: str, height: int, width: int) -> int:
    """Multiply-accumulates of one height x width NCHW image (:func:`graph_macs`)."""
    return graph_macs(infer_at_size(strip_weights(model), input_name, "NCHW", height, width).graph)


def _blocked_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors onnxruntime may hold in the NCHWc layout: the outputs of Conv nodes, and of
    every node that consumes one of those (pools, activations, sums follow the layout)."""
    blocked: set[str] = set()
    for node in graph.node:
        if node.op_type == "Conv" or any(name in blocked for name in node.input):
            blocked.update(name for name in node.output if name)
    return blocked


class ActivationEstimator:
    """Peak activation bytes of one pass of a model, for any input height and width."""

    def __init__(
        self, model: onnx.ModelProto, *, input_name: str, layout: str, channel_block: int = 1
    ) -> None:
        names = [i.name for i in model.graph.input]
        if input_name not in names:
            raise ModelLoadError(f"the model has no input {input_name!r} (inputs: {names})")
        self._skeleton = strip_weights(model)
        self._input_name = input_name
        self._layout = layout
        self._channel_block = max(int(channel_block), 1)
        self._blocked = _blocked_tensors(self._skeleton.graph) if self._channel_block > 1 else set()
        self._weights = {t.name for t in model.graph.initializer}
        self.activation_bytes = functools.lru_cache(maxsize=4096)(self._activation_bytes)
        self._inferred = functools.lru_cache(maxsize=64)(self._infer)

    def macs(self, height: int, width: int) -> int:
        """Multiply-accumulates of one untiled pass on a height x width image."""
        return self._inferred(int(height), int(width))[1]

    def _infer(self, height: int, width: int) -> tuple[dict[str, int], int]:
        """(bytes of each tensor whose shape is known, MACs) at height x width: one shape
        inference serves both."""
        graph = infer_at_size(self._skeleton, self._input_name, self._layout, height, width).graph
        sizes: dict[str, int] = {}
        for value in [*graph.input, *graph.value_info, *graph.output]:
            shape = _dims(value)
            if shape is not None:
                if len(shape) == 4 and value.name in self._blocked:  # NCHWc padding
                    shape[1] = -(-shape[1] // self._channel_block) * self._channel_block
                count = int(np.prod(shape, dtype=np.int64))
                sizes[value.name] = count * _element_size(value.type.tensor_type.elem_type)
        return sizes, graph_macs(graph)

    def _activation_bytes(self, height: int, width: int) -> int:
        sizes = self._inferred(height, width)[0]
        nodes = self._skeleton.graph.node
        last_use: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for name in node.input:
                last_use[name] = index
        outputs = {o.name for o in self._skeleton.graph.output}
        live = {self._input_name: sizes.get(self._input_name, 0)}
        peak = sum(live.values())
        for index, node in enumerate(nodes):
            known_inputs = [live[n] for n in node.input if n in live]
            fallback = max(known_inputs, default=0)
            for name in node.output:
                if name:
                    live[name] = sizes.get(name, fallback)
            peak = max(peak, sum(live.values()))
            for name in node.input:
                if name in live and last_use.get(name) == index and name not in outputs:
                    del live[name]
        return int(peak)
