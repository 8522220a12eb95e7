"""ONNX path on graphs as other (older) exporters write them: dense == crops in fp64.

Each case is a classifier we had not converted before; the reference is the classifier
graph itself run crop by crop in float64 (onnx.reference), independent of the rewrite.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.geometry import compute_geometry
from densemap.convert.runtime import Float64Runner
from tests.support.convert_onnx_support import GraphBuilder, dense64, ort32
from tests.support.oracle import cell_counts, crop_by_crop, onnx_classifier

EXACT = 1e-9  # fp64: the dense pass sums the same products in another order


def _assert_dense_equals_crops(classifier: onnx.ModelProto, window, channels: int = 3):
    dense = rewrite_fc_head(classifier)
    onnx.checker.check_model(dense, full_check=True)
    geometry = compute_geometry(dense, window=window)
    size = (window[0] + 3 * geometry.stride[0] + 1, window[1] + 2 * geometry.stride[1] + 3)
    image = np.random.default_rng(7).standard_normal((1, channels, *size))
    n = cell_counts(size, window, geometry.stride)
    expected = crop_by_crop(
        onnx_classifier(classifier), image, window=window, stride=geometry.stride, cells=n
    )[0]
    score_map = dense64(dense, image)
    np.testing.assert_allclose(score_map[0, :, : n[0], : n[1]], expected, rtol=0, atol=EXACT)
    return dense


class ViewBySize(nn.Module):
    """Old torchvision style ``x.view(x.size(0), -1)`` after a pooled trunk."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 5 * 4, 3)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("opset", [9, 11, 13])
def test_legacy_export_with_dynamic_batch_reads_the_order_through_shape_nodes(opset):
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape: onnx's data propagation does not
    # resolve it before opset 14, so the converter folds the shape computation itself
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ViewBySize().eval(), (torch.randn(1, 3, 12, 10),), buffer, dynamo=False,
            input_names=["input"], opset_version=opset, dynamic_axes={"input": {0: "batch"}},
        )  # fmt: skip
    classifier = onnx.load_from_string(buffer.getvalue())
    assert "Shape" in [node.op_type for node in classifier.graph.node]
    _assert_dense_equals_crops(classifier, (12, 10))


def _batchnorm_classifier(opset: int) -> onnx.ModelProto:
    """conv -> BatchNormalization -> relu -> pool -> conv -> Flatten -> Gemm -> BN -> Gemm, as
    tf2onnx (opset 13) or an unfolded legacy torch export writes it; window 12."""
    g = GraphBuilder(1, seed=2)
    rng = np.random.default_rng(3)

    def batch_norm(channels):
        stats = [rng.random(channels) + 0.5, rng.standard_normal(channels)]
        stats += [rng.standard_normal(channels), rng.random(channels) + 0.5]
        g.node("BatchNormalization", [g.current, *(g.const(s.astype(np.float32)) for s in stats)])

    g.conv(4, 3)
    batch_norm(4)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.conv(3, 3)
    g.node("Flatten", axis=1)
    weight = g.const(rng.standard_normal((5, 27)).astype(np.float32))
    g.node(
        "Gemm", [g.current, weight, g.const(rng.standard_normal(5).astype(np.float32))], transB=1
    )
    batch_norm(5)
    weight = g.const(rng.standard_normal((4, 5)).astype(np.float32))
    g.node("Gemm", [g.current, weight, g.const(np.zeros(4, np.float32))], transB=1)
    return g.model(12, opset=opset, output_dims=[1, 4])


@pytest.mark.parametrize("opset", [9, 13, 15])
def test_batchnorm_before_opset_14_verifies_in_float64(opset, tmp_path):
    # onnx.reference ran BatchNormalization-7/9 with batch statistics: --verify in float64
    # failed on correct dense models (and disagreed with onnxruntime)
    classifier = _batchnorm_classifier(opset)
    image = np.random.default_rng(1).standard_normal((1, 1, 12, 12))
    # the fp64 evaluator agrees with onnxruntime's inference BatchNorm (fp32 rounding, logits < 100)
    np.testing.assert_allclose(
        Float64Runner(classifier)(image), ort32(classifier, image), rtol=0, atol=1e-4
    )
    _assert_dense_equals_crops(classifier, (12, 12), channels=1)
    onnx.save_model(classifier, str(tmp_path / "bn.onnx"))
    convert.convert_onnx(tmp_path / "bn.onnx", tmp_path / "dense.onnx", preprocessing="unit")
    report = convert.verify(tmp_path / "bn.onnx", tmp_path / "dense.onnx", dtype="float64")
    assert report.passed, report.table()


def test_initializers_listed_as_graph_inputs_ir3(tmp_path):
    # old exporters (IR 3, opset <= 8) list every weight as a graph input: the dense model
    # failed onnx.checker ("conv weight in initializer but not in graph input")
    g = GraphBuilder(1, seed=4)
    g.conv(3, 3)
    g.node("Relu")
    g.pool("MaxPool", 2, 2)
    g.node("Flatten", axis=1)
    weight = g.const(np.random.default_rng(0).standard_normal((4, 3 * 5 * 4)).astype(np.float32))
    g.node("Gemm", [g.current, weight, g.const(np.zeros(4, np.float32))], transB=1)
    classifier = g.model((12, 10), opset=8, output_dims=[1, 4])
    classifier.ir_version = 3
    for init in classifier.graph.initializer:
        classifier.graph.input.append(
            onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    _assert_dense_equals_crops(classifier, (12, 10), channels=1)
    onnx.save_model(classifier, str(tmp_path / "old.onnx"))
    result = convert.convert_onnx(
        tmp_path / "old.onnx", tmp_path / "dense.onnx", strides=[1], preprocessing="unit"
    )
    for path in (result.path, *result.variant_paths):
        assert [value.name for value in onnx.load(str(path)).graph.input] == ["input"]
    report = convert.verify(tmp_path / "old.onnx", result.path, dtype="float64")
    assert report.passed, report.table()


class ZeroBiasVgg(nn.Module):
    """VGG's initialisation in miniature: every bias zero, so the legacy exporter keeps one
    zero bias per shape and reads the others through Identity nodes (conv and FC alike)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(4 * 4 * 3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_legacy_exporter_deduplicated_initializers_through_identity(tmp_path):
    # VGG-11/16 exported with dynamo=False were refused with "non-constant weights": the
    # second FC's bias is an Identity of the first's
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ZeroBiasVgg().eval(), (torch.randn(1, 3, 13, 11),), buffer, dynamo=False,
            input_names=["input"], dynamic_axes={"input": {0: "batch"}},
        )  # fmt: skip
    classifier = onnx.load_from_string(buffer.getvalue())
    identities = [n for n in classifier.graph.node if n.op_type == "Identity"]
    assert len(identities) >= 2, [n.op_type for n in classifier.graph.node]
    _assert_dense_equals_crops(classifier, (13, 11))
    onnx.save_model(classifier, str(tmp_path / "vgg.onnx"))
    result = convert.convert_onnx(
        tmp_path / "vgg.onnx", tmp_path / "dense.onnx", strides=[1], preprocessing="unit"
    )
    report = convert.verify(tmp_path / "vgg.onnx", result.path, dtype="float64")
    assert report.passed, report.table()
