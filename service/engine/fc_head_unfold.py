"""Huge-kernel convolutions (a classifier's first FC layer as a conv) as unfold + MatMul.

At 2048² VGG-16's first head conv (7x7 over 512 channels -> 4096: FC6 as a conv, 103 M
weights) made onnxruntime's CUDA execution provider take a cuDNN workspace of tens of GB,
which its arena keeps: a second session in the process (the fp16 copy, a second model) then ran
out of memory (docs/engine.md, "GPU check"). The same convolution written as

    Pad -> kh*kw strided Slices -> Concat (im2col: [N, kh*kw*C, oh, ow])
        -> Reshape [N, K, oh*ow] -> MatMul by the weights as a [O, K] matrix -> + bias
        -> Reshape [N, O, oh, ow]

is a plain GEMM (cuBLAS, no cuDNN workspace). It computes the same sums over the same
products; only the order of the float32 additions differs (as between two cuDNN
algorithms), so maps agree with the conv's to float32 rounding (tests/engine/test_head_unfold.py:
identical in float64, within 1e-5 of the logit range in float32). The unfolded input costs
kh*kw times the conv's input in memory: the head conv reads the trunk's output at the
net's full stride (VGG-16 at 2048²: 64x64x512, 337 MB unfolded), not an image-sized map.

:func:`model_source` applies it when a session is created: on CUDA sessions by default
(``EngineConfig.fc_head_unfold = "cuda"``), so that models converted before it benefit, never
on CPU unless asked (``"always"``, which the tests use): CPU behaviour stays as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger("densemap.engine")

MIN_OPSET = 11  # Slice with steps and Pad with a pads input
PROTOBUF_LIMIT = 2**31 - 1  # bytes one serialized ModelProto can hold
_TO_END = np.iinfo(np.int64).max


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _huge(node, weights: dict[str, onnx.TensorProto], min_weights: int) -> bool:
    """Whether ``node`` is a conv to unfold: decided from its weight's shape (no copy)."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    weight = weights.get(node.input[1])
    shape = tuple(weight.dims) if weight is not None else ()
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    return (
        len(shape) == 4
        and int(np.prod(shape)) >= min_weights
        and shape[2] * shape[3] > 1
        and attrs.get("group", 1) == 1
        and auto_pad in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        and (len(node.input) < 3 or not node.input[2] or node.input[2] in weights)
    )


