"""The fully-convolutional torch module equals crop-by-crop evaluation, in fp64.

For an unpadded net with window R and trunk stride S, cell (i, j) of the dense map must be
the original classifier on the crop at (i*S, j*S) of size R, to rounding (1e-9 in fp64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densemap.convert.from_torch.fc import convert_classifier, ends_in_softmax, fully_convolutional
from tests.support.exactness import assert_dense_equals_crops
from tests.support.oracle import FP64_TOLERANCE


def lenet_like_sequential(window_volume=(6, 3, 5)) -> nn.Sequential:
    channels, height, width = window_volume
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, channels, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(channels * height * width, 8), nn.ReLU(), nn.Dropout(),
        nn.Linear(8, 5),
    )  # fmt: skip


def test_sequential_non_square_window_and_odd_image_size():
    # 20x28 -> conv 18x26 -> pool 9x13 -> conv 7x11 -> pool 3x5; S = 4.
    # Image 34x47: 34 - 20 = 14 and 47 - 28 = 19 are not multiples of 4: n = 4 x 5 cells.
    # The floor pools ignore the last 2 pixels of R (effective window 18x26), so the map
    # may hold an extra cell per axis; the engine crops to n.
    assert_dense_equals_crops(
        lenet_like_sequential(), window=(20, 28), stride=(4, 4), image_size=(34, 47)
    )


def test_strided_first_conv_with_overlapping_pooling():
    # 35 -> conv 5/2: 16 -> pool 3/2: 7 -> conv 3: 5 -> pool 3/2: 2. S = 8.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 3),
    )  # fmt: skip
    assert_dense_equals_crops(model, window=(35, 35), stride=(8, 8), image_size=(64, 58))


class FeaturesAvgpoolClassifier(nn.Module):
    """torchvision layout: features / AdaptiveAvgPool2d / torch.flatten / classifier."""

    def __init__(self, softmax: nn.Module | None = None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((3, 5))
        layers = [nn.Dropout(), nn.Linear(5 * 3 * 5, 7), nn.ReLU(inplace=True), nn.Linear(7, 4)]
        self.classifier = nn.Sequential(*layers, *([softmax] if softmax else []))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def test_features_avgpool_classifier_with_identity_adaptive_pool():
    model = FeaturesAvgpoolClassifier()
    result = convert_classifier(model.double(), input_size=(20, 28))
    assert result.fc_head_pool == "identity" and "avgpool" in result.removed
    assert result.trunk_output == (5, 3, 5)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in result.module.modules())
    assert_dense_equals_crops(model, window=(20, 28), stride=(4, 4), image_size=(41, 39))


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) + 0.5 * x[:, :1, 1:-1, 1:-1]


class NestedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.ModuleList([nn.Sequential(Block(3, 4), nn.MaxPool2d(2)), Block(4, 4)])
        self.head = nn.ModuleDict({"fc1": nn.Linear(4 * 2 * 3, 6), "fc2": nn.Linear(6, 3)})

    def forward(self, x):
        for stage in self.stage:
            x = stage(x)
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.head["fc2"](F.relu(self.head["fc1"](x))), dim=-1)


def test_nested_modules_view_and_functional_log_softmax():
    # 10x12 -> block 8x10 -> pool 4x5 -> block 2x3; S = 2.
    dense, score_map = assert_dense_equals_crops(
        NestedNet(), window=(10, 12), stride=(2, 2), image_size=(17, 20)
    )
    assert torch.allclose(score_map.exp().sum(1), torch.ones((), dtype=torch.float64))
    assert not ends_in_softmax(dense)  # log-probabilities are not probabilities


@pytest.mark.parametrize("softmax", [nn.Softmax(dim=1), nn.Softmax(dim=-1)])
def test_final_softmax_runs_over_classes(softmax):
    model = FeaturesAvgpoolClassifier(softmax=softmax)
    assert ends_in_softmax(model)
    dense, score_map = assert_dense_equals_crops(
        model, window=(20, 28), stride=(4, 4), image_size=(32, 36)
    )
    assert ends_in_softmax(dense)
    sums = score_map.sum(dim=1)
    assert torch.allclose(sums, torch.ones_like(sums))


class GapNet(nn.Module):
    """An unpadded ResNet-style trunk (residual add), global pool, one Linear."""

    def __init__(self, pool: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.conv3 = nn.Conv2d(6, 6, 3)
        self.pool_style = pool
        self.avgpool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d((1, 1))
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(self.conv3(x) + x[:, :, 1:-1, 1:-1])
        if self.pool_style == "mean":
            return self.fc(x.mean((2, 3)))
        if self.pool_style == "amax":
            return self.fc(x.amax(dim=(-1, -2), keepdim=True).flatten(1))
        if self.pool_style == "functional":  # torchvision MobileNetV2 / DenseNet style
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("pool,kind", [("avg", "avg"), ("max", "max"), ("mean", "avg"), ("amax", "max"), ("functional", "avg")])  # fmt: skip
def test_global_pool_head_becomes_sliding_pool(pool, kind):
    # 19x23 -> 17x21 -> conv 3/2: 8x10 -> conv 3: 6x8; S = 2.
    model = GapNet(pool).double()
    result = convert_classifier(model, input_size=(19, 23))
    assert result.fc_head_pool == kind and result.trunk_output == (6, 6, 8)
    pool_type = nn.AvgPool2d if kind == "avg" else nn.MaxPool2d
    pools = [m for m in result.module.modules() if isinstance(m, pool_type)]
    assert len(pools) == 1 and pools[0].kernel_size == (6, 8) and pools[0].stride == 1
    assert_dense_equals_crops(model, window=(19, 23), stride=(2, 2), image_size=(30, 28))


def test_padded_net_with_ceil_mode_runs_and_keeps_scores_at_window_size():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double().eval()  # fmt: skip
    dense = fully_convolutional(model, input_size=16)
    image_nchw = torch.rand(1, 3, 16 + 4 * 3 + 2, 16 + 4 * 2 + 3, dtype=torch.float64)
    with torch.no_grad():
        score_map = dense(image_nchw)
        at_window = dense(image_nchw[:, :, :16, :16]).flatten(1)
        expected = model(image_nchw[:, :, :16, :16])
    # n = (W - R) // S + 1 = 4 x 3 cells; ceil_mode may add a partial one, never fewer.
    assert score_map.shape[2] >= 4 and score_map.shape[3] >= 3
    assert (at_window - expected).abs().max().item() <= FP64_TOLERANCE


def test_user_model_is_not_modified():
    model = FeaturesAvgpoolClassifier(softmax=nn.Softmax(dim=-1)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = fully_convolutional(model, input_size=(20, 28))
    assert model.training and not dense.training
    assert isinstance(model.classifier[1], nn.Linear) and model.classifier[-1].dim == -1
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_first_linear_weight_is_a_chw_view():
    model = FeaturesAvgpoolClassifier()
    dense = fully_convolutional(model, input_size=(20, 28))
    linear, conv = model.classifier[1], dense.get_submodule("classifier.1")
    assert conv.weight.shape == (7, 5, 3, 5)
    # Feature index c*h*w + y*w + x of the Linear is tap (c, y, x) of the kernel.
    assert torch.equal(conv.weight[2, 4, 1, 3], linear.weight[2, 4 * 15 + 1 * 5 + 3])
    assert torch.equal(conv.bias, linear.bias)
