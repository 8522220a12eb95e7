"""A model whose stride differs per axis (S = 4 x 2): cells, finer strides and tiles vs crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from densemap.service.contract import Geometry, ModelMetadata, Preprocessing
from densemap.service.engine import Engine, EngineConfig, ScoreOptions, preprocess
from densemap.service.errors import InvalidOption
from tests.support.dense_models import export_dense_net
from tests.support.oracle import crop_by_crop, torch_classifier

WINDOW = (12, 16)
STRIDE = (4, 2)


def make_net() -> nn.Sequential:
    """Rows: conv3, pool 2/2, conv3, pool 2/2 -> stride 4; columns: pool 1/1 first -> stride 2."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d((2, 1), (2, 1)),
        nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(8, 5, (1, 6)),  # head: the trunk's 1 x 6 output at the window size
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    metadata = ModelMetadata(
        geometry=Geometry(
            window=WINDOW,
            stride=STRIDE,
            receptive_field=(10, 16),  # rows: 1+2+1+4+2 = 10 (the last 2 rows unused)
            receptive_field_offset=(0, 0),
            effective_window=(10, 16),
            padded=False,
        ),
        preprocessing=Preprocessing(color="RGB", scale=1 / 255, mean=(0.5,) * 3, std=(0.25,) * 3),
        labels=tuple(f"c{i}" for i in range(5)),
        output_kind="logits",
        source="tests/engine/test_engine_anisotropic.py",
    )
    path = tmp_path_factory.mktemp("aniso") / "model.onnx"
    return export_dense_net(make_net(), path, channels=3, window=WINDOW, metadata=metadata)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, config=EngineConfig(warmup=False))


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(11).random((41, 53, 3)) * 255).astype(np.uint8)


def crop_logits(image, stride, preprocessing) -> np.ndarray:
    """fp64 torch logits of every window at ``stride``: the crop-by-crop oracle (the
    preprocessing is per pixel, so preprocessing the image, then cropping, is exact)."""
    image_nchw = preprocess(image, preprocessing)[None]
    classify = torch_classifier(make_net())
    return crop_by_crop(classify, image_nchw, window=WINDOW, stride=stride, batched=True)[0]


@pytest.mark.parametrize(
    ("output_stride", "cell_stride"), [(None, (4, 2)), (2, (2, 2)), (1, (1, 1))]
)
def test_map_equals_crops_per_axis(engine, image, output_stride, cell_stride):
    result = engine.score(image, ScoreOptions(output_stride=output_stride, probabilities=False))
    scale_map = result.maps[0]
    assert scale_map.geometry.stride == cell_stride
    expected = crop_logits(image, cell_stride, engine.metadata.preprocessing)
    assert scale_map.shape == expected.shape[1:]
    # fp32 dense pass vs fp64 crops of an unpadded net: only rounding differs (|logit| ~ 1).
    np.testing.assert_allclose(scale_map.scores, expected, atol=1e-5, rtol=0)
    top, left = cell_stride
    assert scale_map.geometry.window_at(1, 1) == (top, left, top + WINDOW[0], left + WINDOW[1])


def test_only_common_divisors_are_strides(engine, image):
    assert engine.supported_strides == (2, 1)
    with pytest.raises(InvalidOption, match="use one of 2, 1 "):
        engine.score(image, ScoreOptions(output_stride=4))


@pytest.mark.parametrize("output_stride", [None, 1])
def test_tiles_equal_single_pass(model_path, engine, image, output_stride):
    options = ScoreOptions(output_stride=output_stride, scales=(1.0, 1.4), probabilities=False)
    whole = engine.score(image, options)
    room = engine.estimate_bytes(20, 24)
    assert engine.estimate_bytes(41, 53) > room  # the image is really tiled
    budget = engine.estimate_request(41, 53, options).held_bytes + room
    tiled = Engine(model_path, config=EngineConfig(warmup=False, memory_budget=budget))
    for a, b in zip(whole.maps, tiled.score(image, options).maps, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
