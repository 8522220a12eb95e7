"""Every classifier the torch converter cannot make exact gets a ConversionError naming the
layer (or the value) and saying what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densemap.convert.from_torch.fc import fully_convolutional
from densemap.service.errors import ConversionError


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.gate(self.pool(x)))


class GlobalContext(nn.Module):
    def forward(self, x):
        return x + x.mean(dim=(2, 3), keepdim=True)


class SpatialAttention(nn.Module):
    """Self-attention over positions, folded back into a volume."""

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2)
        weights = torch.softmax(tokens.transpose(1, 2) @ tokens, dim=-1)
        return (tokens @ weights).view(n, c, h, w)


class TrunkThenHead(nn.Module):
    def __init__(self, block: nn.Module, head_in: int = 4 * 6 * 6):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), block)
        self.classifier = nn.Linear(head_in, 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize(
    "block,layer",
    [(SqueezeExcite(4), "features.2.pool"), (GlobalContext(), "features.2")],
)
def test_global_op_inside_trunk_names_the_layer(block, layer):
    with pytest.raises(ConversionError, match=rf"'{layer}'.*(global|per image)"):
        fully_convolutional(TrunkThenHead(block), input_size=8)


def test_attention_inside_trunk_names_the_layer():
    with pytest.raises(ConversionError, match=r"'features\.2'.*(attention|rank-3)"):
        fully_convolutional(TrunkThenHead(SpatialAttention()), input_size=8)


def test_size_dependent_pooling_in_trunk_is_refused():
    class WholeImagePool(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, x.shape[2:])

    with pytest.raises(ConversionError, match=r"'features\.2'.*height/width"):
        fully_convolutional(TrunkThenHead(WholeImagePool(), head_in=4), input_size=8)


class ClassTokenHead(nn.Module):
    """Head fed by an attention read-out (first token), not by a flatten or global pool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.features(x).flatten(2).transpose(1, 2)  # N, HW, C
        return self.fc(tokens[:, 0])


def test_head_fed_by_attention_readout():
    with pytest.raises(ConversionError, match=r"head is fed by 'getitem'.*not a supported form"):
        fully_convolutional(ClassTokenHead(), input_size=8)


def test_model_without_linear_head():
    # flattening a C x h x w volume with h, w > 1 into "classes" is not a window classifier
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten())
    with pytest.raises(ConversionError, match=r"no Linear classifier head.*'2'"):
        fully_convolutional(model, input_size=8)
    already_dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 6))
    with pytest.raises(ConversionError, match=r"no Linear classifier head"):
        fully_convolutional(already_dense, input_size=8)


class VggLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_non_identity_adaptive_pool_names_layer_and_what_to_do():
    fully_convolutional(VggLike(), input_size=8)  # 8 -> 6 -> 3: identity, fine
    with pytest.raises(ConversionError, match=r"'avgpool'.*not an identity.*10x10.*4x4.*3x3"):
        fully_convolutional(VggLike(), input_size=10)


@pytest.mark.parametrize("size", [3, (2, 8)])
def test_input_size_too_small_names_the_value(size):
    h, w = (size, size) if isinstance(size, int) else size
    with pytest.raises(ConversionError, match=rf"input size {h}x{w}.*too small"):
        fully_convolutional(VggLike(), input_size=size)


def test_input_size_mismatching_the_head_names_the_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ConversionError, match=r"input size 9x9.*layer '2'"):
        fully_convolutional(model, input_size=9)


@pytest.mark.parametrize("size", [0, (8,), "224", (8, -1), 8.0])
def test_invalid_input_size_values(size):
    with pytest.raises(ConversionError, match="input_size"):
        fully_convolutional(VggLike(), input_size=size)


def test_wrong_channel_count_is_reported():
    with pytest.raises(ConversionError, match=r"in_channels|too small"):
        fully_convolutional(VggLike(), input_size=8, in_channels=1)


def test_a_feature_map_beside_the_scores_is_refused_by_name():
    class TwoOutputs(VggLike):
        def forward(self, x):
            features = self.features(x)
            return self.classifier(torch.flatten(features, 1)), features

    with pytest.raises(
        ConversionError, match=r"^output 1 of the forward has shape \(2, 4, 3, 3\) at input"
    ):
        fully_convolutional(TwoOutputs(), input_size=8)


def test_untraceable_forward_is_explained():
    class DataDependent(VggLike):
        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return super().forward(x)

    with pytest.raises(ConversionError, match="torch.fx"):
        fully_convolutional(DataDependent(), input_size=8)
