"""densemap.v1 through the Python client: every option round-trips equal to the engine."""

from __future__ import annotations

import numpy as np
import pytest

from densemap.service.contract import CONTRACT_VERSION
from densemap.service.engine import HeadInfo, ScoreOptions, preprocess
from densemap.service.engine.result import ScoreResult
from tests.support.server_harness import GREY, TINY, png_bytes, rgb_image


def assert_same_result(got: ScoreResult, expected: ScoreResult) -> None:
    assert len(got.maps) == len(expected.maps)
    for remote, local in zip(got.maps, expected.maps, strict=True):
        assert remote.geometry == local.geometry
        assert remote.classes == local.classes
        for name in ("scores", "top_k_indices", "top_k_scores", "argmax"):
            want = getattr(local, name)
            have = getattr(remote, name)
            if want is None:
                assert have is None, name
            else:
                assert have.dtype == want.dtype, name
                np.testing.assert_array_equal(have, want, err_msg=name)
        assert set(remote.head_maps) == set(local.head_maps)
        for name, want in local.head_maps.items():
            assert remote.head_maps[name].dtype == want.dtype, name
            np.testing.assert_array_equal(remote.head_maps[name], want, err_msg=name)
    assert got.heads == expected.heads
    np.testing.assert_array_equal(got.image_scores, expected.image_scores)
    assert [i for i, _ in got.image_top_k] == [i for i, _ in expected.image_top_k]
    np.testing.assert_array_equal(
        [s for _, s in got.image_top_k], np.float32([s for _, s in expected.image_top_k])
    )
    assert got.image_size == expected.image_size
    assert got.labels == expected.labels


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"output_stride": 2},
        {"output_stride": 1},
        {"scales": (1.0, 0.8, 1.5)},
        {"probabilities": False},
        {"dtype": "float16"},
        {"top_k": 3},
        {"classes": (4, 1)},
        {"classes": (4, 1), "top_k": 2, "argmax": True},
        {"argmax": True},
        {"argmax": True, "include_map": False},
        {"image_top_k": 0},
        {"image_top_k": 5, "probabilities": False, "dtype": "float16", "output_stride": 2},
    ],
    ids=repr,
)
def test_score_round_trip_equals_engine(client, engines, options):
    image = rgb_image(45, 61, seed=11)
    got = client.score(image, model=TINY, **options)
    expected = engines[TINY].score(image, ScoreOptions(**options))
    assert_same_result(got, expected)
    assert set(got.timings) == {"decode", "queue", "infer", "encode", "total"}
    assert got.timings["total"] >= got.timings["infer"] > 0


def test_encoded_bytes_path_and_float_inputs(client, engines, tmp_path):
    image = rgb_image(30, 33, seed=12)
    encoded = png_bytes(image)
    path = tmp_path / "image.png"
    path.write_bytes(encoded)
    expected = engines[TINY].score(encoded)
    assert_same_result(client.score(encoded, model=TINY), expected)
    assert_same_result(client.score(path, model=TINY), expected)
    float_chw = preprocess(image, engines[TINY].metadata.preprocessing)
    assert_same_result(client.score(float_chw, model=TINY), engines[TINY].score(float_chw))


def test_grey_model_with_two_dimensional_image(client, engines):
    image = rgb_image(20, 20, seed=13)[:, :, 0]
    got = client.score(image, model=GREY, top_k=1)
    assert_same_result(got, engines[GREY].score(image, ScoreOptions(top_k=1)))
    assert got.labels == ("a", "b", "c")


def test_score_stream_keeps_order_and_reports_item_errors(client, engines):
    images = [rgb_image(20 + 3 * i, 30, seed=20 + i) for i in range(4)]
    images.insert(2, rgb_image(5, 5))  # smaller than the 12x16 window
    results = list(client.score_stream(images, model=TINY, return_errors=True, top_k=1))
    assert len(results) == 5
    error = results.pop(2)
    assert error.code.name == "INVALID_ARGUMENT" and "window" in error.details
    for image, result in zip(images[:2] + images[3:], results, strict=True):
        assert_same_result(result, engines[TINY].score(image, ScoreOptions(top_k=1)))


def test_list_and_get_models(client, engines):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {TINY, GREY}
    assert models[TINY].labels == ()  # ListModels leaves labels out
    info = client.get_model(TINY)
    engine = engines[TINY]
    assert info.labels == engine.labels
    assert info.num_classes == engine.num_classes == 5
    assert info.geometry == engine.metadata.geometry
    assert info.preprocessing == engine.metadata.preprocessing
    assert info.supported_strides == engine.supported_strides == (4, 2, 1)
    assert info.output_kind == "logits" and info.contract_version == CONTRACT_VERSION
    assert info.heads == engine.heads == (HeadInfo("scores", "logits", engine.labels, 5),)
    assert info.providers == engine.providers
    assert client.load_failures() == {}
