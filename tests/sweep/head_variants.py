"""Head variants of the architecture sweep: one small padded trunk, several FC heads.

Each entry is an ``Arch`` like ``torchvision_zoo``'s (build, window, trunk, head), so the
sweep checks it the same way on both paths. ``TwoHeads`` has several outputs (class logits
and box regression): the sweep checks it head by head (``sweep_torchvision.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision_zoo import Arch


class SmallTrunk(nn.Module):
    """Padded convs and pools: stride 4, a 4x4x6 volume at R = 16."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip


class PReLUBatchNormHead(SmallTrunk):
    """Linear -> BatchNorm1d -> PReLU(F) -> Linear on the C,H,W flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(6 * 4 * 4, 12), nn.BatchNorm1d(12), nn.PReLU(12), nn.Linear(12, 10)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class PermutedFlattenHead(SmallTrunk):
    """A Keras (H,W,C) or Caffe-port (W,H,C) flatten order before Linear -> ReLU -> Linear."""

    def __init__(self, order: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.order = order
        self.classifier = nn.Sequential(nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x).permute(*self.order), 1))


def _trunk(model, x):
    return model.features(x)


def _head(model, f):
    if isinstance(model, PermutedFlattenHead):
        f = f.permute(*model.order)
    return model.classifier(torch.flatten(f, 1))


HEAD_VARIANTS = {
    "head_prelu_bn1d": Arch(PReLUBatchNormHead, 16, _trunk, _head),
    "head_flatten_hwc": Arch(lambda: PermutedFlattenHead((0, 2, 3, 1)), 16, _trunk, _head),
    "head_flatten_whc": Arch(lambda: PermutedFlattenHead((0, 3, 2, 1)), 16, _trunk, _head),
}


class TwoHeads(SmallTrunk):
    """Class logits and 4 box values from one padded trunk: a shared Linear + PReLU, then
    one Linear per head; the forward returns a tuple (scores, boxes)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(6 * 4 * 4, 12), nn.PReLU(12))
        self.classes = nn.Linear(12, 10)
        self.boxes = nn.Linear(12, 4)

    def forward(self, x):
        return two_heads(self, self.features(x))


def two_heads(model: TwoHeads, features):
    shared = model.shared(torch.flatten(features, 1))
    return model.classes(shared), model.boxes(shared)


MULTI_HEAD = Arch(TwoHeads, 16, _trunk, two_heads)
