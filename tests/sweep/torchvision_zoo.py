"""The torchvision models of the architecture sweep (``make sweep``), split into trunk and head.

torchvision 0.28's compiled ops do not load beside torch's CPU wheel (``import torchvision``
fails with "operator torchvision::nms does not exist" while registering fake kernels for
its detection ops). The model code is pure Python and needs none of them, so an empty
``torchvision._meta_registrations`` module stands in before the import. This lives in the
tests only: convert/ and service/ never import torchvision.

Each :class:`Arch` says how to build the model (random weights, 10 classes), the window R
(small where the architecture allows: adaptive pools make torchvision models run at any
size above their minimum; AlexNet and VGG keep 224, where their ``AdaptiveAvgPool2d`` is
an identity), and how to run its trunk and its head separately. The head on each h x w
window of the trunk's output on a large image is the reference for the dense map: the
model's own computation, padding included, with no part of the converter in it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.modules.setdefault(
    "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
)
from torchvision import models  # noqa: E402

Trunk = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Head = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Arch:
    build: Callable[[], nn.Module]
    window: int
    trunk: Trunk
    head: Head


def _seq(*names: str) -> Trunk:
    def run(model, x):
        for name in names:
            x = getattr(model, name)(x)
        return x

    return run


def _features(model, x):
    return model.features(x)


def _pooled_classifier(model, f):
    return model.classifier(torch.flatten(model.avgpool(f), 1))


def _fc_after_pool(model, f):
    return model.fc(torch.flatten(model.avgpool(f), 1))


RESNET_TRUNK = _seq("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
GOOGLENET_TRUNK = _seq(
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
    "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
    "maxpool4", "inception5a", "inception5b",
)  # fmt: skip
INCEPTION_TRUNK = _seq(
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
    "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
    "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)  # fmt: skip

CONVERTED = {
    "alexnet": Arch(lambda: models.alexnet(num_classes=10), 224, _features, _pooled_classifier),
    "vgg11": Arch(lambda: models.vgg11(num_classes=10), 224, _features, _pooled_classifier),
    "resnet18": Arch(lambda: models.resnet18(num_classes=10), 64, RESNET_TRUNK, _fc_after_pool),
    "resnet50": Arch(lambda: models.resnet50(num_classes=10), 64, RESNET_TRUNK, _fc_after_pool),
    "googlenet": Arch(
        lambda: models.googlenet(
            num_classes=10, aux_logits=False, transform_input=False, init_weights=False
        ),
        64,
        GOOGLENET_TRUNK,
        lambda m, f: m.fc(m.dropout(torch.flatten(m.avgpool(f), 1))),
    ),
    "inception_v3": Arch(
        lambda: models.inception_v3(
            num_classes=10, aux_logits=False, transform_input=False, init_weights=False
        ),
        107,  # a 2x2 map before the pool: no padded window sees a single cell at R
        INCEPTION_TRUNK,
        lambda m, f: m.fc(torch.flatten(m.dropout(m.avgpool(f)), 1)),
    ),
    "mobilenet_v2": Arch(
        lambda: models.mobilenet_v2(num_classes=10),
        64,
        _features,
        lambda m, f: m.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)),
    ),
    "squeezenet1_1": Arch(
        lambda: models.squeezenet1_1(num_classes=10),
        64,
        _features,
        lambda m, f: torch.flatten(m.classifier(f), 1),  # conv head, then the global pool
    ),
    "densenet121": Arch(
        lambda: models.densenet121(num_classes=10),
        64,
        lambda m, x: nn.functional.relu(m.features(x)),
        lambda m, f: m.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)),
    ),
    "shufflenet_v2_x0_5": Arch(
        lambda: models.shufflenet_v2_x0_5(num_classes=10),
        64,
        _seq("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
        lambda m, f: m.fc(f.mean([2, 3])),
    ),
    "mnasnet0_5": Arch(
        lambda: models.mnasnet0_5(num_classes=10),
        64,
        lambda m, x: m.layers(x),
        lambda m, f: m.classifier(f.mean([2, 3])),
    ),
    "regnet_x_400mf": Arch(
        lambda: models.regnet_x_400mf(num_classes=10),
        64,
        _seq("stem", "trunk_output"),
        _fc_after_pool,
    ),
    "convnext_tiny": Arch(
        lambda: models.convnext_tiny(num_classes=10),
        64,
        _features,
        lambda m, f: m.classifier(m.avgpool(f)),  # LayerNorm2d over C, flatten, Linear
    ),
}

# Refused on both paths, and the words the reason must contain.
REFUSED = {
    "mobilenet_v3_small": (lambda: models.mobilenet_v3_small(num_classes=10), 64),
    "efficientnet_b0": (lambda: models.efficientnet_b0(num_classes=10), 64),
    "regnet_y_400mf": (lambda: models.regnet_y_400mf(num_classes=10), 64),
    "vit": (
        lambda: models.VisionTransformer(
            image_size=32,
            patch_size=16,
            num_layers=1,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        ),  # fmt: skip
        32,
    ),
}
REFUSAL_WORDS = {
    "mobilenet_v3_small": "squeeze-and-excitation",
    "efficientnet_b0": "squeeze-and-excitation",
    "regnet_y_400mf": "squeeze-and-excitation",
    "vit": "class token",
}
