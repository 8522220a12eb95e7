"""ONNX path: dense model == crop-by-crop classifier, exactly (fp64), for unpadded nets.

Classifiers are tiny torch nets exported by both torch exporters (legacy: Flatten->Gemm;
dynamo: Reshape->Gemm), plus a hand-built Keras-style NHWC graph. The dense model runs in
float64 through onnx.reference (onnxruntime has no double Conv); crops run in float64
torch, or through the classifier graph itself.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.geometry import compute_geometry
from tests.support.convert_onnx_support import (
    BOTH_EXPORTERS,
    GraphBuilder,
    dense64,
    export_classifier,
    keras_style_classifier,
    ort32,
)
from tests.support.oracle import cell_counts, crop_by_crop, onnx_classifier, torch_classifier

EXACT = 1e-9  # fp64: the dense pass sums the same products in another order


class Plain(nn.Module):
    """conv/pool trunk, Flatten, Linear-ReLU-Dropout-Linear; window (19, 23), stride 4."""

    window = (19, 23)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(4 * 3 * 4, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class StridedOverlap(nn.Module):
    """AlexNet-like: conv 5/2, overlapping max pools 3/2; the trunk ignores R's last pixels."""

    window = (39, 39)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(4, 4, 3),
            nn.ReLU(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(4 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class HwcFlatten(Plain):
    """Keras/TF order: the trunk output is permuted to N,H,W,C before the flatten."""

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x).permute(0, 2, 3, 1), 1))


class GapHead(nn.Module):
    """ResNet-style: strided conv trunk with BatchNorm, global average pool, one Linear."""

    window = (14, 18)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
            nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MeanSoftmaxHead(GapHead):
    def forward(self, x):
        return torch.softmax(self.fc(self.features(x).mean(dim=(2, 3))), dim=1)


class MaxHead(GapHead):
    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_max_pool2d(self.features(x), 1), 1))


def _seeded(cls):
    torch.manual_seed(0)
    model = cls().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def _assert_dense_equals_crops(model, dense, sizes, classifier=None):
    """Dense map == every crop through the classifier: its ONNX graph (fp64) if given, so
    an exporter's float32 BatchNorm folding is common to both sides, else the torch model."""
    geometry = compute_geometry(dense, window=model.window)
    rng = np.random.default_rng(1)
    for size in sizes:
        image = rng.standard_normal((1, 3, *size))
        n = cell_counts(size, model.window, geometry.stride)
        score_map = dense64(dense, image)
        assert score_map.shape[2] >= n[0] and score_map.shape[3] >= n[1]
        if classifier is None:
            expected = crop_by_crop(
                torch_classifier(model), image, window=model.window, stride=geometry.stride, cells=n
            )[0]
        else:
            expected = crop_by_crop(
                onnx_classifier(classifier),
                image,
                window=model.window,
                stride=geometry.stride,
                cells=n,
            )[0]
        np.testing.assert_allclose(score_map[0, :, : n[0], : n[1]], expected, rtol=0, atol=EXACT)
    return geometry


@pytest.mark.parametrize("dynamo", BOTH_EXPORTERS)
@pytest.mark.parametrize(
    "cls", [Plain, StridedOverlap, HwcFlatten, GapHead, MeanSoftmaxHead, MaxHead]
)
def test_dense_equals_crops_fp64(cls, dynamo):
    model = _seeded(cls)
    classifier = export_classifier(model, model.window, dynamo=dynamo)
    dense = rewrite_fc_head(classifier)
    onnx.checker.check_model(dense, full_check=True)
    ops = [node.op_type for node in dense.graph.node]
    assert not {"Gemm", "MatMul", "Flatten", "Reshape", "GlobalAveragePool"} & set(ops)
    r_h, r_w = model.window
    # sizes that are not R + a multiple of S, non-square
    sizes = [(r_h + 9, r_w + 2), (r_h + 3, r_w + 14)]
    geometry = _assert_dense_equals_crops(model, dense, sizes, classifier)
    # the torch model itself, in fp32 through onnxruntime: same scores up to fp32 rounding
    image = np.random.default_rng(4).standard_normal((1, 3, *sizes[0])).astype(np.float32)
    n = cell_counts(sizes[0], model.window, geometry.stride)
    expected = crop_by_crop(
        torch_classifier(model),
        image.astype(np.float64),
        window=model.window,
        stride=geometry.stride,
        cells=n,
    )[0]
    np.testing.assert_allclose(ort32(dense, image)[0, :, : n[0], : n[1]], expected, atol=1e-5)
    assert not geometry.padded
    image = dense.graph.input[0]
    assert image.name == "input"
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]


