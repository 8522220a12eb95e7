"""Detections through the server: densemap.v1 (Python client, stream) and KServe v2
(stock tritonclient), equal to the in-process engine's on the square model."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service.client import DensemapClient
from densemap.service.engine import Engine, EngineConfig, ScoreOptions
from densemap.service.engine.options import DetectionOptions
from densemap.service.errors import InvalidOption
from densemap.service.server.codec import image_to_proto
from tests.support.server_harness import HOST, start_server
from tests.support.square_model import square_model, squares_image

MODEL = "squares"
IMAGE = squares_image(64, 72, [(0, 8, 16, 8), (1, 32, 32, 8), (0, 40, 4, 12), (1, 0, 52, 8)])
OPTIONS = ScoreOptions(
    output_stride=2,
    scales=(1.0, 2.0),
    include_map=False,
    detections=DetectionOptions(threshold=0.3, iou=0.3, max_count=7),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares-repo")
    square_model(root / MODEL)
    server, port = start_server(root)
    engine = Engine(root / MODEL / "model.onnx", config=EngineConfig(device="cpu", warmup=False))
    yield f"{HOST}:{port}", engine
    server.stop()


def test_densemap_v1_client_returns_the_engine_detections(served):
    target, engine = served
    expected = engine.score(IMAGE, OPTIONS).detections
    assert len(expected) == 7  # max_count cut the list
    with DensemapClient(target, timeout=30) as client:
        got = client.score(IMAGE, model=MODEL, **OPTIONS.__dict__)
        assert got.detections == expected  # boxes, scores, cells, labels: equal
        assert got.maps[0].scores is None
        (streamed,) = client.score_stream([IMAGE], model=MODEL, **OPTIONS.__dict__)
        assert streamed.detections == expected
        defaults = client.score(IMAGE, model=MODEL, detections=True).detections
        assert [d.box for d in defaults] == [d.box for d in engine.score(
            IMAGE, ScoreOptions(detections=DetectionOptions())
        ).detections]  # fmt: skip
        assert client.score(IMAGE, model=MODEL).detections is None


def test_bad_detection_options_are_invalid_argument(served):
    target, _ = served
    with pytest.raises(InvalidOption, match=r"detections.threshold must be in \[0, 1\]"):
        DetectionOptions(threshold=2.0)  # a Python client is refused before it sends
    request = pb.ScoreRequest(model=MODEL)  # a client that sends it anyway
    image_to_proto(IMAGE, request.image)
    request.options.detections.threshold = 2.0
    with DensemapClient(target, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client._stub.Score(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "detections.threshold must be in [0, 1]" in caught.value.details()


def kserve_request(image, **parameters):
    tensor = triton.InferInput("image", list(image.shape), "UINT8")
    tensor.set_data_from_numpy(image)
    return [tensor], parameters


def test_kserve_detection_outputs_follow_the_documented_layout(served):
    target, engine = served
    expected = engine.score(IMAGE, OPTIONS).detections
    inputs, parameters = kserve_request(
        IMAGE,
        output_stride=2,
        scales="1,2",
        detections=True,
        detection_threshold=0.3,
        detection_iou=0.3,
        detection_max_count=7,
    )
    with triton.InferenceServerClient(target) as client:
        result = client.infer(MODEL, inputs, parameters=parameters)
        rows = result.as_numpy("detections")
        assert rows.dtype == np.float32 and rows.shape == (7, 6)
        np.testing.assert_array_equal(
            rows, np.array([[*d.box, d.score, d.class_index] for d in expected], np.float32)
        )
        labels = result.as_numpy("detection_labels")
        assert [v.decode() for v in labels] == [d.label for d in expected]
        cells = result.as_numpy("detection_cells")
        assert cells.tolist() == [[d.scale_index, *d.cell] for d in expected]
        assert result.as_numpy("scores") is not None  # the parameters did not drop the map

        only = [triton.InferRequestedOutput(n) for n in ("detections", "detection_labels")]
        inputs, _ = kserve_request(IMAGE)
        narrow = client.infer(MODEL, inputs, outputs=only)
        assert narrow.as_numpy("scores") is None and narrow.as_numpy("detection_cells") is None
        defaults = engine.score(IMAGE, ScoreOptions(detections=DetectionOptions())).detections
        np.testing.assert_array_equal(
            narrow.as_numpy("detections")[:, :4], np.array([d.box for d in defaults], np.float32)
        )
        inputs, _ = kserve_request(np.zeros((16, 16, 3), np.uint8))
        empty = client.infer(MODEL, inputs, parameters={"detections": True})
        assert empty.as_numpy("detections").shape == (0, 6)
        assert empty.as_numpy("detection_labels").shape == (0,)


def test_kserve_detection_settings_without_detections_are_refused(served):
    target, _ = served
    inputs, _ = kserve_request(IMAGE)
    with triton.InferenceServerClient(target) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, inputs, parameters={"detection_threshold": 0.2})
    assert "also send detections=true" in str(caught.value)
    assert "StatusCode.INVALID_ARGUMENT" in str(caught.value)