def _unfold_nodes(node, weight: np.ndarray, bias: np.ndarray | None, tag: str):
    """Nodes and initializers computing ``node`` (a 2-D Conv) as unfold + MatMul."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out_channels, in_channels, kh, kw = weight.shape
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    valid = attrs.get("auto_pad", b"NOTSET") in (b"VALID", "VALID")
    pads = [0, 0, 0, 0] if valid else list(attrs.get("pads", [0, 0, 0, 0]))
    name = f"{tag}_unfold"
    inits, nodes = [], []
    source = node.input[0]
    if any(pads):
        inits.append(numpy_helper.from_array(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64), f"{name}_pads"))  # fmt: skip
        nodes.append(helper.make_node("Pad", [source, f"{name}_pads"], [f"{name}_padded"]))
        source = f"{name}_padded"
    inits += [
        numpy_helper.from_array(np.array([2, 3], np.int64), f"{name}_axes"),
        numpy_helper.from_array(np.array(strides, np.int64), f"{name}_steps"),
    ]
    pieces = []
    for i in range(kh):
        for j in range(kw):
            starts = [i * dilations[0], j * dilations[1]]
            # the window's last tap ends at the padded size minus what the later taps need
            ends = [
                _TO_END if i == kh - 1 else -(kh - 1 - i) * dilations[0],
                _TO_END if j == kw - 1 else -(kw - 1 - j) * dilations[1],
            ]
            piece = f"{name}_tap{i}_{j}"
            inits += [
                numpy_helper.from_array(np.array(starts, np.int64), f"{piece}_starts"),
                numpy_helper.from_array(np.array(ends, np.int64), f"{piece}_ends"),
            ]
            slice_inputs = [source, f"{piece}_starts", f"{piece}_ends", f"{name}_axes"]
            nodes.append(helper.make_node("Slice", [*slice_inputs, f"{name}_steps"], [piece]))
            pieces.append(piece)
    columns = kh * kw * in_channels
    # channel (i*kw + j)*C + c of the unfolded input is tap (i, j) of channel c
    matrix = weight.transpose(0, 2, 3, 1).reshape(out_channels, columns)
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(matrix), f"{name}_matrix"),
        numpy_helper.from_array(np.array([0, columns, -1], np.int64), f"{name}_flat_shape"),
        numpy_helper.from_array(np.array([0, out_channels], np.int64), f"{name}_lead"),
        numpy_helper.from_array(np.array([2], np.int64), f"{name}_from"),
        numpy_helper.from_array(np.array([4], np.int64), f"{name}_to"),
    ]
    nodes += [
        helper.make_node("Concat", pieces, [f"{name}_columns"], axis=1),
        helper.make_node("Reshape", [f"{name}_columns", f"{name}_flat_shape"], [f"{name}_flat"]),
        helper.make_node("MatMul", [f"{name}_matrix", f"{name}_flat"], [f"{name}_product"]),
        helper.make_node("Shape", [f"{name}_columns"], [f"{name}_shape"]),
        helper.make_node("Slice", [f"{name}_shape", f"{name}_from", f"{name}_to"], [f"{name}_hw"]),
        helper.make_node("Concat", [f"{name}_lead", f"{name}_hw"], [f"{name}_out_shape"], axis=0),
    ]
    product = f"{name}_product"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.reshape(-1, 1), f"{name}_bias"))
        nodes.append(helper.make_node("Add", [product, f"{name}_bias"], [f"{name}_biased"]))
        product = f"{name}_biased"
    nodes.append(helper.make_node("Reshape", [product, f"{name}_out_shape"], [node.output[0]]))
    return nodes, inits


def unfold_huge_convs(model: onnx.ModelProto, *, min_weights: int) -> int:
    """Rewrite every conv of ``model`` with >= ``min_weights`` weights in place; how many."""
    graph = model.graph
    if _opset(model) < MIN_OPSET:
        return 0
    weights = {init.name: init for init in graph.initializer}
    targets = {i for i, n in enumerate(graph.node) if _huge(n, weights, min_weights)}
    if not targets:
        return 0
    new_nodes, used = [], set()
    for index, node in enumerate(graph.node):
        if index not in targets:
            new_nodes.append(node)
            continue
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(weights[node.input[2]])
        weight = numpy_helper.to_array(weights[node.input[1]])
        nodes, inits = _unfold_nodes(node, weight, bias, f"densemap_conv{index}")
        new_nodes += nodes
        graph.initializer.extend(inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for node in graph.node:
        used.update(node.input)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(targets)


def applies(mode: str, *, cuda: bool) -> bool:
    """Whether ``EngineConfig.fc_head_unfold`` = ``mode`` rewrites a session on this device."""
    return mode == "always" or (mode == "cuda" and cuda)


def model_source(path: Path, *, mode: str, min_weights: int, cuda: bool) -> str | bytes:
    """What a session for ``path`` opens: the file itself, or the model serialised with its
    huge convs unfolded (when ``mode`` applies on this device and the model has one)."""
    source = os.fspath(path)
    if not applies(mode, cuda=cuda):
        return source
    model = onnx.load(source)
    count = unfold_huge_convs(model, min_weights=min_weights)  # 0 below MIN_OPSET
    if count == 0:
        return source
    if model.ByteSize() > PROTOBUF_LIMIT:
        log.warning("%s: over 2 GiB once unfolded: its huge convs stay convs", path.name)
        return source
    log.info("%s: %d huge-kernel conv(s) run as unfold + MatMul", path.name, count)
    return model.SerializeToString()
