"""The small ONNX graphs the engine composes around a model, run where the model runs.

- :func:`preprocess_graph`: pixels (uint8 HxWxC, or preprocessed float32 CxHxW) and a region
  -> the net's input batch. uint8 ``(pixel*scale - mean)/std`` is computed in float32 with
  the same operations in the same order as :func:`densemap.service.engine.image_input.preprocess`,
  so the dense pass sees bit-identical inputs on every device.
- :func:`postprocess_graph`: the net's raw output [1, C, h, w] and the cells to keep ->
  what the caller asked for: the map (softmax over the class axis, class subset, float16),
  per-cell top-k and argmax, the per-class sum of cell probabilities (float64, for image
  scores) and a count of non-finite raw values.
- :func:`head_graph`: an extra head's raw output [1, C, h, w] and the same cells -> its map
  in the requested dtype and its count of non-finite values (never softmaxed).

All three are plain ONNX (opset 17), so the CPU and CUDA execution providers run the same graphs;
only the requested outputs are built (onnxruntime runs every node of a graph) and copied back
to the host. Rules for ties: top-k and argmax rank equal values by class index, lowest first
(ONNX TopK / ArgMax semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from densemap.service.contract import Preprocessing

OPSET = 17
IR_VERSION = 8
FLOAT, FLOAT16, DOUBLE, INT64, UINT8 = (
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.INT64,
    TensorProto.UINT8,
)
ELEMENT_TYPES = {"float32": FLOAT, "float16": FLOAT16}

# names of the graphs' inputs and outputs
PIXELS, STARTS, ENDS, IMAGE = "pixels", "starts", "ends", "image"
RAW, K, CLASSES = "raw", "k", "classes"
DETECT_CLASSES, THRESHOLD, ABOVE_CELLS, ABOVE_SCORES = (
    "detect_classes",
    "threshold",
    "above_cells",
    "above_scores",
)
HEAD_MAP = "head_map"
MAP, TOP_VALUES, TOP_INDICES, ARGMAX, PROB_SUM, NONFINITE = (
    "map",
    "top_values",
    "top_indices",
    "argmax",
    "probability_sum",
    "nonfinite",
)


def _model(nodes, name, inputs, outputs, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, values, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def preprocess_graph(
    preprocessing: Preprocessing, *, source: str, layout: str, dtype: str = "float32"
) -> bytes:
    """``pixels`` + region ``starts``/``ends`` (rows, cols) -> ``image`` [1, C, h, w] (or NHWC).

    ``source`` is "uint8" (HxWxC, normalised here) or "float32" (CxHxW, used as it is).
    ``dtype`` is the element type the net takes ("float16" for a half-precision net).
    """
    nodes, consts = [], [_const("axes_batch", [0], np.int64)]
    if source == "uint8":
        # Lay out the uint8 pixels first (a quarter of float32's bytes to move: faster,
        # docs/engine.md "Measurements behind the code"), then normalise per channel;
        # elementwise, so bit-identical.
        channels_first = layout == "NCHW"
        shape = (-1, 1, 1) if channels_first else (-1,)
        pixel_type, spatial = UINT8, ["H", "W", preprocessing.channels]
        consts += [
            _const("axes_region", [0, 1], np.int64),
            _const("scale", preprocessing.scale, np.float32),
            _const("mean", np.reshape(preprocessing.mean, shape), np.float32),
            _const("std", np.reshape(preprocessing.std, shape), np.float32),
        ]
        nodes.append(helper.make_node("Slice", [PIXELS, STARTS, ENDS, "axes_region"], ["region"]))
        if channels_first:
            nodes.append(helper.make_node("Transpose", ["region"], ["laid"], perm=[2, 0, 1]))
        nodes += [
            helper.make_node(
                "Cast", ["laid" if channels_first else "region"], ["pixels_f"], to=FLOAT
            ),
            helper.make_node("Mul", ["pixels_f", "scale"], ["scaled"]),
            helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["normalised"]),
        ]
        to_layout = None
        last = "normalised"
    elif source == "float32":
        pixel_type, spatial = FLOAT, [preprocessing.channels, "H", "W"]
        consts.append(_const("axes_region", [1, 2], np.int64))
        nodes.append(helper.make_node("Slice", [PIXELS, STARTS, ENDS, "axes_region"], ["chw"]))
        to_layout = [1, 2, 0] if layout == "NHWC" else None
        last = "chw"
    else:
        raise ValueError(f"source must be 'uint8' or 'float32', got {source!r}")
    if to_layout is not None:
        nodes.append(helper.make_node("Transpose", [last], ["laid_out"], perm=to_layout))
        last = "laid_out"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", [last], ["cast"], to=ELEMENT_TYPES[dtype]))
        last = "cast"
    nodes.append(helper.make_node("Unsqueeze", [last, "axes_batch"], [IMAGE]))
    inputs = [
        helper.make_tensor_value_info(PIXELS, pixel_type, spatial),
        helper.make_tensor_value_info(STARTS, INT64, [2]),
        helper.make_tensor_value_info(ENDS, INT64, [2]),
    ]
    outputs = [helper.make_tensor_value_info(IMAGE, ELEMENT_TYPES[dtype], ["N", "d1", "d2", "d3"])]
    return _model(nodes, "densemap_preprocess", inputs, outputs, consts)


@dataclass(frozen=True)
class PostprocessSpec:
    """The structure of one postprocess graph (K and the class list are runtime inputs)."""

    raw_dtype: str = "float32"  # the net's output element type
    model_gives_probabilities: bool = False
    return_probabilities: bool = True
    select_classes: bool = False
    out_dtype: str = "float32"  # element type of the returned map and top-k values
    detect: bool = False  # also the cells whose probability of a detection class >= threshold
    include_map: bool = False  # the outputs the request returns (none by default: sums only)
    top_k: bool = False
    argmax: bool = False


def postprocess_graph(spec: PostprocessSpec) -> bytes:
    """``raw`` [1, C, h, w] + cells ``starts``/``ends`` -> map, top-k, argmax, sums, check."""
    consts = [
        _const("axes_cells", [2, 3], np.int64),
        _const("axes_batch", [0], np.int64),
        _const("axes_class", [0], np.int64),
        _const("axes_space", [1, 2], np.int64),
    ]
    nodes = [
        helper.make_node("Slice", [RAW, STARTS, ENDS, "axes_cells"], ["cropped"]),
        helper.make_node("Squeeze", ["cropped", "axes_batch"], ["cells_any"]),
    ]
    if spec.raw_dtype == "float32":
        nodes.append(helper.make_node("Identity", ["cells_any"], ["cells"]))
    else:
        nodes.append(helper.make_node("Cast", ["cells_any"], ["cells"], to=FLOAT))
    nodes += [
        helper.make_node("IsNaN", ["cells"], ["is_nan"]),
        helper.make_node("IsInf", ["cells"], ["is_inf"]),
        helper.make_node("Or", ["is_nan", "is_inf"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad_f"], to=FLOAT),
        helper.make_node("ReduceSum", ["bad_f"], [NONFINITE], keepdims=0),
    ]
    if spec.model_gives_probabilities:
        nodes.append(helper.make_node("Identity", ["cells"], ["probabilities"]))
    else:  # softmax over the class axis, as postprocess.softmax: shift, exp, normalise
        nodes += [
            helper.make_node("ReduceMax", ["cells"], ["peak"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["cells", "peak"], ["shifted"]),
            helper.make_node("Exp", ["shifted"], ["exp"]),
            helper.make_node("ReduceSum", ["exp", "axes_class"], ["total"], keepdims=1),
            helper.make_node("Div", ["exp", "total"], ["probabilities"]),
        ]
    nodes += [
        helper.make_node("Cast", ["probabilities"], ["probabilities_f64"], to=DOUBLE),
        helper.make_node("ReduceSum", ["probabilities_f64", "axes_space"], [PROB_SUM], keepdims=0),
    ]
    detect_outputs = []
    if spec.detect:  # sparse: only the cells above the threshold leave the device
        nodes += [
            helper.make_node("Gather", ["probabilities", DETECT_CLASSES], ["detected"], axis=0),
            helper.make_node("GreaterOrEqual", ["detected", THRESHOLD], ["above"]),
            helper.make_node("NonZero", ["above"], [ABOVE_CELLS]),
            helper.make_node("Transpose", [ABOVE_CELLS], ["above_t"], perm=[1, 0]),
            helper.make_node("GatherND", ["detected", "above_t"], [ABOVE_SCORES]),
        ]
        detect_outputs = [
            helper.make_tensor_value_info(ABOVE_CELLS, INT64, [3, "found"]),
            helper.make_tensor_value_info(ABOVE_SCORES, FLOAT, ["found"]),
        ]
    values = "probabilities" if spec.return_probabilities else "cells"
    inputs = [
        helper.make_tensor_value_info(RAW, ELEMENT_TYPES[spec.raw_dtype], [1, "C", "h", "w"]),
        helper.make_tensor_value_info(STARTS, INT64, [2]),
        helper.make_tensor_value_info(ENDS, INT64, [2]),
    ]
    outputs = [
        helper.make_tensor_value_info(PROB_SUM, DOUBLE, ["C"]),
        helper.make_tensor_value_info(NONFINITE, FLOAT, []),
        *detect_outputs,
    ]
    if spec.detect:
        inputs += [
            helper.make_tensor_value_info(DETECT_CLASSES, INT64, ["detect"]),
            helper.make_tensor_value_info(THRESHOLD, FLOAT, [1]),
        ]
    if spec.select_classes:
        inputs.append(helper.make_tensor_value_info(CLASSES, INT64, ["selected"]))
    if not (spec.include_map or spec.top_k or spec.argmax):
        return _model(nodes, "densemap_postprocess", inputs, outputs, consts)
    # onnxruntime runs every node, requested or not: build only what the request returns
    if spec.select_classes:
        nodes.append(helper.make_node("Gather", [values, CLASSES], ["selected"], axis=0))
        values = "selected"
    out_type = ELEMENT_TYPES[spec.out_dtype]
    if spec.out_dtype == "float16":  # rank the float16 values, as the caller receives them
        nodes += [
            helper.make_node("Cast", [values], [MAP], to=FLOAT16),
            helper.make_node("Cast", [MAP], ["ranked"], to=FLOAT),
        ]
    else:
        nodes += [
            helper.make_node("Identity", [values], [MAP]),
            helper.make_node("Identity", [values], ["ranked"]),
        ]
    if spec.include_map:
        outputs.append(helper.make_tensor_value_info(MAP, out_type, ["c", "n_h", "n_w"]))
    indices = []
    if spec.top_k:
        inputs.append(helper.make_tensor_value_info(K, INT64, [1]))
        nodes.append(
            helper.make_node("TopK", ["ranked", K], ["top_f", "top_i"], axis=0, largest=1, sorted=1)
        )
        cast = "Cast" if spec.out_dtype == "float16" else "Identity"
        extra = {"to": FLOAT16} if spec.out_dtype == "float16" else {}
        nodes.append(helper.make_node(cast, ["top_f"], [TOP_VALUES], **extra))
        indices.append(("top_i", TOP_INDICES))
        outputs += [
            helper.make_tensor_value_info(TOP_VALUES, out_type, ["k", "n_h", "n_w"]),
            helper.make_tensor_value_info(TOP_INDICES, TensorProto.INT32, ["k", "n_h", "n_w"]),
        ]
    if spec.argmax:
        nodes.append(helper.make_node("ArgMax", ["ranked"], ["best"], axis=0, keepdims=0))
        indices.append(("best", ARGMAX))
        outputs.append(helper.make_tensor_value_info(ARGMAX, TensorProto.INT32, ["n_h", "n_w"]))
    for source, target in indices:
        if spec.select_classes:  # report the ORIGINAL class index of each selected channel
            nodes.append(helper.make_node("Gather", [CLASSES, source], [f"{target}_64"], axis=0))
            source = f"{target}_64"
        nodes.append(helper.make_node("Cast", [source], [target], to=TensorProto.INT32))
    return _model(nodes, "densemap_postprocess", inputs, outputs, consts)


@dataclass(frozen=True)
class HeadSpec:
    """The structure of one extra head's graph: element types in and out."""

    raw_dtype: str = "float32"  # the net's output element type
    out_dtype: str = "float32"  # element type of the returned map


