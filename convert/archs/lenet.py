"""LeNet-5 (LeCun et al. 1998), in the features / classifier layout.

Unpadded throughout, so its dense form equals crop-by-crop evaluation exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from densemap.service.errors import ConversionError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class LeNet5(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: tuple[int, int] | int = 32,
        pooling: str = "max",
        activation: str = "relu",
    ):
        super().__init__()
        if pooling not in POOLS or activation not in ACTIVATIONS:
            raise ConversionError(
                f"lenet5: pooling must be one of {sorted(POOLS)} and activation one of "
                f"{sorted(ACTIVATIONS)}, got pooling={pooling!r} activation={activation!r}"
            )
        pool, act = POOLS[pooling], ACTIVATIONS[activation]
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        # conv 5 (-4), pool 2 (floor /2), conv 5 (-4), pool 2 (floor /2)
        trunk_h, trunk_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if trunk_h < 1 or trunk_w < 1:
            raise ConversionError(f"lenet5 needs an input of at least 16x16, got {height}x{width}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5), act(), pool(2),
            nn.Conv2d(6, 16, kernel_size=5), act(), pool(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16 * trunk_h * trunk_w, 120), act(),
            nn.Linear(120, 84), act(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 for ``input_size`` (default 32x32) grey images; see :class:`LeNet5`."""
    return LeNet5(**kwargs)