def test_strided_trunk_returns_extra_cells_that_the_crop_rule_drops():
    model = _seeded(StridedOverlap)
    dense = rewrite_fc_head(export_classifier(model, model.window, dynamo=False))
    geometry = compute_geometry(dense, window=model.window)
    assert geometry.effective_window == (33, 33)  # 5, +2*2 = 9, +2*4 = 17, +2*4 = 25, +8 = 33
    size = (39 + 8 * 2 + 6, 39 + 6)
    n = cell_counts(size, model.window, geometry.stride)
    raw = ort32(dense, np.zeros((1, 3, *size), np.float32))
    assert raw.shape[2:] == (n[0] + 1, n[1] + 1)


@pytest.mark.slow
def test_softmax_head_runs_over_classes():
    model = _seeded(MeanSoftmaxHead)
    dense = rewrite_fc_head(export_classifier(model, model.window, dynamo=True))
    score_map = ort32(dense, np.random.default_rng(0).standard_normal((1, 3, 30, 31)))
    np.testing.assert_allclose(score_map.sum(axis=1), 1.0, atol=1e-5)
    softmax = [n for n in dense.graph.node if n.op_type == "Softmax"]
    assert [a.i for a in softmax[0].attribute if a.name == "axis"] == [1]


def test_softmax_before_opset_13_is_wrapped_in_transposes():
    model = _seeded(MeanSoftmaxHead)
    classifier = export_classifier(model, model.window, dynamo=False, opset=11)
    dense = rewrite_fc_head(classifier)
    _assert_dense_equals_crops(model, dense, [(20, 25)], classifier)


def _assert_nhwc_dense_equals_classifier(classifier, dense):
    window, image = (9, 13), np.random.default_rng(2).standard_normal((1, 23, 20, 3))
    n = cell_counts(image.shape[1:3], window, (2, 2))
    score_map = dense64(dense, image)
    expected = crop_by_crop(
        onnx_classifier(classifier), image, window=window, stride=(2, 2), channels_last=True
    )
    np.testing.assert_allclose(score_map[:, :, : n[0], : n[1]], expected, rtol=0, atol=EXACT)
    return score_map


def test_keras_style_nhwc_graph_with_hwc_flatten():
    classifier = keras_style_classifier()
    dense = rewrite_fc_head(classifier)
    dims = [d.dim_param or d.dim_value for d in dense.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", "H", "W", 3]  # the input keeps its NHWC layout
    _assert_nhwc_dense_equals_classifier(classifier, dense)


def test_undetectable_flatten_order_asks_for_the_flag_and_obeys_it():
    classifier = keras_style_classifier(flatten_shape_known=False)
    with pytest.raises(Exception, match="--flatten-order chw\\|hwc"):
        rewrite_fc_head(classifier)
    dense = rewrite_fc_head(classifier, flatten_order="hwc")
    _assert_nhwc_dense_equals_classifier(classifier, dense)
    wrong = rewrite_fc_head(classifier, flatten_order="chw")  # the pitfall: silently wrong
    with pytest.raises(AssertionError):
        _assert_nhwc_dense_equals_classifier(classifier, wrong)


def test_flatten_order_contradicting_the_graph_is_refused():
    model = _seeded(HwcFlatten)
    classifier = export_classifier(model, model.window, dynamo=False)
    with pytest.raises(Exception, match="another order"):
        rewrite_fc_head(classifier, flatten_order="chw")
    rewrite_fc_head(classifier, flatten_order="hwc")  # agrees with the graph


@pytest.mark.slow
def test_resnet18_onnx_path_matches_the_converted_torch_module():
    """Issue 7: a torchvision-layout ResNet-18 (padded, BatchNorm folded by the legacy
    exporter, GAP head) through the ONNX path equals the converted torch module in fp32;
    its à-trous variant equals the dense map on its even cells (README, Exactness: padded nets)."""
    from densemap.convert import archs, fully_convolutional
    from densemap.convert.atrous import make_atrous

    torch.manual_seed(0)
    model = archs.build("resnet18", num_classes=5).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2)
    dense = rewrite_fc_head(export_classifier(model, 64, dynamo=False))
    geometry = compute_geometry(dense, window=(64, 64))
    assert geometry.stride == (32, 32) and geometry.padded
    image = np.random.default_rng(0).standard_normal((1, 3, 64 + 32 + 5, 64 + 64 + 3))
    with torch.no_grad():
        expected = fully_convolutional(model, input_size=64)(torch.from_numpy(image).float())
    score_map = ort32(dense, image)
    # fp32: BatchNorm folded into conv weights in float32 and another conv algorithm
    np.testing.assert_allclose(score_map, expected.numpy(), rtol=0, atol=2e-4)
    n = cell_counts(image.shape[2:], (64, 64), (32, 32))
    fine = ort32(make_atrous(dense, factor=2), image)[:, :, ::2, ::2]
    np.testing.assert_allclose(
        fine[:, :, : n[0], : n[1]], score_map[:, :, : n[0], : n[1]], rtol=0, atol=2e-4
    )


