"""Several heads: every head's map equals its own reference on every path, and models whose
outputs do not match their heads are refused by name.

References are computed independently of the engine: plain onnxruntime on the whole
preprocessed image (cropped to the n cells), on every window crop (each gives one cell), and
the torch net in float64.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from densemap.service.contract import Head
from densemap.service.engine import Engine, EngineConfig, ScoreOptions, preprocess
from densemap.service.engine.image_input import resize_uint8
from densemap.service.errors import InvalidOption, ModelLoadError
from tests.support.dense_models import build_two_head_model, make_two_head_net, small_layers
from tests.support.oracle import crop_by_crop, session_classifier

WINDOW, STRIDE, CLASSES, BOXES = (12, 16), 4, 5, 4
FP32_ATOL = 2e-5  # float32 against the float64 torch net (see test_engine_dense.py)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_two_head_model(tmp_path_factory.mktemp("two"), with_atrous=(2,), seed=3)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, config=EngineConfig(warmup=False))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).integers(0, 256, (45, 57, 3), dtype=np.uint8)


def whole_pass(model_path, image_chw, cells):
    """Both heads of one plain onnxruntime pass on the whole image, cropped to ``cells``."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    scores, boxes = session.run(["scores", "boxes"], {"input": image_chw[None]})
    return scores[0, :, : cells[0], : cells[1]], boxes[0, :, : cells[0], : cells[1]]


