"""The converter tests' exactness checks: a converted classifier's dense map, in float64,
equals the crop-by-crop oracle (tests/support/oracle.py) on a random image, to rounding."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.from_torch.fc import fully_convolutional
from densemap.convert.geometry import compute_geometry
from densemap.convert.runtime import Float64Runner
from tests.support.oracle import (
    FP64_TOLERANCE,
    cell_counts,
    crop_by_crop,
    onnx_classifier,
    torch_classifier,
)


def assert_dense_equals_crops(model, *, window, stride, image_size, in_channels=3):
    """Torch path: ``fully_convolutional(model)`` on a batch of two images equals the model
    on every crop (float64, FP64_TOLERANCE); returns (dense module, its map)."""
    torch.manual_seed(0)
    model = model.double().eval()
    dense = fully_convolutional(model, input_size=window, in_channels=in_channels)
    image_nchw = torch.rand(2, in_channels, *image_size, dtype=torch.float64)
    expected = crop_by_crop(
        torch_classifier(model), image_nchw.numpy(), window=window, stride=stride, batched=True
    )
    with torch.no_grad():
        score_map = dense(image_nchw)
    n_h, n_w = expected.shape[2:]
    assert score_map.shape[2] >= n_h and score_map.shape[3] >= n_w
    diff = np.abs(score_map[:, :, :n_h, :n_w].numpy() - expected).max()
    assert diff <= FP64_TOLERANCE, diff
    return dense, score_map


def assert_onnx_dense_equals_crops(
    classifier: onnx.ModelProto, *, window, image_size, atol: float = FP64_TOLERANCE
) -> onnx.ModelProto:
    """ONNX path: rewrite ``classifier``'s FC head and check its float64 map against the
    classifier graph run crop by crop in float64; returns the dense graph."""
    dense = rewrite_fc_head(classifier)
    stride = compute_geometry(dense, window=window).stride
    image = np.random.default_rng(0).standard_normal((1, 3, *image_size))
    n = cell_counts(image_size, window, stride)
    expected = crop_by_crop(onnx_classifier(classifier), image, window=window, stride=stride)
    score_map = Float64Runner(dense)(image)[:, :, : n[0], : n[1]]
    np.testing.assert_allclose(score_map, expected, rtol=0, atol=atol)
    return dense
