"""Issue 14 point 4: per-position channel ops convert on both paths, exactly.

Small unpadded nets, so every dense cell must equal the classifier on its crop (1e-9 in
float64): ShuffleNet's channel shuffle inside the trunk, ConvNeXt's channels-last
LayerNorm/Linear blocks and its pool -> LayerNorm2d -> flatten -> Linear head, and
SqueezeNet's conv head + global pool with no Linear. The torchvision models themselves
are checked by ``make sweep`` (tests/sweep/).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import GraphBuilder, export_classifier
from tests.support.exactness import assert_dense_equals_crops, assert_onnx_dense_equals_crops


def channel_shuffle(x, groups: int):  # torchvision's, verbatim
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleNetLike(nn.Module):
    """conv -> split branches -> concat -> shuffle -> conv, then a flatten + FC head."""

    def __init__(self, *, swap_hw: bool = False) -> None:
        super().__init__()
        self.swap_hw = swap_hw
        self.stem = nn.Conv2d(3, 6, 3)
        self.branch = nn.Conv2d(3, 3, 1)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Conv2d(6, 4, 2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat((a, torch.relu(self.branch(b))), dim=1)
        if self.swap_hw:  # reads H, W in the wrong order: a reinterpretation, not a shuffle
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, w, h).transpose(1, 2).contiguous().view(n, c, h, w)
        else:
            x = channel_shuffle(x, 2)
        x = self.mix(self.pool(x))
        return self.fc(torch.flatten(x, 1))


class LayerNorm2d(nn.LayerNorm):  # torchvision's ConvNeXt norm, verbatim
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block (depthwise conv, channels-last LayerNorm and Linears) and its head:
    global pool -> LayerNorm2d -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(8), nn.Flatten(1), nn.Linear(8, 5))
        for norm in (self.stem[1], self.norm, self.classifier[0]):  # not the identity
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.classifier(self.avgpool(y))


class SqueezeNetLike(nn.Module):
    """Fire-style trunk, then a conv head, ReLU, global pool and flatten: no Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Conv2d(6, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


NETS = {
    "shufflenet": (ShuffleNetLike, (12, 12), (2, 2)),
    "convnext": (ConvNeXtLike, (14, 14), (2, 2)),
    "squeezenet": (SqueezeNetLike, (10, 12), (2, 2)),
}


def _net(name):
    torch.manual_seed(0)
    return NETS[name][0]().eval()


@pytest.mark.parametrize("name", sorted(NETS))
def test_torch_path_equals_crops(name):
    _, window, stride = NETS[name]
    assert_dense_equals_crops(_net(name), window=window, stride=stride, image_size=(19, 23))


# The legacy exporter writes x.chunk(2, dim=1) as Slices whose bounds are computed from
# Shape: not followed yet (README, "Which architectures convert"), so ShuffleNet is dynamo's.
ONNX_CASES = [pytest.param(name, True, marks=pytest.mark.slow) for name in sorted(NETS)] + [
    ("convnext", False),
    ("squeezenet", False),
]  # dynamo exports are slow: see BOTH_EXPORTERS


@pytest.mark.parametrize(("name", "dynamo"), ONNX_CASES)
def test_onnx_path_equals_crops(name, dynamo):
    _, window, _ = NETS[name]
    classifier = export_classifier(_net(name), window, dynamo=dynamo)
    assert_onnx_dense_equals_crops(classifier, window=window, image_size=(19, 23))


@pytest.mark.slow
def test_the_shuffle_becomes_a_channel_gather():
    from densemap.convert.from_onnx.fc_head import rewrite_fc_head

    dense = rewrite_fc_head(export_classifier(_net("shufflenet"), (12, 12), dynamo=True))
    ops = [node.op_type for node in dense.graph.node]
    gathers = [node for node in dense.graph.node if node.op_type == "Gather"]
    assert "Reshape" not in ops and "Transpose" not in ops
    assert len(gathers) == 1 and gathers[0].attribute[0].i == 1  # axis 1, the channels
    perm = next(i for i in dense.graph.initializer if i.name == gathers[0].input[1])
    np.testing.assert_array_equal(np.frombuffer(perm.raw_data, np.int64), [0, 3, 1, 4, 2, 5])


def test_a_view_that_swaps_h_and_w_stays_refused():
    with pytest.raises(ConversionError, match="depends on the input's height/width"):
        assert_dense_equals_crops(
            ShuffleNetLike(swap_hw=True), window=(12, 12), stride=(2, 2), image_size=(19, 23)
        )


def test_a_layer_norm_over_space_is_refused_on_the_onnx_path():
    from densemap.convert.from_onnx.fc_head import rewrite_fc_head

    g = GraphBuilder(3)
    g.conv(4, 3)
    scale = g.const(np.ones((4, 4), dtype=np.float32), "scale")
    g.node("LayerNormalization", [g.current, scale], axis=2)  # normalizes over H and W
    g.node("GlobalAveragePool")
    g.node("Flatten")
    g.node("Gemm", [g.current, g.const(np.ones((2, 4), dtype=np.float32))], transB=1)
    with pytest.raises(ConversionError) as error:
        rewrite_fc_head(g.model((6, 6), output_dims=[1, 2]))
    assert "LayerNormalization node" in str(error.value)
    assert "normalizes over a spatial axis (axis=2 of a tensor whose H, W are at axes [2, 3])" in (
        str(error.value)
    )
