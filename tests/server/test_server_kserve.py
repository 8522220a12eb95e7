"""Stock tritonclient against `densemap serve`: values equal to the in-process engine."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from densemap.service.engine import ScoreOptions
from tests.support.server_harness import GREY, TINY, png_bytes, rgb_image


@pytest.fixture(scope="module")
def client(server):
    _, target = server
    with triton.InferenceServerClient(target) as triton_client:
        yield triton_client


def image_input(image: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    return tensor


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(TINY)
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata.name == "densemap"


def test_model_metadata_describes_the_image_input_and_outputs(client, engines):
    metadata = client.get_model_metadata(TINY)
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {"image": ("UINT8", [-1, -1, 3]), "image_bytes": ("BYTES", [1])}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs["scores"] == ("FP32", [-1, -1, -1])
    assert outputs["image_scores"] == ("FP32", [engines[TINY].num_classes])
    assert {"argmax", "top_k_indices", "top_k_scores"} <= set(outputs)
    assert client.get_model_metadata(GREY).inputs[0].shape == [-1, -1, 1]


def test_default_infer_equals_engine(client, engines):
    image = rgb_image()
    result = client.infer(TINY, [image_input(image)])
    expected = engines[TINY].score(image)
    np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)
    np.testing.assert_array_equal(result.as_numpy("image_scores"), expected.image_scores)
    assert result.as_numpy("scores").dtype == np.float32
    output = result.get_output("scores")
    assert output.parameters["stride"].string_param == "4,4"
    assert output.parameters["window"].string_param == "12,16"
    timing = result.get_response().parameters
    assert {"decode_ms", "queue_ms", "infer_ms", "encode_ms", "total_ms"} <= set(timing)


@pytest.mark.parametrize(
    ("parameters", "options"),
    [
        ({"output_stride": 2}, ScoreOptions(output_stride=2)),  # à-trous variant
        ({"output_stride": 1}, ScoreOptions(output_stride=1)),  # shift-and-stitch
        ({"scales": "1,1.5"}, ScoreOptions(scales=(1.0, 1.5))),
        ({"probabilities": False}, ScoreOptions(probabilities=False)),
        ({"dtype": "fp16"}, ScoreOptions(dtype="float16")),
        ({"classes": "3,0"}, ScoreOptions(classes=(3, 0))),
        ({"top_k": 2, "image_top_k": 1}, ScoreOptions(top_k=2, image_top_k=1)),
    ],
)
def test_infer_parameters_equal_engine_options(client, engines, parameters, options):
    image = rgb_image(seed=3)
    result = client.infer(TINY, [image_input(image)], parameters=parameters)
    expected = engines[TINY].score(image, options)
    for index, scale_map in enumerate(expected.maps):
        suffix = "" if index == 0 else f"_{index}"
        scores = result.as_numpy("scores" + suffix)
        assert scores.dtype == scale_map.scores.dtype
        np.testing.assert_array_equal(scores, scale_map.scores)
        stride = result.get_output("scores" + suffix).parameters["stride"].string_param
        assert stride == ",".join(map(str, scale_map.geometry.stride))
        if options.top_k:
            np.testing.assert_array_equal(
                result.as_numpy("top_k_indices" + suffix), scale_map.top_k_indices
            )
            np.testing.assert_array_equal(
                result.as_numpy("top_k_scores" + suffix), scale_map.top_k_scores
            )
    assert result.as_numpy(f"scores_{len(expected.maps)}") is None
    np.testing.assert_array_equal(result.as_numpy("image_scores"), expected.image_scores)


def test_requested_outputs_select_what_is_computed(client, engines):
    image = rgb_image(seed=4)
    outputs = [triton.InferRequestedOutput("argmax")]
    result = client.infer(TINY, [image_input(image)], outputs=outputs)
    expected = engines[TINY].score(image, ScoreOptions(argmax=True))
    np.testing.assert_array_equal(result.as_numpy("argmax"), expected.maps[0].argmax)
    assert result.as_numpy("scores") is None
    assert result.as_numpy("image_scores") is None


def test_encoded_image_as_bytes_input(client, engines):
    image = rgb_image(seed=5)
    encoded = png_bytes(image)
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([encoded], dtype=np.object_))
    result = client.infer(TINY, [tensor])
    expected = engines[TINY].score(encoded)
    np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)


def test_grey_model_takes_a_one_channel_image(client, engines):
    image = rgb_image(seed=6)[:, :, :1]
    result = client.infer(GREY, [image_input(image)])
    expected = engines[GREY].score(image)
    np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)


def test_reserved_tritonclient_parameters_are_ignored(client, engines):
    image = rgb_image(seed=7)
    result = client.infer(TINY, [image_input(image)], priority=1, timeout=10_000_000)
    expected = engines[TINY].score(image)
    np.testing.assert_array_equal(result.as_numpy("scores"), expected.maps[0].scores)


def test_unknown_parameter_lists_the_known_ones(client):
    with pytest.raises(InferenceServerException) as caught:
        client.infer(TINY, [image_input(rgb_image())], parameters={"stride": 2})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    for known in ("output_stride", "scales", "probabilities", "top_k", "dtype"):
        assert known in caught.value.message()


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as caught:
        client.infer("../etc", [image_input(rgb_image())])
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