def test_gemm_without_transpose_alpha_beta_and_constant_nodes():
    """Gemm(transB=0, alpha, beta) with its weight in a Constant node, a LeakyRelu, a
    Dropout and a per-class Mul between FC layers: the dense map equals the classifier."""
    g = GraphBuilder(2, seed=7)
    g.conv(3, 3)
    g.pool("AveragePool", 2, 2)
    flat = g.node("Flatten")
    weight = g.rng.standard_normal((3 * 2 * 2, 4)).astype(np.float32)  # (features, out)
    g.nodes.append(
        onnx.helper.make_node(
            "Constant", [], ["fc1_w"], value=onnx.numpy_helper.from_array(weight, "fc1_w")
        )
    )
    bias = g.const(g.rng.standard_normal((1, 4)).astype(np.float32), "b")
    g.node("Gemm", [flat, "fc1_w", bias], transB=0, alpha=0.5, beta=2.0)
    g.node("LeakyRelu", alpha=0.1)
    g.node("Dropout")
    g.node("Mul", [g.current, g.const(np.array([1.0, -2.0, 3.0, 0.5], np.float32), "scale")])
    second = g.rng.standard_normal((3, 4)).astype(np.float32)
    g.node("Gemm", [g.current, g.const(second), g.const(np.float32([0.1, 0.2, 0.3]), "b")], transB=1)  # fmt: skip
    classifier = g.model(6, output_dims=[1, 3])
    dense = rewrite_fc_head(classifier)
    image = np.random.default_rng(1).standard_normal((1, 2, 13, 10))
    score_map = dense64(dense, image)
    expected = crop_by_crop(
        onnx_classifier(classifier), image, window=(6, 6), stride=(2, 2), cells=(4, 3)
    )[0]
    np.testing.assert_allclose(score_map[0, :, :4, :3], expected, rtol=0, atol=EXACT)


def test_same_auto_pad_with_stride_is_frozen_at_the_window_size():
    g = GraphBuilder(3, seed=2)
    g.conv(2, 3, stride=2, auto_pad="SAME_UPPER", pad=0)  # at R = 8: 4 outputs, pads 0 / 1
    flat = g.node("Flatten")
    g.node("Gemm", [flat, g.const(g.rng.standard_normal((3, 32)).astype(np.float32))], transB=1)
    classifier = g.model(8, output_dims=[1, 3])
    dense = rewrite_fc_head(classifier)
    conv = dense.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["pads"] == [0, 0, 1, 1] and attrs["auto_pad"] == b"NOTSET"
    assert compute_geometry(dense, window=8).padded
    image = np.random.default_rng(0).standard_normal((1, 3, 8, 8))
    np.testing.assert_allclose(dense64(dense, image)[0, :, 0, 0], dense64(classifier, image)[0], atol=EXACT)  # fmt: skip