def head_graph(spec: HeadSpec) -> bytes:
    """``raw`` [1, C, h, w] + cells ``starts``/``ends`` -> ``head_map`` [C, n_h, n_w] (the
    model's own values in ``out_dtype``) and ``nonfinite`` (NaN/Inf count)."""
    consts = [_const("axes_cells", [2, 3], np.int64), _const("axes_batch", [0], np.int64)]
    nodes = [
        helper.make_node("Slice", [RAW, STARTS, ENDS, "axes_cells"], ["cropped"]),
        helper.make_node("Squeeze", ["cropped", "axes_batch"], ["cells"]),
    ]
    checked = "cells"
    if spec.raw_dtype != "float32":  # IsInf has float32 kernels on every provider
        nodes.append(helper.make_node("Cast", ["cells"], ["cells_f"], to=FLOAT))
        checked = "cells_f"
    nodes += [
        helper.make_node("IsNaN", [checked], ["is_nan"]),
        helper.make_node("IsInf", [checked], ["is_inf"]),
        helper.make_node("Or", ["is_nan", "is_inf"], ["bad"]),
        helper.make_node("Cast", ["bad"], ["bad_f"], to=FLOAT),
        helper.make_node("ReduceSum", ["bad_f"], [NONFINITE], keepdims=0),
    ]
    if spec.raw_dtype == spec.out_dtype:
        nodes.append(helper.make_node("Identity", ["cells"], [HEAD_MAP]))
    else:
        nodes.append(
            helper.make_node("Cast", ["cells"], [HEAD_MAP], to=ELEMENT_TYPES[spec.out_dtype])
        )
    inputs = [
        helper.make_tensor_value_info(RAW, ELEMENT_TYPES[spec.raw_dtype], [1, "C", "h", "w"]),
        helper.make_tensor_value_info(STARTS, INT64, [2]),
        helper.make_tensor_value_info(ENDS, INT64, [2]),
    ]
    outputs = [
        helper.make_tensor_value_info(HEAD_MAP, ELEMENT_TYPES[spec.out_dtype], ["C", "n_h", "n_w"]),
        helper.make_tensor_value_info(NONFINITE, FLOAT, []),
    ]
    return _model(nodes, "densemap_head", inputs, outputs, consts)
