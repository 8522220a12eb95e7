"""Reference architectures: torchvision's exact state_dict keys and shapes, the registry, and
conversion of the built nets.

The expected layouts below are literal data transcribed from torchvision's published
definitions (torchvision/models/alexnet.py, vgg.py, resnet.py), not derived from our code.
Parameter counts are the ones torchvision documents for each model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from densemap.convert import archs
from densemap.convert.from_torch.fc import convert_classifier
from densemap.service.errors import ConversionError
from tests.support.exactness import assert_dense_equals_crops

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# (features index, out, in, kernel) of every conv; (classifier index, out, in) of every Linear.
ALEXNET_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]  # fmt: skip
ALEXNET_LINEARS = [(1, 4096, 9216), (4, 4096, 4096), (6, 1000, 4096)]
VGG11_CONVS = [(0, 64, 3), (3, 128, 64), (6, 256, 128), (8, 256, 256), (11, 512, 256), (13, 512, 512), (16, 512, 512), (18, 512, 512)]  # fmt: skip
VGG16_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256), (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]  # fmt: skip
# vgg16_bn: conv, BatchNorm2d, ReLU per layer; the BN sits at conv index + 1.
VGG16_BN_CONVS = [(0, 64, 3), (3, 64, 64), (7, 128, 64), (10, 128, 128), (14, 256, 128), (17, 256, 256), (20, 256, 256), (24, 512, 256), (27, 512, 512), (30, 512, 512), (34, 512, 512), (37, 512, 512), (40, 512, 512)]  # fmt: skip
VGG_LINEARS = [(0, 4096, 25088), (3, 4096, 4096), (6, 1000, 4096)]

# ResNet blocks: (prefix, [(conv name, out, in, kernel)...], downsample (out, in) or None)
RESNET18_BLOCKS = [
    ("layer1.0", [(64, 64, 3), (64, 64, 3)], None),
    ("layer1.1", [(64, 64, 3), (64, 64, 3)], None),
    ("layer2.0", [(128, 64, 3), (128, 128, 3)], (128, 64)),
    ("layer2.1", [(128, 128, 3), (128, 128, 3)], None),
    ("layer3.0", [(256, 128, 3), (256, 256, 3)], (256, 128)),
    ("layer3.1", [(256, 256, 3), (256, 256, 3)], None),
    ("layer4.0", [(512, 256, 3), (512, 512, 3)], (512, 256)),
    ("layer4.1", [(512, 512, 3), (512, 512, 3)], None),
]
RESNET50_BLOCKS = [
    ("layer1.0", [(64, 64, 1), (64, 64, 3), (256, 64, 1)], (256, 64)),
    ("layer1.1", [(64, 256, 1), (64, 64, 3), (256, 64, 1)], None),
    ("layer1.2", [(64, 256, 1), (64, 64, 3), (256, 64, 1)], None),
    ("layer2.0", [(128, 256, 1), (128, 128, 3), (512, 128, 1)], (512, 256)),
    ("layer2.1", [(128, 512, 1), (128, 128, 3), (512, 128, 1)], None),
    ("layer2.2", [(128, 512, 1), (128, 128, 3), (512, 128, 1)], None),
    ("layer2.3", [(128, 512, 1), (128, 128, 3), (512, 128, 1)], None),
    ("layer3.0", [(256, 512, 1), (256, 256, 3), (1024, 256, 1)], (1024, 512)),
    ("layer3.1", [(256, 1024, 1), (256, 256, 3), (1024, 256, 1)], None),
    ("layer3.2", [(256, 1024, 1), (256, 256, 3), (1024, 256, 1)], None),
    ("layer3.3", [(256, 1024, 1), (256, 256, 3), (1024, 256, 1)], None),
    ("layer3.4", [(256, 1024, 1), (256, 256, 3), (1024, 256, 1)], None),
    ("layer3.5", [(256, 1024, 1), (256, 256, 3), (1024, 256, 1)], None),
    ("layer4.0", [(512, 1024, 1), (512, 512, 3), (2048, 512, 1)], (2048, 1024)),
    ("layer4.1", [(512, 2048, 1), (512, 512, 3), (2048, 512, 1)], None),
    ("layer4.2", [(512, 2048, 1), (512, 512, 3), (2048, 512, 1)], None),
]
# Parameter counts from torchvision's model documentation.
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}


def bn_entries(prefix, channels):
    return [(f"{prefix}.{name}", [] if name == "num_batches_tracked" else [channels]) for name in BN]  # fmt: skip


def sequential_layout(convs, linears, kernel=3, bn=False):
    entries = []
    for index, out, cin, *k in convs:
        size = k[0] if k else kernel
        entries += [(f"features.{index}.weight", [out, cin, size, size])]
        entries += [(f"features.{index}.bias", [out])]
        entries += bn_entries(f"features.{index + 1}", out) if bn else []
    for index, out, cin in linears:
        entries += [(f"classifier.{index}.weight", [out, cin]), (f"classifier.{index}.bias", [out])]  # fmt: skip
    return entries


def resnet_layout(blocks, fc_in):
    entries = [("conv1.weight", [64, 3, 7, 7]), *bn_entries("bn1", 64)]
    for prefix, convs, downsample in blocks:
        for number, (out, cin, k) in enumerate(convs, start=1):
            entries += [(f"{prefix}.conv{number}.weight", [out, cin, k, k])]
            entries += bn_entries(f"{prefix}.bn{number}", out)
        if downsample:
            out, cin = downsample
            entries += [(f"{prefix}.downsample.0.weight", [out, cin, 1, 1])]
            entries += bn_entries(f"{prefix}.downsample.1", out)
    return entries + [("fc.weight", [1000, fc_in]), ("fc.bias", [1000])]


EXPECTED = {
    "alexnet": sequential_layout(ALEXNET_CONVS, ALEXNET_LINEARS),
    "vgg11": sequential_layout(VGG11_CONVS, VGG_LINEARS),
    "vgg16": sequential_layout(VGG16_CONVS, VGG_LINEARS),
    "vgg16_bn": sequential_layout(VGG16_BN_CONVS, VGG_LINEARS, bn=True),
    "resnet18": resnet_layout(RESNET18_BLOCKS, 512),
    "resnet50": resnet_layout(RESNET50_BLOCKS, 2048),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    with torch.device("meta"):  # no memory, no init time: only names and shapes matter
        model = archs.build(name)
    got = [(key, list(value.shape)) for key, value in model.state_dict().items()]
    assert got == EXPECTED[name]
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


def test_vgg16_spot_checks():
    layout = dict(EXPECTED["vgg16"])
    assert layout["classifier.0.weight"] == [4096, 25088] and layout["features.28.bias"] == [512]
    assert len(layout) == 32


def test_registry_lists_and_describes_archs():
    names = archs.list_archs()
    for name in ("lenet5", "alexnet", "vgg11", "vgg16", "resnet18", "resnet50"):
        assert name in names
    spec = archs.get_spec("VGG16")
    assert spec.input_size == (224, 224) and spec.in_channels == 3
    assert spec.preprocessing.mean == (0.485, 0.456, 0.406)
    assert spec.preprocessing.std == (0.229, 0.224, 0.225) and spec.preprocessing.color == "RGB"
    lenet = archs.get_spec("lenet5")
    assert lenet.preprocessing.color == "L" and lenet.in_channels == 1
    assert lenet.preprocessing.scale == pytest.approx(1 / 255) and lenet.num_classes == 10
    with pytest.raises(ConversionError, match="unknown architecture 'vgg17'.*vgg16"):
        archs.build("vgg17")
    with pytest.raises(ConversionError, match="num_classes"):
        archs.build("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="already registered"):
        archs.register(spec)


def test_num_classes_and_lenet_layout():
    lenet = archs.build("lenet5")
    shapes = {k: list(v.shape) for k, v in lenet.state_dict().items()}
    assert shapes["features.0.weight"] == [6, 1, 5, 5]
    assert shapes["features.3.weight"] == [16, 6, 5, 5]
    assert shapes["classifier.0.weight"] == [120, 400]  # 16 x 5 x 5 at 32x32
    assert shapes["classifier.2.weight"] == [84, 120] and shapes["classifier.4.weight"] == [10, 84]  # fmt: skip
    mnist = archs.build("lenet5", input_size=28, num_classes=7, in_channels=3, pooling="avg")
    assert mnist.classifier[0].in_features == 16 * 4 * 4 and mnist.classifier[4].out_features == 7
    assert isinstance(mnist.features[2], nn.AvgPool2d) and mnist.features[0].in_channels == 3
    with torch.device("meta"):
        assert archs.build("resnet18", num_classes=5).fc.weight.shape == (5, 512)


def test_lenet5_dense_equals_crops_fp64():
    torch.manual_seed(0)
    model = archs.build("lenet5")
    # 32 -> 28 -> 14 -> 10 -> 5: S = 4; 32 + 4 * 3 + 1 = 45 and 32 + 4 * 2 + 3 = 43.
    assert_dense_equals_crops(model, window=(32, 32), stride=(4, 4), image_size=(45, 43), in_channels=1)  # fmt: skip


@pytest.mark.slow
def test_resnet18_converts_at_224_with_a_sliding_average_pool():
    torch.manual_seed(0)
    model = archs.build("resnet18", num_classes=10)
    result = convert_classifier(model, input_size=224)
    assert result.trunk_output == (512, 7, 7) and result.fc_head_pool == "avg"
    assert result.module.avgpool.kernel_size == (7, 7) and result.module.avgpool.stride == 1
    assert result.module.fc.weight.shape == (10, 512, 1, 1)
    small = convert_classifier(model, input_size=64).module  # trunk 2x2 at 64: pool 2x2
    with torch.no_grad():
        score_map = small(torch.rand(1, 3, 64 + 32 * 2, 64 + 32))
    assert score_map.shape == (1, 10, 3, 2)  # n = (W - R) // S + 1 with S = 32


@pytest.mark.slow
def test_alexnet_converts_at_224():
    torch.manual_seed(0)
    result = convert_classifier(archs.build("alexnet", num_classes=10), input_size=224)
    assert result.fc_head_pool == "identity" and result.trunk_output == (256, 6, 6)
    assert result.module.get_submodule("classifier.1").weight.shape == (4096, 256, 6, 6)
