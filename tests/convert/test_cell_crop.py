"""The written dense ONNX stands alone: plain onnxruntime gives exactly n cells per axis.

n = (W - R) // T + 1 at the file's output stride T (the native S, or a variant's). Ceil-mode
pools make the dense trunk return a partial extra cell whose window reads past the image;
the crop in the graph (Shape -> arithmetic -> Slice) removes it for any H, W. Values are
checked against crop-by-crop evaluation of the classifier in float64 torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert.cell_crop import crop_to_cells
from tests.convert.test_atrous_ceil import POOLS, CeilOverhang
from tests.convert.test_atrous_ceil import WINDOW as OVERHANG_WINDOW
from tests.support.convert_onnx_support import export_classifier
from tests.support.oracle import cell_counts, crop_by_crop, torch_classifier

WINDOW = (14, 18)  # 14 -> conv 12 -> pool 6 -> conv 4 -> pool 2: no overhang at R (unpadded)
STRIDE = (4, 4)
SIZES = [(15, 19), (17, 23), (21, 25), (29, 33), (30, 21), (14, 18)]


def ceil_net() -> nn.Module:
    """Ceil-mode pools that are exact at R but add a partial cell on other sizes."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 5, 3), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(5 * 2 * 3, 6), nn.ReLU(), nn.Linear(6, 3),
    ).eval()  # fmt: skip


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, image: np.ndarray) -> np.ndarray:
    (scores,) = session.run(None, {session.get_inputs()[0].name: image.astype(np.float32)})
    return scores


def _convert(path_kind: str, model: nn.Module, window, out) -> convert.ConversionResult:
    if path_kind == "torch":
        return convert.convert_torch(
            model, out, input_size=window, strides=[2, 1], preprocessing="unit"
        )
    classifier = out.with_name("classifier.onnx")
    if path_kind == "onnx-opset9":  # moved to opset 10 for Slice; ceil pools are end pads
        proto = export_classifier(model, window, dynamo=False, opset=9)
        onnx.save_model(proto, str(classifier))
        return convert.convert_onnx(classifier, out, preprocessing="unit")
    onnx.save_model(export_classifier(model, window, dynamo=False), str(classifier))
    return convert.convert_onnx(classifier, out, strides=[2, 1], preprocessing="unit")


@pytest.mark.slow
@pytest.mark.parametrize("path_kind", ["torch", "onnx", "onnx-opset9"])
def test_plain_onnxruntime_gives_exactly_n_cells_equal_to_crops(path_kind, tmp_path):
    model = ceil_net()
    result = _convert(path_kind, model, WINDOW, tmp_path / "d.onnx")
    assert result.metadata.geometry.padded == (path_kind == "onnx-opset9")
    assert result.metadata.geometry.stride == STRIDE
    assert len(result.variant_paths) == (0 if path_kind == "onnx-opset9" else 2)
    uncropped = convert.fully_convolutional(model, input_size=WINDOW)
    files = [(result.path, STRIDE)] + [
        (path, v.stride)
        for path, v in zip(result.variant_paths, result.metadata.variants, strict=True)
    ]
    extra_seen = False
    rng = np.random.default_rng(0)
    for path, stride in files:
        session = _session(path)
        assert [d for d in session.get_outputs()[0].shape[2:]] == ["cells_h", "cells_w"]
        for size in SIZES:
            image = rng.standard_normal((1, 3, *size))
            n = cell_counts(size, WINDOW, stride)
            scores = _run(session, image)
            assert scores.shape == (1, 3, *n), (path.name, size)
            expected = crop_by_crop(
                torch_classifier(model), image, window=WINDOW, stride=stride, cells=n
            )[0]
            np.testing.assert_allclose(scores[0], expected, rtol=0, atol=1e-5)
            if stride == STRIDE:
                with torch.no_grad():
                    trunk = uncropped(torch.from_numpy(image).float()).shape[2:]
                extra_seen |= tuple(trunk) != n
    assert extra_seen  # without the crop, the trunk returns partial cells on these sizes


@pytest.mark.slow
def test_an_image_between_r_minus_s_and_r_has_no_cell(tmp_path):
    result = convert.convert_torch(
        ceil_net(), tmp_path / "d.onnx", input_size=WINDOW, preprocessing="unit"
    )
    image = np.zeros((1, 3, WINDOW[0] - 1, WINDOW[1] - 3), np.float32)  # the trunk gives 1x1
    assert _run(_session(result.path), image).shape == (1, 3, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("path_kind", ["torch", "onnx"])
def test_overhanging_ceil_pool_is_cropped_on_every_file(path_kind, tmp_path):
    """Caffe-style: the last pooling window of R overhangs (a padded net); every file,
    variants included, returns exactly n cells, the first n of the uncropped dense map."""
    model = CeilOverhang(POOLS["max"]()).eval()
    result = _convert(path_kind, model, OVERHANG_WINDOW, tmp_path / "d.onnx")
    assert result.metadata.geometry.padded
    module = convert.fully_convolutional(model, input_size=OVERHANG_WINDOW).double()
    rng = np.random.default_rng(1)
    for path in (result.path, *result.variant_paths):
        stride = convert.pipeline.read_metadata(path).geometry.stride
        session = _session(path)
        for size in [(16, 15), (19, 22), (27, 18), (33, 31)]:
            image = rng.standard_normal((1, 3, *size))
            n = cell_counts(size, OVERHANG_WINDOW, stride)
            scores = _run(session, image)
            assert scores.shape == (1, 3, *n), (path.name, size)
            if stride == result.metadata.geometry.stride:
                with torch.no_grad():
                    full = module(torch.from_numpy(image)).numpy()
                assert full.shape[2:] != n or size == (16, 15)
                np.testing.assert_allclose(scores, full[:, :, : n[0], : n[1]], atol=1e-5)


def test_every_map_output_is_cropped_and_others_are_left_alone():
    """One Slice per rank-4 output (each output is one head), from one cell computation."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node(
                "MaxPool", ["x"], ["a"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1
            ),  # fmt: skip
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("ReduceMean", ["a"], ["c"], keepdims=0),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 1, "h", "w"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 1, "h", "w"]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    cropped = crop_to_cells(model, window=(2, 2), stride=(2, 2), layout="NCHW")
    onnx.checker.check_model(cropped)
    assert sum(node.op_type == "Slice" for node in cropped.graph.node) == 2
    session = ort.InferenceSession(cropped.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.arange(7 * 9, dtype=np.float32).reshape(1, 1, 7, 9)
    a, b, c = session.run(None, {"x": image})
    assert a.shape == b.shape == (1, 1, 3, 4)  # ceil pooling alone gives 4 x 5
    np.testing.assert_array_equal(b, np.maximum(a, 0))
    assert c.shape == ()  # not a map: untouched
