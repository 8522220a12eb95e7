"""A model with a class head and a box head, served: densemap.v1 (client and raw messages)
and KServe (stock tritonclient) carry both maps, equal to the engine and to a plain
onnxruntime pass; unknown heads are INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.client import DensemapClient, RemoteError
from densemap.service.contract import Head
from densemap.service.engine import Engine, HeadInfo, ScoreOptions, preprocess
from tests.support.dense_models import BOX_LABELS, build_two_head_model
from tests.support.server_harness import HOST, array_request, channel, rgb_image, start_server

MODEL, CLASH = "twohead", "clash"
WINDOW, STRIDE = (12, 16), 4


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    build_two_head_model(root / MODEL, with_atrous=(2,), seed=11)
    # a head named like a built-in KServe output
    build_two_head_model(
        root / CLASH,
        seed=12,
        output_names=("scores", "argmax"),
        extra_heads=(Head("argmax", "regression"),),
    )
    return root


@pytest.fixture(scope="module")
def target(repo):
    server, port = start_server(repo)
    yield f"{HOST}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def engine(repo):
    return Engine(repo / MODEL / "model.onnx", name=MODEL)


@pytest.fixture(scope="module")
def client(target):
    with DensemapClient(target, timeout=30) as densemap_client:
        yield densemap_client


@pytest.fixture(scope="module")
def triton_client(target):
    with triton.InferenceServerClient(target) as stock_client:
        yield stock_client


def plain_pass(repo, engine, image):
    """Both heads of one onnxruntime pass on the whole image, cropped to the cells."""
    session = ort.InferenceSession(str(repo / MODEL / "model.onnx"))
    image_chw = preprocess(image, engine.metadata.preprocessing)
    scores, boxes = session.run(["scores", "boxes"], {"input": image_chw[None]})
    n_h, n_w = (
        (image.shape[0] - WINDOW[0]) // STRIDE + 1,
        (image.shape[1] - WINDOW[1]) // STRIDE + 1,
    )
    return scores[0, :, :n_h, :n_w], boxes[0, :, :n_h, :n_w]


def test_get_model_lists_every_head(client, engine):
    info = client.get_model(MODEL)
    assert (
        info.heads
        == engine.heads
        == (
            HeadInfo("scores", "logits", tuple(f"class{i}" for i in range(5)), 5),
            HeadInfo("boxes", "regression", BOX_LABELS, 4),
        )
    )
    listed = {m.name: m for m in client.list_models()}[MODEL]
    assert [(h.name, h.kind, h.channels, h.labels) for h in listed.heads] == [
        ("scores", "logits", 5, ()),
        ("boxes", "regression", 4, ()),
    ]


def test_densemap_v1_returns_both_heads(client, engine, repo):
    image = rgb_image(40, 50, seed=1)
    result = client.score(image, model=MODEL, probabilities=False)
    ref_scores, ref_boxes = plain_pass(repo, engine, image)
    np.testing.assert_array_equal(result.maps[0].scores, ref_scores)
    np.testing.assert_array_equal(result.maps[0].head_maps["boxes"], ref_boxes)
    assert result.heads == (HeadInfo("boxes", "regression", BOX_LABELS, 4),)


@pytest.mark.parametrize(
    "options",
    [
        {"output_stride": 2},  # à-trous variant
        {"output_stride": 1},  # shift-and-stitch over it
        {"scales": (1.0, 1.5)},
        {"dtype": "float16"},
        {"include_map": False, "top_k": 2},
        {"heads": ()},
        {"heads": ("boxes",)},
    ],
)
def test_densemap_v1_options_equal_the_engine(client, engine, options):
    image = rgb_image(40, 50, seed=2)
    result = client.score(image, model=MODEL, **options)
    expected = engine.score(image, ScoreOptions(**options))
    assert result.heads == expected.heads
    for remote, local in zip(result.maps, expected.maps, strict=True):
        assert remote.head_maps.keys() == local.head_maps.keys()
        for name, values in local.head_maps.items():
            assert remote.head_maps[name].dtype == values.dtype
            np.testing.assert_array_equal(remote.head_maps[name], values)
        assert remote.geometry == local.geometry


def test_stream_carries_heads(client, engine):
    images = [rgb_image(40, 50, seed=s) for s in (3, 4)]
    for image, result in zip(images, client.score_stream(images, model=MODEL), strict=True):
        expected = engine.score(image).maps[0].head_maps["boxes"]
        np.testing.assert_array_equal(result.maps[0].head_maps["boxes"], expected)


def test_raw_messages_name_each_head(target, engine):
    image = rgb_image(40, 50, seed=5)
    stub = pb_grpc.DensemapStub(channel(target))
    response = stub.Score(array_request(image, model=MODEL), timeout=30)
    (head,) = response.maps[0].heads
    assert (head.name, head.kind, tuple(head.labels)) == ("boxes", "regression", BOX_LABELS)
    assert list(head.values.shape) == [4, 8, 9] and head.values.dtype == pb.FLOAT32
    expected = engine.score(image).maps[0].head_maps["boxes"]
    assert head.values.data == expected.tobytes()
    info = stub.GetModel(pb.GetModelRequest(name=MODEL), timeout=30)
    assert [(h.name, h.kind, h.channels) for h in info.heads] == [
        ("scores", "logits", 5),
        ("boxes", "regression", 4),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heads": ["landmarks"]}, "the model has no head(s) ['landmarks']: its heads are "
                                   "['scores', 'boxes']"),
        ({"heads": ["boxes"], "omit_heads": True}, "omit_heads is set but heads names ['boxes']"),
    ],
)  # fmt: skip
def test_unknown_heads_are_invalid_argument(target, options, message):
    stub = pb_grpc.DensemapStub(channel(target))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(array_request(rgb_image(seed=6), model=MODEL, **options), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(message)


def test_client_raises_for_an_unknown_head(client):
    with pytest.raises(RemoteError) as caught:
        client.score(rgb_image(seed=6), model=MODEL, heads=("landmarks",))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def image_input(image: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    return tensor


def test_kserve_metadata_lists_every_head(triton_client):
    outputs = {
        t.name: (t.datatype, list(t.shape)) for t in triton_client.get_model_metadata(MODEL).outputs
    }
    assert outputs["boxes"] == ("FP32", [4, -1, -1])
    assert outputs["scores"] == ("FP32", [-1, -1, -1])
    clash = {t.name for t in triton_client.get_model_metadata(CLASH).outputs}
    assert {"argmax", "head_argmax"} <= clash


def test_kserve_returns_one_tensor_per_head(triton_client, engine, repo):
    image = rgb_image(40, 50, seed=7)
    result = triton_client.infer(MODEL, [image_input(image)], parameters={"probabilities": False})
    ref_scores, ref_boxes = plain_pass(repo, engine, image)
    np.testing.assert_array_equal(result.as_numpy("scores"), ref_scores)
    np.testing.assert_array_equal(result.as_numpy("boxes"), ref_boxes)
    output = result.get_output("boxes")
    assert output.parameters["kind"].string_param == "regression"
    assert output.parameters["stride"].string_param == "4,4"


def test_kserve_requested_outputs_select_heads(triton_client, engine):
    image = rgb_image(40, 50, seed=8)
    outputs = [triton.InferRequestedOutput("boxes_1")]
    result = triton_client.infer(
        MODEL, [image_input(image)], outputs=outputs, parameters={"scales": "1,1.5"}
    )
    expected = engine.score(image, ScoreOptions(scales=(1.0, 1.5)))
    np.testing.assert_array_equal(result.as_numpy("boxes_1"), expected.maps[1].head_maps["boxes"])
    for absent in ("boxes", "scores", "scores_1", "image_scores"):
        assert result.as_numpy(absent) is None
    only_scores = triton_client.infer(
        MODEL, [image_input(image)], outputs=[triton.InferRequestedOutput("scores")]
    )
    assert only_scores.as_numpy("boxes") is None
    np.testing.assert_array_equal(only_scores.as_numpy("scores"), expected.maps[0].scores)


def test_kserve_unknown_output_names_the_outputs(triton_client):
    outputs = [triton.InferRequestedOutput("landmarks")]
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer(MODEL, [image_input(rgb_image(seed=9))], outputs=outputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output(s) ['landmarks']: this request can give" in caught.value.message()
    assert "'boxes'" in caught.value.message()


def test_kserve_head_named_like_a_built_in_output(triton_client, repo):
    image = rgb_image(40, 50, seed=10)
    clash = Engine(repo / CLASH / "model.onnx", name=CLASH)
    result = triton_client.infer(
        CLASH,
        [image_input(image)],
    )
    np.testing.assert_array_equal(
        result.as_numpy("head_argmax"), clash.score(image).maps[0].head_maps["argmax"]
    )
    assert result.as_numpy("argmax") is None  # the per-cell argmax was not asked for
