"""Ceil-mode pools whose last window overhangs the classifier's window R (Caffe-style nets).

At R the overhanging window reads past the window's end (the classifier sees nothing
there, the dense pass real pixels), so the net counts as padded; an à-trous variant must
keep that overhang as explicit end padding, or it loses the last cells of the crop rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert.atrous import make_atrous
from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.geometry import compute_geometry
from tests.support.convert_onnx_support import dense64, export_classifier, ort32, shift_and_stitch
from tests.support.oracle import cell_counts

WINDOW = (16, 15)  # W: 15 -> conv 13 -> ceil pool 7 (last window overhangs) -> ...


class CeilOverhang(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), pool, nn.Conv2d(4, 4, 3), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )  # fmt: skip
        with torch.no_grad():
            features = self.features(torch.zeros(1, 3, *WINDOW)).numel()
        self.fc = nn.Linear(features, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


POOLS = {
    "max": lambda: nn.MaxPool2d(2, ceil_mode=True),
    "avg": lambda: nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False),
}


@pytest.fixture(scope="module", params=sorted(POOLS))
def dense(request):
    classifier = export_classifier(
        CeilOverhang(POOLS[request.param]()).eval(), WINDOW, dynamo=False
    )
    return rewrite_fc_head(classifier)


def test_overhang_counts_as_padding_not_as_a_too_small_window(dense):
    geometry = compute_geometry(dense, window=WINDOW)  # refused before
    assert geometry.padded
    assert geometry.stride == (4, 4)


@pytest.mark.parametrize("k", [(2, 2), (4, 4), (1, 4)])
def test_atrous_keeps_the_overhang_cells(dense, k):
    variant = make_atrous(dense, factor=k)
    image = np.random.default_rng(5).standard_normal((1, 3, WINDOW[0] + 13, WINDOW[1] + 10))
    expected = shift_and_stitch(
        lambda x: dense64(dense, x), image, window=WINDOW, stride=(4, 4), k=k
    )  # needs the overhang cells of the dense model: they exist on shifted crops too
    n = expected.shape[2:]
    stride = tuple(4 // f for f in k)
    assert n == cell_counts(image.shape[2:], WINDOW, stride)
    got64 = dense64(variant, image)
    assert got64.shape[2] >= n[0] and got64.shape[3] >= n[1]
    np.testing.assert_allclose(got64[:, :, : n[0], : n[1]], expected, rtol=0, atol=1e-12)
    got32 = ort32(variant, image)  # onnxruntime accepts the explicit padding (pad >= kernel)
    np.testing.assert_allclose(got32[:, :, : n[0], : n[1]], expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_convert_torch_writes_variants_of_an_overhanging_net(tmp_path):
    model = CeilOverhang(POOLS["max"]())
    result = convert.convert_torch(
        model, tmp_path / "d.onnx", input_size=WINDOW, strides=[2, 1], preprocessing="unit"
    )
    assert [v.stride for v in result.metadata.variants] == [(2, 2), (1, 1)]
    assert result.metadata.geometry.padded
    report = convert.verify(model, result.path)
    assert report.passed, report.table()
