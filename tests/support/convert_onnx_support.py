"""Shared helpers for the ONNX-path converter tests (tests/convert/test_convert_onnx*.py, ...).

References here are independent of the code under test: the dense ONNX graph is evaluated
with onnx's reference evaluator on a float64 copy (onnxruntime has no double Conv), and
shift-and-stitch is written out in full. Crops are cut by tests/support/oracle.py.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from densemap.convert.export import export_classifier_onnx
from densemap.convert.runtime import Float64Runner

ORT_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 10

# ``dynamo`` values for tests that run both torch exporters. The dynamo exporter takes 1-3 s
# per tiny classifier (the legacy one about 0.1 s): its cases are marked slow, so
# `make test-fast` checks legacy exports and `make test` (CI) both.
BOTH_EXPORTERS = [
    pytest.param(False, id="legacy"),
    pytest.param(True, id="dynamo", marks=pytest.mark.slow),
]


def export_classifier(model: nn.Module, size, *, dynamo: bool, channels: int = 3, opset=None):
    """A fixed-size ONNX classifier (dynamic batch) from torch's legacy or dynamo exporter,
    through densemap.convert.export; ``opset`` asks torch.onnx.export for an older opset directly."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if opset is None:
        return export_classifier_onnx(
            model.eval(), input_size=size, in_channels=channels, dynamo=dynamo
        )
    image = torch.randn(1, channels, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            if dynamo:
                program = torch.onnx.export(
                    model.eval(), (image,), dynamo=True, input_names=["input"], opset_version=opset
                )
                return program.model_proto
            buffer = io.BytesIO()
            torch.onnx.export(
                model.eval(), (image,), buffer, dynamo=False, input_names=["input"],
                opset_version=opset,
            )  # fmt: skip
            return onnx.load_from_string(buffer.getvalue())
        finally:
            logging.disable(logging.NOTSET)


def dense64(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    """Run an ONNX model in float64 with onnx.reference."""
    return Float64Runner(model)(image)


def ort32(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: image.astype(np.float32)})[0]


def shift_and_stitch(run, image: np.ndarray, *, window, stride, k) -> np.ndarray:
    """k x k shift-and-stitch: pass (p, q) runs on the image CROPPED by (p*d, q*d)."""
    delta = tuple(s // f for s, f in zip(stride, k, strict=True))
    size = image.shape[2:]
    n = tuple((w - r) // d + 1 for w, r, d in zip(size, window, delta, strict=True))
    stitched = None
    for p in range(k[0]):
        for q in range(k[1]):
            shifted = np.ascontiguousarray(image[:, :, p * delta[0] :, q * delta[1] :])
            score_map = run(shifted)
            if stitched is None:
                stitched = np.full((1, score_map.shape[1], *n), np.nan, dtype=score_map.dtype)
            target = stitched[:, :, p :: k[0], q :: k[1]]
            target[...] = score_map[:, :, : target.shape[2], : target.shape[3]]
    assert not np.isnan(stitched).any()
    return stitched


# -- hand-built ONNX graphs --------------------------------------------------------------


class GraphBuilder:
    """A small builder of NCHW ONNX graphs with random float32 weights."""

    def __init__(self, channels: int = 1, *, seed: int = 0, layout: str = "NCHW") -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.channels = channels
        self._input_channels = channels
        self.layout = layout
        self.current = "input"
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array: np.ndarray, base: str = "w") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs=None, **attrs) -> str:
        out = self._name(op.lower())
        inputs = [self.current] if inputs is None else inputs
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        self.current = out
        return out

    def conv(self, out_channels, kernel, stride=1, pad=0, dilation=1, **attrs) -> str:
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        pads = pad if isinstance(pad, (list, tuple)) and len(pad) == 4 else pair(pad) * 2
        weight = self.rng.standard_normal((out_channels, self.channels, *kernel)) * 0.3
        bias = self.rng.standard_normal(out_channels) * 0.1
        inputs = [
            self.current,
            self.const(weight.astype(np.float32)),
            self.const(bias.astype(np.float32), "b"),
        ]
        self.channels = out_channels
        if "auto_pad" not in attrs:  # pads and auto_pad are exclusive in ONNX
            attrs["pads"] = list(pads)
        return self.node(
            "Conv", inputs, kernel_shape=list(kernel), strides=pair(stride),
            dilations=pair(dilation), **attrs,
        )  # fmt: skip

    def pool(self, op, kernel, stride, pad=0, **attrs) -> str:
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        return self.node(op, kernel_shape=pair(kernel), strides=pair(stride), pads=pair(pad) * 2, **attrs)  # fmt: skip

    def model(self, size, *, opset: int = 20, output_dims=None) -> onnx.ModelProto:
        size = (size, size) if isinstance(size, int) else tuple(size)
        dims = [1, "C", *size] if self.layout == "NCHW" else [1, *size, "C"]
        channels = self._input_channels
        dims = [channels if d == "C" else d for d in dims]
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
            [
                helper.make_tensor_value_info(
                    self.current, TensorProto.FLOAT, output_dims or ["n", "c", "h", "w"]
                )
            ],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ORT_IR_VERSION
        )
        onnx.checker.check_model(model)
        return model


