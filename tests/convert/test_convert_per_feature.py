"""Per-feature layers between the Linear layers, on both paths: on the map the features are
channels, so PReLU slopes, BatchNorm1d, scale/bias vectors, clips and the final activation
must act per channel (a vector of F values read as-is would broadcast over the map's width).
Unpadded nets: dense == crop-by-crop classifier in float64 (1e-9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import densemap.convert as convert
from densemap.convert.from_torch.fc import convert_classifier
from densemap.convert.geometry import compute_geometry
from densemap.service.errors import ConversionError
from tests.support.convert_onnx_support import BOTH_EXPORTERS, export_classifier, ort32
from tests.support.exactness import assert_dense_equals_crops, assert_onnx_dense_equals_crops
from tests.support.oracle import cell_counts, crop_by_crop, onnx_classifier

EXACT = 1e-9
WINDOW, IMAGE = (10, 12), (17, 20)  # trunk: conv 3 + pool 2 -> 4 x 4 x 5, stride 2


class ScaleBias(nn.Module):
    """An elementwise affine with its own (F,) vectors, as in a hand-written head."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, features))

    def forward(self, x):
        return x * self.scale + self.bias


class PerFeatureHead(nn.Module):
    """Linear -> BN1d -> PReLU(F) -> Dropout -> scale/bias -> Identity -> Linear -> ReLU6
    -> Hardtanh -> swish written out (a branching head) -> Linear -> clamp -> final."""

    def __init__(self, final: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        norm = nn.BatchNorm1d(6)
        with torch.no_grad():
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        prelu = nn.PReLU(6)
        with torch.no_grad():
            prelu.weight.copy_(torch.linspace(-1.0, 1.0, 6))  # distinct slope per feature
        self.head = nn.Sequential(
            nn.Linear(4 * 4 * 5, 6), norm, prelu, nn.Dropout(), ScaleBias(6), nn.Identity(),
            nn.Linear(6, 6), nn.ReLU6(), nn.Hardtanh(-1.0, 2.0),
        )  # fmt: skip
        self.out = nn.Linear(6, 3)
        self.final = final

    def forward(self, x):
        x = self.head(torch.flatten(self.features(x), 1))
        x = torch.clamp(self.out(x * torch.sigmoid(x)), -3.0, 3.0)
        if self.final == "sigmoid":
            return torch.sigmoid(x)
        if self.final == "log_softmax":
            return torch.log_softmax(x, dim=1)
        return x


@pytest.mark.parametrize("final", [None, "sigmoid", "log_softmax"])
def test_torch_path_per_feature_layers_equal_crops(final):
    model = PerFeatureHead(final)
    assert_dense_equals_crops(model, window=WINDOW, stride=(2, 2), image_size=IMAGE)
    assert convert_classifier(model, input_size=WINDOW).final_activation == final


@pytest.mark.parametrize("dynamo", BOTH_EXPORTERS)
@pytest.mark.parametrize("final", [None, "sigmoid", "log_softmax"])
def test_onnx_path_per_feature_layers_equal_crops(final, dynamo):
    classifier = export_classifier(PerFeatureHead(final), WINDOW, dynamo=dynamo)
    assert "PRelu" in [node.op_type for node in classifier.graph.node]
    dense = assert_onnx_dense_equals_crops(classifier, window=WINDOW, image_size=IMAGE, atol=EXACT)
    stride = compute_geometry(dense, window=WINDOW).stride
    image = np.random.default_rng(0).standard_normal((1, 3, *IMAGE))
    n = cell_counts(IMAGE, WINDOW, stride)
    expected = crop_by_crop(
        onnx_classifier(classifier), image, window=WINDOW, stride=stride, cells=n
    )[0]
    # onnxruntime broadcasts a PRelu slope of shape (F,) over the width, as the spec says
    fp32 = ort32(dense, image)[0, :, : n[0], : n[1]]
    np.testing.assert_allclose(fp32, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("final,kind", [(None, "logits"), ("sigmoid", "sigmoid"), ("log_softmax", "logits")])  # fmt: skip
def test_final_activation_is_recorded_as_the_contract_kind(final, kind, tmp_path):
    result = convert.convert_torch(
        PerFeatureHead(final), tmp_path / "d.onnx", input_size=WINDOW, preprocessing="unit"
    )
    assert result.metadata.output_kind == kind and result.final_activation == final


@pytest.mark.slow
def test_sigmoid_model_scores_are_served_as_they_are(tmp_path):
    """Per-class sigmoids are probabilities already: no softmax over them, no logits."""
    from densemap.service.engine import Engine, EngineConfig, ScoreOptions, preprocess
    from densemap.service.errors import InvalidOption

    model = PerFeatureHead("sigmoid").eval()
    convert.convert_torch(model, tmp_path / "d.onnx", input_size=WINDOW, preprocessing="unit")
    engine = Engine(tmp_path / "d.onnx", config=EngineConfig(warmup=False))
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE, 3), np.uint8)
    scores = engine.score(image).maps[0].scores
    crop_chw = preprocess(image[: WINDOW[0], : WINDOW[1]], engine.metadata.preprocessing)
    with torch.no_grad():
        expected = model(torch.from_numpy(crop_chw)[None]).numpy()[0]
    np.testing.assert_allclose(scores[:, 0, 0], expected, atol=1e-5)
    assert not np.allclose(scores.sum(axis=0), 1.0)  # not a softmax
    with pytest.raises(InvalidOption, match="logits cannot be returned"):
        engine.score(image, ScoreOptions(probabilities=False))


class VectorBeforeFirstLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.scale = nn.Parameter(torch.rand(4 * 4 * 5))
        self.fc = nn.Linear(4 * 4 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1) * self.scale)


def test_vector_on_the_flattened_volume_is_refused_by_name():
    with pytest.raises(ConversionError, match=r"'mul'.*per-feature parameters.*before the first"):
        convert_classifier(VectorBeforeFirstLinear(), input_size=WINDOW)


class WrongWidthVector(PerFeatureHead):
    def forward(self, x):
        return self.out(self.head(torch.flatten(self.features(x), 1))) * torch.ones(2, 3)


def test_vector_that_is_not_per_feature_is_refused_by_name():
    with pytest.raises(ConversionError, match=r"'mul'.*shape \(2, 3\)"):
        convert_classifier(WrongWidthVector(), input_size=WINDOW)