def crop_pass(model_path, image_chw, cells, stride):
    """Both heads of the crop-by-crop oracle at ``stride`` (one onnxruntime pass per crop)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    classify = session_classifier(session, ["scores", "boxes"])
    maps = crop_by_crop(classify, image_chw[None], window=WINDOW, stride=(stride,) * 2, cells=cells)
    return maps["scores"][0], maps["boxes"][0]


def cells_of(height, width, stride):
    return ((height - WINDOW[0]) // stride + 1, (width - WINDOW[1]) // stride + 1)


def test_engine_describes_every_head(engine):
    assert [(h.name, h.kind, h.channels) for h in engine.heads] == [
        ("scores", "logits", CLASSES),
        ("boxes", "regression", BOXES),
    ]
    assert engine.heads[1].labels == ("dx1", "dy1", "dx2", "dy2")
    assert engine.heads[0].labels == engine.labels


def test_native_stride_heads_equal_crops_and_the_float64_net(engine, model_path, image):
    result = engine.score(image, ScoreOptions(probabilities=False))
    scale_map = result.maps[0]
    assert [h.name for h in result.heads] == ["boxes"]
    assert set(scale_map.head_maps) == {"boxes"}
    boxes = scale_map.head_maps["boxes"]
    cells = cells_of(45, 57, STRIDE)
    assert boxes.shape == (BOXES, *cells) and boxes.dtype == np.float32
    image_chw = preprocess(image, engine.metadata.preprocessing)
    ref_scores, ref_boxes = crop_pass(model_path, image_chw, cells, STRIDE)
    np.testing.assert_array_equal(boxes, ref_boxes)  # raw values: never softmaxed
    np.testing.assert_array_equal(scale_map.scores, ref_scores)
    net = make_two_head_net(
        layers=small_layers(padded=False), window=WINDOW, channels=3, classes=CLASSES, seed=3
    ).double()
    with torch.no_grad():
        _, torch_boxes = net(torch.from_numpy(image_chw[None].astype(np.float64)))
    np.testing.assert_allclose(boxes, torch_boxes[0].numpy(), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("stride", [2, 1])
def test_finer_strides_carry_every_head(engine, model_path, image, stride):
    """Stride 2: one pass on the à-trous variant; stride 1: shift-and-stitch over it."""
    result = engine.score(image, ScoreOptions(output_stride=stride, probabilities=False))
    cells = cells_of(45, 57, stride)
    image_chw = preprocess(image, engine.metadata.preprocessing)
    ref_scores, ref_boxes = crop_pass(model_path, image_chw, cells, stride)
    boxes = result.maps[0].head_maps["boxes"]
    assert boxes.shape == (BOXES, *cells)
    assert result.maps[0].geometry.stride == (stride, stride)
    # à trous sums the same products in another order than the crops: float32 rounding only
    np.testing.assert_allclose(boxes, ref_boxes, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.maps[0].scores, ref_scores, atol=1e-5, rtol=0)


def test_shift_and_stitch_on_the_main_net_is_exact(tmp_path, image):
    path = build_two_head_model(tmp_path / "m", seed=4)  # no variant: 4 passes at stride 2
    engine = Engine(path, config=EngineConfig(warmup=False))
    result = engine.score(image, ScoreOptions(output_stride=2, probabilities=False))
    cells = cells_of(45, 57, 2)
    ref_scores, ref_boxes = crop_pass(
        path, preprocess(image, engine.metadata.preprocessing), cells, 2
    )
    np.testing.assert_array_equal(result.maps[0].head_maps["boxes"], ref_boxes)
    np.testing.assert_array_equal(result.maps[0].scores, ref_scores)


@pytest.mark.parametrize("padded", [False, True])
def test_forced_tiling_equals_one_pass(tmp_path, padded):
    path = build_two_head_model(tmp_path / "m", padded=padded, seed=5)
    image = np.random.default_rng(8).integers(0, 256, (70, 83, 3), dtype=np.uint8)
    whole = Engine(path, config=EngineConfig(warmup=False))
    options = ScoreOptions(probabilities=False, image_top_k=0)
    cost = whole.estimate_request(70, 83, options)
    budget = cost.held_bytes + cost.activation_bytes // 3  # a pass needs about 4 tiles
    tiled = Engine(path, config=EngineConfig(warmup=False, memory_budget=budget))
    assert tiled.estimate_request(70, 83, options).activation_bytes < cost.activation_bytes
    cells = cells_of(70, 83, STRIDE)
    ref_scores, ref_boxes = whole_pass(path, preprocess(image, whole.metadata.preprocessing), cells)
    for engine in (whole, tiled):
        result = engine.score(image, options)
        np.testing.assert_array_equal(result.maps[0].head_maps["boxes"], ref_boxes)
        np.testing.assert_array_equal(result.maps[0].scores, ref_scores)
    tiled_fine = tiled.score(image, ScoreOptions(output_stride=2, probabilities=False))
    whole_fine = whole.score(image, ScoreOptions(output_stride=2, probabilities=False))
    np.testing.assert_array_equal(
        tiled_fine.maps[0].head_maps["boxes"], whole_fine.maps[0].head_maps["boxes"]
    )


def test_scales_give_each_head_its_map(engine, model_path, image):
    result = engine.score(image, ScoreOptions(scales=(1.0, 1.5), probabilities=False))
    resized = resize_uint8(image, (68, 86))
    cells = cells_of(68, 86, STRIDE)
    _, ref_boxes = whole_pass(model_path, preprocess(resized, engine.metadata.preprocessing), cells)
    np.testing.assert_array_equal(result.maps[1].head_maps["boxes"], ref_boxes)
    assert result.maps[0].head_maps["boxes"].shape[1:] == result.maps[0].scores.shape[1:]


def test_map_dtype_and_fp16_precision(engine, image):
    exact = engine.score(image).maps[0].head_maps["boxes"]
    half_map = engine.score(image, ScoreOptions(dtype="float16")).maps[0].head_maps["boxes"]
    assert half_map.dtype == np.float16
    np.testing.assert_array_equal(half_map, exact.astype(np.float16))
    fp16 = engine.score(image, ScoreOptions(precision="fp16")).maps[0].head_maps["boxes"]
    assert fp16.dtype == np.float32 and fp16.shape == exact.shape
    spread = float(exact.max() - exact.min())
    assert 0 < np.abs(fp16 - exact).max() <= 5e-3 * spread  # rounded, but the same map


def test_requests_choose_heads(engine, image):
    primary_only = engine.score(image, ScoreOptions(heads=()))
    assert primary_only.maps[0].head_maps == {} and primary_only.heads == ()
    named = engine.score(image, ScoreOptions(heads=("boxes", "scores")))
    assert set(named.maps[0].head_maps) == {"boxes"}
    no_map = engine.score(image, ScoreOptions(include_map=False, heads=("boxes",)))
    assert no_map.maps[0].scores is None and no_map.maps[0].head_maps["boxes"] is not None
    with_heads = engine.estimate_request(45, 57)
    without = engine.estimate_request(45, 57, ScoreOptions(heads=()))
    assert with_heads.map_bytes - without.map_bytes == BOXES * 9 * 11 * 4


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        (("boxes", "landmarks"), "the model has no head(s) ['landmarks']: its heads are "
                                 "['scores', 'boxes']"),
        ("boxes", "heads must be a sequence of head names, got 'boxes'"),
        (("boxes", "boxes"), "heads holds duplicates: ['boxes', 'boxes']"),
    ],
)  # fmt: skip
def test_bad_head_requests_are_invalid_options(engine, image, heads, message):
    with pytest.raises(InvalidOption, match=r"^" + _escape(message)):
        engine.score(image, ScoreOptions(heads=heads))


def test_one_output_models_have_no_extra_heads(tmp_path, image):
    from tests.support.dense_models import build_dense_model

    engine = Engine(
        build_dense_model(tmp_path / "one", channels=3), config=EngineConfig(warmup=False)
    )
    assert [h.name for h in engine.heads] == ["scores"]
    result = engine.score(image)
    assert result.heads == () and result.maps[0].head_maps == {}
    with pytest.raises(
        InvalidOption, match=r"no head\(s\) \['boxes'\]: its heads are \['scores'\]$"
    ):
        engine.score(image, ScoreOptions(heads=("boxes",)))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (dict(output_names=("scores", "box")),
         r"model.onnx: the metadata names head\(s\) \['boxes'\], but the graph has inputs "
         r"\['input'\] and outputs \['scores', 'box'\]"),
        (dict(extra_heads=()),
         r"model.onnx: the graph has output\(s\) \['boxes'\] that the metadata does not list "
         r"as heads \(its heads are \['scores'\]\)"),
        (dict(box_kernel=(1, 1)),
         r"model.onnx: head 'boxes' gave 1x2 cells on a 12x16 input where the primary head "
         r"gives 1x1"),
        (dict(extra_heads=(Head("boxes", "regression", ("x", "y")),)),
         r"head 'boxes' has 4 channels but 2 labels \['x', 'y'\]"),
    ],
)  # fmt: skip
def test_outputs_that_do_not_match_the_heads_are_refused(tmp_path, build, message):
    path = build_two_head_model(tmp_path / "bad", **build)
    with pytest.raises(ModelLoadError, match=message):
        Engine(path, config=EngineConfig(warmup=False))


def test_a_variant_whose_heads_differ_is_refused(tmp_path):
    path = build_two_head_model(tmp_path / "m", with_atrous=(2,))
    other = build_two_head_model(tmp_path / "other", with_atrous=(2,), box_channels=3,
                                 extra_heads=(Head("boxes", "regression"),))  # fmt: skip
    (tmp_path / "m" / "model_s2.onnx").write_bytes((other.parent / "model_s2.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match="disagree on the channels of their heads"):
        Engine(path, config=EngineConfig(warmup=False))


def _escape(text: str) -> str:
    import re

    return re.escape(text)
