"""A request's cost, known from the image header and the options before any work
(service/engine/cost.py): exact map bytes, a budget that covers maps and copies, refusals
before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from densemap.service.engine import Engine, EngineConfig, ScoreOptions, image_input
from densemap.service.engine.cost import RequestCost
from densemap.service.errors import ImageTooLarge, ImageTooSmall, InvalidImage, InvalidOption
from tests.support.dense_models import build_dense_model

CLASSES = 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    return build_dense_model(root / "m", channels=3, classes=CLASSES, with_atrous=(2,), seed=3)


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, config=EngineConfig(warmup=False))


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(image: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


OPTIONS = [
    ScoreOptions(),
    ScoreOptions(output_stride=1, scales=(1.0, 0.7), dtype="float16"),
    ScoreOptions(output_stride=2, top_k=3, argmax=True, include_map=False),
    ScoreOptions(classes=(4, 1), top_k=2, scales=(1.3,)),
]


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "s1-fp16", "s2-topk", "classes"])
def test_map_bytes_and_cells_are_those_of_the_returned_arrays(engine, options):
    image = rgb(45, 61, seed=1)
    cost = engine.estimate_request(45, 61, options)
    result = engine.score(image, options)
    assert isinstance(cost, RequestCost) and cost.image_size == (45, 61)
    assert len(cost.scales) == len(result.maps)
    for scale_cost, scale_map in zip(cost.scales, result.maps, strict=True):
        arrays = {
            name: getattr(scale_map, name)
            for name in ("scores", "top_k_scores", "top_k_indices", "argmax")
            if getattr(scale_map, name) is not None
        }
        assert scale_cost.outputs == {name: array.nbytes for name, array in arrays.items()}
        assert scale_cost.cells == scale_map.shape
    assert cost.map_bytes == sum(
        array.nbytes
        for scale_map in result.maps
        for array in (scale_map.scores, scale_map.top_k_scores, scale_map.top_k_indices)
        if array is not None
    ) + sum(m.argmax.nbytes for m in result.maps if m.argmax is not None)
    assert cost.held_bytes >= 45 * 61 * 3 + cost.map_bytes


def test_a_tiled_request_fits_the_budget_with_its_maps(model_path, engine):
    options = ScoreOptions(output_stride=1, top_k=2)
    untiled = engine.estimate_request(90, 120, options)
    budget = untiled.held_bytes + untiled.scales[0].pass_bytes // 3
    tight = Engine(model_path, config=EngineConfig(warmup=False, memory_budget=budget))
    cost = tight.estimate_request(90, 120, options)
    assert cost.activation_budget == budget - cost.held_bytes
    assert cost.activation_bytes <= cost.activation_budget < cost.scales[0].pass_bytes
    assert cost.peak_bytes <= budget
    image = rgb(90, 120, seed=2)
    tiled = tight.score(image, options).maps[0]
    whole = engine.score(image, options).maps[0]
    np.testing.assert_array_equal(tiled.top_k_indices, whole.top_k_indices)
    np.testing.assert_allclose(tiled.scores, whole.scores, rtol=0, atol=1e-6)


def test_maps_over_the_budget_are_refused_before_any_pixel_is_decoded(model_path, monkeypatch):
    options = ScoreOptions(output_stride=1, scales=(4.0, 4.0))
    data = png(rgb(64, 64))
    free = Engine(model_path, config=EngineConfig(warmup=False))
    cost = free.estimate_image(data, options)
    assert cost.image_size == (64, 64) and cost.scales[0].size == (256, 256)
    small = Engine(model_path, config=EngineConfig(warmup=False, memory_budget=cost.map_bytes))

    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(image_input, "decode", no_decoding)
    monkeypatch.setattr(image_input, "resize_uint8", no_decoding)
    with pytest.raises(ImageTooLarge) as caught:
        small.score(data, options)
    message = str(caught.value)
    assert "maps and working copies need about" in message
    assert f"memory budget of {cost.map_bytes / 2**20:.1f} MiB" in message
    assert "coarser output_stride" in message and "dtype float16" in message


def test_a_pass_that_cannot_fit_beside_the_maps_is_refused_by_name(model_path, engine):
    held = engine.estimate_request(80, 80).held_bytes
    tight = Engine(model_path, config=EngineConfig(warmup=False, memory_budget=held + 64))
    with pytest.raises(ImageTooLarge, match="even a tile of one cell") as caught:
        tight.estimate_request(80, 80)
    assert f"after {held} bytes of maps and copies" in str(caught.value)
    off = Engine(
        model_path, config=EngineConfig(warmup=False, memory_budget=held + 64, tiling=False)
    )
    with pytest.raises(ImageTooLarge, match="tiling is off"):
        off.score(rgb(80, 80))


def test_the_header_gives_the_size_after_exif_orientation(engine):
    image = rgb(40, 70, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: height and width swap
    data = png(image, format="JPEG", exif=exif.tobytes())
    assert image_input.read_size(data, max_pixels=10**6) == (70, 40)
    cost = engine.estimate_image(data)
    assert cost.image_size == (70, 40) == engine.score(data).image_size


def test_estimates_refuse_what_score_refuses(engine):
    with pytest.raises(InvalidOption, match="output_stride 3"):
        engine.estimate_request(40, 40, ScoreOptions(output_stride=3))
    with pytest.raises(ImageTooSmall, match="smaller than the model's window"):
        engine.estimate_request(8, 40)
    with pytest.raises(ImageTooLarge, match="at scale 1000"):
        engine.estimate_request(40, 40, ScoreOptions(scales=(1000.0,)))
    with pytest.raises(InvalidImage, match="cannot decode"):
        engine.estimate_image(b"not an image")
    with pytest.raises(InvalidImage, match="no pixel"):
        engine.estimate_image(np.zeros((0, 5, 3), np.uint8))
    float_cost = engine.estimate_image(np.zeros((3, 30, 40), np.float32))
    assert float_cost.image_size == (30, 40) and float_cost.image_bytes == 3 * 30 * 40 * 4


def test_graph_macs_count_conv_grouped_conv_and_gemm():
    from onnx import TensorProto, helper, shape_inference

    from densemap.service.engine.memory import graph_macs

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"]),  # 3 -> 8, 3x3: 8 x 8 x 10 out
        helper.make_node("Conv", ["a", "w2"], ["b"], group=4),  # 8 -> 8, 2 per group, 1x1
        helper.make_node("Flatten", ["b"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"]),  # 640 -> 7
    ]
    weights = [
        helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 3, 3, 3]),
        helper.make_tensor_value_info("w2", TensorProto.FLOAT, [8, 2, 1, 1]),
        helper.make_tensor_value_info("w3", TensorProto.FLOAT, [640, 7]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 12]), *weights],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    inferred = shape_inference.infer_shapes(helper.make_model(graph)).graph
    expected = 8 * 10 * 8 * (3 * 3 * 3) + 8 * 10 * 8 * 2 + 7 * 640
    assert graph_macs(inferred) == expected


def test_request_macs_count_every_pass_of_every_scale(engine):
    # stride 1 runs the stride-2 à-trous variant at 2 x 2 shifts
    assert engine.estimate_macs(60, 64, output_stride=1) == 4 * engine.estimate_macs(
        60, 64, output_stride=2
    )
    assert engine.estimate_macs(60, 64, output_stride=4) == engine.estimate_macs(60, 64)
    options = ScoreOptions(output_stride=1, scales=(1.0, 0.5))
    cost = engine.estimate_request(60, 64, options)
    assert cost.macs == sum(
        engine.estimate_macs(*scale.size, output_stride=1) for scale in cost.scales
    )
    assert cost.scales[1].macs < cost.scales[0].macs and cost.scales[1].macs > 0
