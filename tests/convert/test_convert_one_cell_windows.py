"""Windows that see one cell at R (ResNet at R = 32: layer4's padded 3x3 convs on a 1x1 map)
read that cell alone in the written model, on both paths, as the classifier does.

The trunk below is unpadded up to a residual block whose convs are padded and see one
cell at R; there the classifier uses their centre taps only, so the dense map must equal
crop-by-crop evaluation exactly, in float64, although the net has zero padding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import densemap.convert as convert
from tests.support.convert_onnx_support import dense64, export_classifier
from tests.support.oracle import cell_counts, crop_by_crop, torch_classifier

WINDOW = 10  # 10 -> 8 -> 4 -> (2x2, stride 2) 2 -> (3x3, stride 2, pad 1) 1


class OneCellBlock(nn.Module):
    """An unpadded trunk, then a ResNet-style block on a 1x1 map at R."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.down = nn.Sequential(nn.Conv2d(4, 6, 2, stride=2), nn.ReLU())
        self.conv1 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(6, 8, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.down(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x)
        return self.fc(torch.flatten(self.pool(torch.relu(y)), 1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return OneCellBlock().eval()


@pytest.mark.slow
@pytest.mark.parametrize("path", ["torch", "onnx"])
def test_one_cell_windows_make_the_map_equal_crops(model, path, tmp_path):
    if path == "torch":
        result = convert.convert_torch(
            model, tmp_path / "d.onnx", input_size=WINDOW, preprocessing="unit", strides=[4]
        )
    else:
        onnx.save(export_classifier(model, WINDOW, dynamo=False), str(tmp_path / "c.onnx"))
        result = convert.convert_onnx(
            tmp_path / "c.onnx", tmp_path / "d.onnx", preprocessing="unit", strides=[4]
        )
    geometry = result.metadata.geometry
    assert geometry.stride == (8, 8)
    size = (WINDOW + 3 * 8 + 5, WINDOW + 2 * 8 + 3)
    image = np.random.default_rng(4).standard_normal((1, 3, *size))
    for path_, stride in ((result.path, (8, 8)), (result.variant_paths[0], (4, 4))):
        n = cell_counts(size, (WINDOW, WINDOW), stride)
        expected = crop_by_crop(
            torch_classifier(model), image, window=(WINDOW, WINDOW), stride=stride, cells=n
        )[0]
        score_map = dense64(onnx.load(str(path_)), image)[0]
        assert score_map.shape == expected.shape
        np.testing.assert_allclose(score_map, expected, rtol=0, atol=1e-9)
    source = model if path == "torch" else tmp_path / "c.onnx"
    report = convert.verify(source, result.path, dtype="float64")
    assert report.passed, report.table()