# -- a tap-order evaluator: the same taps summed in the same order, whatever the dilation --


def _window_taps(x, kernel, strides, dilations, pads, fill):
    """Yield (tap index, strided view of x for that tap), in row-major tap order."""
    padded = np.pad(
        x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill
    )
    size = [
        (padded.shape[2 + a] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1
        for a in range(2)
    ]
    for ky in range(kernel[0]):
        for kx in range(kernel[1]):
            top, left = ky * dilations[0], kx * dilations[1]
            yield (
                (ky, kx),
                padded[
                    :,
                    :,
                    top : top + strides[0] * (size[0] - 1) + 1 : strides[0],
                    left : left + strides[1] * (size[1] - 1) + 1 : strides[1],
                ],
            )


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def tap_evaluate(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    """Evaluate a dense CNN graph in float64, summing every window's taps in one fixed order
    (channel, then kernel row, then kernel column). A dilated conv and the strided conv it
    replaces then do bit-identical arithmetic, so à trous vs shift-and-stitch can be compared
    with ``array_equal``. Supports Conv (group 1), Max/AveragePool, Relu, Add, Identity."""
    values = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    values[model.graph.input[0].name] = image.astype(np.float64)
    for node in model.graph.node:
        a, ins = _attrs(node), [values[n] for n in node.input if n]
        x = ins[0]
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):
            kernel = a.get("kernel_shape") or list(ins[1].shape[2:])
            strides, dilations = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
            pads = a.get("pads", [0, 0, 0, 0])
            assert a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and not a.get("ceil_mode")
            fill = -np.inf if node.op_type == "MaxPool" else 0.0
            taps = list(_window_taps(x, kernel, strides, dilations, pads, fill))
        if node.op_type == "Conv":
            assert a.get("group", 1) == 1
            weight = ins[1]
            out = np.zeros((x.shape[0], weight.shape[0], *taps[0][1].shape[2:]))
            for c in range(x.shape[1]):
                for (ky, kx), view in taps:
                    out += weight[None, :, c, ky, kx, None, None] * view[:, c : c + 1]
            if len(ins) > 2:
                out += ins[2][None, :, None, None]
        elif node.op_type == "MaxPool":
            out = taps[0][1]
            for _, view in taps[1:]:
                out = np.maximum(out, view)
        elif node.op_type == "AveragePool":
            assert not any(pads) or a.get("count_include_pad", 0)
            out = np.zeros_like(taps[0][1])
            for _, view in taps:
                out = out + view
            out = out / len(taps)
        elif node.op_type == "Relu":
            out = np.maximum(x, 0.0)
        elif node.op_type == "Add":
            out = ins[0] + ins[1]
        elif node.op_type == "Identity":
            out = x
        else:
            raise NotImplementedError(node.op_type)
        values[node.output[0]] = out
    return values[model.graph.output[0].name]


def keras_style_classifier(flatten_shape_known: bool = True):
    """NHWC input -> Transpose -> conv trunk -> Transpose(0,2,3,1) -> Reshape -> MatMul+Add."""
    g = GraphBuilder(3, layout="NHWC", seed=3)
    g.node("Transpose", perm=[0, 3, 1, 2])
    g.conv(4, 3)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(3, (2, 3))
    g.node("Transpose", perm=[0, 2, 3, 1])  # [1, 2, 3, 3] at window (9, 13)
    if flatten_shape_known:
        target = g.const(np.array([1, -1], dtype=np.int64), "shape")
    else:  # a target computed from the feature map's shape through Floor and Cast:
        # constant folding cannot (it reads the image), nor shape inference's data
        # propagation, nor the converter's shape folding (Shape/Gather/Concat/Cast...)
        features = g.current
        batch = g.node("Shape", [features])
        first = g.node("Slice", [batch, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])  # fmt: skip
        as_float = g.node("Cast", [first], to=onnx.TensorProto.FLOAT)
        floored = g.node("Floor", [as_float])
        as_int = g.node("Cast", [floored], to=onnx.TensorProto.INT64)
        rest = g.const(np.array([-1], dtype=np.int64), "shape")
        target = g.node("Concat", [as_int, rest], axis=0)
        g.current = features
    flat = g.node("Reshape", [g.current, target])
    hidden = g.node("MatMul", [flat, g.const(g.rng.standard_normal((18, 5)).astype(np.float32))])
    g.node("Add", [hidden, g.const(g.rng.standard_normal(5).astype(np.float32), "b")])
    g.node("Relu")
    scores = g.node(
        "MatMul", [g.current, g.const(g.rng.standard_normal((5, 4)).astype(np.float32))]
    )
    g.node("Add", [scores, g.const(g.rng.standard_normal((1, 4)).astype(np.float32), "b")])
    g.node("Softmax", axis=-1)
    return g.model((9, 13), output_dims=[1, 4])
