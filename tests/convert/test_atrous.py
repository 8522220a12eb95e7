"""À-trous variants == k x k shift-and-stitch of the dense model, bit for bit (unpadded).

Bit for bit means: every output reads exactly the pixels and weights the strided net read.
``tap_evaluate`` (tests/support/convert_onnx_support.py) sums every window's taps in one fixed
order, so it checks exactly that with ``array_equal``. onnxruntime and onnx.reference may
pick another conv algorithm for a dilated conv (another summation order: 1-ulp
differences were measured with onnx.reference), so they are held to rounding tolerances:
fp32 1e-5 x max(1, |score|), fp64 1e-12 x the same.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from densemap.convert.atrous import make_atrous, supported_strides
from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.from_onnx.graph import opset_version
from densemap.convert.geometry import compute_geometry
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import (
    GraphBuilder,
    dense64,
    export_classifier,
    ort32,
    shift_and_stitch,
    tap_evaluate,
)


class FcNet(nn.Module):
    """conv, overlapping pool 3/2, conv, pool 2/2, two Linears: window 19, stride 4."""

    window = (19, 19)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 3))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class ResidualGapNet(nn.Module):
    """Two residual stages whose branches both stride (conv / pool), then a global pool."""

    window = (21, 21)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.main1 = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.short1 = nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(4, 4, 1))
        self.main2 = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.short2 = nn.AvgPool2d(3, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.main1(x) + self.short1(x))
        x = F.relu(self.main2(x) + self.short2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@functools.cache
def _dense(cls, *, dynamo=False, opset=None):
    torch.manual_seed(0)
    model = cls().eval()
    return model, rewrite_fc_head(
        export_classifier(model, model.window, dynamo=dynamo, opset=opset)
    )


ROUNDING = {"tap_evaluate": 0.0, "dense64": 1e-12, "ort32": 1e-5}


def _assert_atrous_equals_stitch(dense, window, k, size, runners=(tap_evaluate, ort32)):
    geometry = compute_geometry(dense, window=window)
    atrous = make_atrous(dense, factor=k)
    delta = tuple(s // f for s, f in zip(geometry.stride, k, strict=True))
    assert compute_geometry(atrous, window=window).stride == delta
    image = np.random.default_rng(5).standard_normal((1, 3, *size))
    for run in runners:
        typed = image.astype(np.float32 if run is ort32 else np.float64)
        stitched = shift_and_stitch(
            lambda x, run=run: run(dense, x), typed, window=window, stride=geometry.stride, k=k
        )
        one_pass = run(atrous, typed)
        n = stitched.shape[2:]
        assert one_pass.shape[2] >= n[0] and one_pass.shape[3] >= n[1]
        limit = ROUNDING[run.__name__] * max(1.0, float(np.abs(stitched).max()))
        diff = np.abs(one_pass[:, :, : n[0], : n[1]] - stitched).max()
        assert diff <= limit, (run.__name__, diff)
        if run is tap_evaluate:
            assert np.array_equal(one_pass[:, :, : n[0], : n[1]], stitched)


@pytest.mark.parametrize("k", [2, 4])
def test_fc_net_atrous_equals_shift_and_stitch(k):
    model, dense = _dense(FcNet)
    _assert_atrous_equals_stitch(dense, model.window, (k, k), (40, 37))


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_residual_gap_net_atrous_equals_shift_and_stitch(k):
    model, dense = _dense(ResidualGapNet, dynamo=True)
    _assert_atrous_equals_stitch(dense, model.window, (k, k), (38, 33))


def test_non_square_factor():
    model, dense = _dense(FcNet)
    _assert_atrous_equals_stitch(dense, model.window, (2, 1), (33, 30))


def test_old_opset_is_upgraded_for_dilated_average_pool():
    model, dense = _dense(ResidualGapNet, opset=11)
    assert opset_version(dense) == 11
    atrous = make_atrous(dense, factor=2)
    assert opset_version(atrous) >= 19
    _assert_atrous_equals_stitch(dense, model.window, (2, 2), (30, 29), runners=(ort32, dense64))


def test_padded_atrous_equals_dense_pass_on_even_cells():
    # README, Exactness: with padding, à trous equals the plain dense pass on its even cells
    g = GraphBuilder(3)
    g.conv(4, 3, pad=1)
    g.pool("MaxPool", 2, 2)
    g.conv(4, 3, pad=1)
    g.pool("MaxPool", 2, 2)
    g.conv(3, 4)
    dense = g.model(16)
    atrous = make_atrous(dense, factor=2)
    image = np.random.default_rng(0).standard_normal((1, 3, 37, 29))
    coarse, fine = tap_evaluate(dense, image), tap_evaluate(atrous, image)
    n = ((37 - 16) // 4 + 1, (29 - 16) // 4 + 1)
    assert np.array_equal(fine[:, :, : 2 * n[0] : 2, : 2 * n[1] : 2], coarse[:, :, : n[0], : n[1]])


def test_supported_strides_are_products_of_trailing_strides():
    # strides 3 then 2: S = 6; T = 3 removes the 2; T = 2 would need k = 3, not trailing
    g = GraphBuilder(1)
    g.conv(2, 3, stride=3)
    g.pool("MaxPool", 2, 2)
    g.conv(2, 2)
    dense = g.model(12)
    heights = sorted({h for h, _ in supported_strides(dense)}, reverse=True)
    assert heights == [6, 3, 1]
    assert (6, 3) in supported_strides(dense)
    with pytest.raises(ConversionError, match=r"height \[6, 3, 1\]"):
        make_atrous(dense, factor=3)
    with pytest.raises(ConversionError, match="supported output strides"):
        make_atrous(dense, factor=(4, 1))
    assert compute_geometry(make_atrous(dense, factor=6), window=12).stride == (1, 1)
