"""Any flatten order, and axis moves inside the trunk, on both paths.

Caffe ports flatten W, H, C (``x.permute(0, 3, 2, 1)``), Keras ports H, W, C: the first
Linear then becomes a conv whose taps follow that order. A transpose that swaps H and W
inside the trunk is refused by name (the map would come back transposed), while
channels-last per-position blocks (ConvNeXt's LayerNorm over channels and its Linear on
channels) convert as they are. Window and trunk output are not square, so a swapped axis
cannot pass. Unpadded nets: dense == crop-by-crop classifier in float64 (1e-9).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densemap.convert.from_onnx.fc_head import rewrite_fc_head
from densemap.convert.from_torch.fc import fully_convolutional
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import BOTH_EXPORTERS, export_classifier
from tests.support.exactness import assert_dense_equals_crops, assert_onnx_dense_equals_crops

EXACT = 1e-9
WINDOW, IMAGE = (10, 12), (17, 21)  # trunk output 4 x 4 x 5 at the window, stride 2
ORDERS = {
    "chw": lambda x: x,
    "hwc": lambda x: x.permute(0, 2, 3, 1),
    "whc": lambda x: x.permute(0, 3, 2, 1),  # Caffe ports
    "cwh": lambda x: x.transpose(2, 3),
}


class Flattened(nn.Module):
    def __init__(self, order: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.order = order
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(4 * 4 * 5, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        moved = ORDERS[self.order](self.features(x))
        return self.classifier(moved.reshape(moved.shape[0], -1))


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_torch_path_any_flatten_order_equals_crops(order):
    assert_dense_equals_crops(Flattened(order), window=WINDOW, stride=(2, 2), image_size=IMAGE)


def _assert_onnx_dense_equals_crops(classifier):
    assert_onnx_dense_equals_crops(classifier, window=WINDOW, image_size=IMAGE, atol=EXACT)


@pytest.mark.parametrize("dynamo", BOTH_EXPORTERS)
@pytest.mark.parametrize("order", sorted(ORDERS))
def test_onnx_path_any_flatten_order_equals_crops(order, dynamo):
    _assert_onnx_dense_equals_crops(export_classifier(Flattened(order), WINDOW, dynamo=dynamo))


class SwapInTrunk(Flattened):
    def forward(self, x):
        x = self.features[0](x).transpose(2, 3)  # H and W swapped before the pool
        return self.classifier(torch.flatten(self.features[2](self.features[1](x)), 1))


def test_torch_path_refuses_a_trunk_transpose_that_swaps_h_and_w():
    with pytest.raises(ConversionError, match=r"'features\.2'.*swaps H and W"):
        fully_convolutional(SwapInTrunk("chw"), input_size=(10, 13))


def test_onnx_path_refuses_a_trunk_transpose_that_swaps_h_and_w():
    classifier = export_classifier(SwapInTrunk("chw"), (10, 13), dynamo=False)
    with pytest.raises(ConversionError, match=r"MaxPool.*not NCHW"):
        rewrite_fc_head(classifier)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's pattern: permute to N,H,W,C, LayerNorm and an MLP over C, a layer scale
    of shape (C,), permute back, residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        y = self.mlp(self.norm(x.permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ChannelsLastNet(Flattened):
    def __init__(self) -> None:
        super().__init__("chw")
        self.block = ChannelsLastBlock(4)

    def forward(self, x):
        return self.classifier(torch.flatten(self.block(self.features(x)), 1))


def test_torch_path_channels_last_layernorm_and_linear_convert():
    assert_dense_equals_crops(ChannelsLastNet(), window=WINDOW, stride=(2, 2), image_size=IMAGE)


class ChannelsLastConv(Flattened):
    def forward(self, x):
        x = self.features[0](x).permute(0, 2, 3, 1)
        return self.classifier(torch.flatten(self.features[2](x), 1))


def test_torch_path_refuses_a_pool_on_a_channels_last_tensor():
    with pytest.raises(ConversionError, match=r"'features\.2'.*holds its axes as NHWC"):
        fully_convolutional(ChannelsLastConv("chw"), input_size=WINDOW)
