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
from convert_onnx_support import cells, dense64, onnx_crops64
from torch import nn

from convert.geometry import compute_geometry
from convert.onnx_head import rewrite_head

EXACT = 1e-9  # fp64: the dense pass sums the same products in another order


def _assert_dense_equals_crops(classifier: onnx.ModelProto, window, channels: int = 3):
    dense = rewrite_head(classifier)
    onnx.checker.check_model(dense, full_check=True)
    geometry = compute_geometry(dense, window=window)
    size = (window[0] + 3 * geometry.stride[0] + 1, window[1] + 2 * geometry.stride[1] + 3)
    image = np.random.default_rng(7).standard_normal((1, channels, *size))
    n = cells(size, window, geometry.stride)
    expected = onnx_crops64(classifier, image, window=window, stride=geometry.stride, cells=n)
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
