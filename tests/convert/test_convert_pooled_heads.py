"""Heads after a global pool that are per position, so they convert (torch path):
Inception-v3's avgpool -> dropout -> flatten -> fc (was called squeeze-and-excitation), and
SqueezeNet's conv head -> global pool -> flatten, with no Linear at all. Unpadded nets:
dense == crop-by-crop classifier in float64 (1e-9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densemap.convert.from_torch.fc import convert_classifier
from tests.support.convert_onnx_support import export_classifier
from tests.support.exactness import assert_dense_equals_crops, assert_onnx_dense_equals_crops

WINDOW, IMAGE = (10, 12), (17, 21)  # trunk output 4 x 4 x 5 at the window, stride 2


class InceptionHead(nn.Module):
    """torchvision Inception-v3's order: avgpool, dropout, flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.dropout(self.avgpool(self.features(x))), 1))


class SqueezeNetHead(nn.Module):
    """torchvision SqueezeNet's classifier: dropout, 1x1 conv to classes, ReLU, global
    average pool; forward flattens it. No Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(4, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1))
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def test_inception_head_order_converts_with_a_sliding_pool():
    result = convert_classifier(InceptionHead(), input_size=WINDOW)
    assert result.fc_head_pool == "avg" and result.trunk_output == (4, 4, 5)
    assert_dense_equals_crops(InceptionHead(), window=WINDOW, stride=(2, 2), image_size=IMAGE)


def test_squeezenet_conv_head_with_global_pool_converts():
    result = convert_classifier(SqueezeNetHead(), input_size=WINDOW)
    assert result.fc_head_pool == "avg" and result.num_classes == 3
    assert_dense_equals_crops(SqueezeNetHead(), window=WINDOW, stride=(2, 2), image_size=IMAGE)


@pytest.mark.slow
def test_onnx_path_inception_head_order_equals_crops():
    for dynamo in (False, True):
        classifier = export_classifier(InceptionHead(), WINDOW, dynamo=dynamo)
        assert_onnx_dense_equals_crops(classifier, window=WINDOW, image_size=IMAGE)
