"""Issue 11, point 2: a request's cost is checked before any work, on both APIs.

The costly request of the issue (a 64x64 PNG, scales [31.25] * 4, stride 1: a 152-byte
request whose response would be hundreds of MiB) is refused from its header and options;
the engine's ``score`` is never called, so no pixel is decoded and no pass runs.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine import ModelRepository
from densemap.service.server.app import create_server
from densemap.service.server.config import server_engine_config
from tests.support.server_harness import HOST, TINY, channel, png_bytes, rgb_image, test_config

Code = grpc.StatusCode
COSTLY = {"output_stride": 1, "scales": [31.25] * 4}


class CountingRepository:
    """A real repository whose engines count their ``score`` calls."""

    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository
        self.names = repository.names
        self.errors = {}
        self.scored = 0

    def get(self, name: str):
        outer = self

        class Counting:
            def __getattr__(self, attribute):
                return getattr(outer._repository.get(name), attribute)

            def score(self, *args, **kwargs):
                outer.scored += 1
                return outer._repository.get(name).score(*args, **kwargs)

        return Counting()


def serve(models_dir, **overrides):
    holder = {}

    def open_repository():
        holder["repo"] = CountingRepository(ModelRepository(models_dir, config=config.engine))
        return holder["repo"]

    config = test_config(models_dir, **overrides)
    server, port = create_server(config, open_repository=open_repository)
    assert server.wait_ready(30)
    return server, f"{HOST}:{port}", holder["repo"]


def encoded_request(data: bytes, **options) -> pb.ScoreRequest:
    request = pb.ScoreRequest(model=TINY, options=pb.ScoreOptions(**options))
    request.image.encoded = data
    return request


def refused(call, request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED, caught.value.details()
    return caught.value.details()


@pytest.fixture(scope="module")
def served(repo):
    server, target, counting = serve(repo)
    yield target, counting
    server.stop()


def test_the_issues_costly_request_is_refused_before_any_work(served):
    target, counting = served
    data = png_bytes(rgb_image(64, 64, seed=1))
    request = encoded_request(data, **COSTLY)
    with channel(target) as chan:
        details = refused(pb_grpc.DensemapStub(chan).Score, request)
        # 4 maps of 1989 x 1985 cells x 5 classes x 4 bytes
        assert "the response would be at least 301.2 MiB" in details
        assert "message limit of 256.0 MiB" in details and "coarser output_stride" in details
        stream = list(pb_grpc.DensemapStub(chan).ScoreStream(iter([request]), timeout=30))
        assert stream[0].error.code_name == "RESOURCE_EXHAUSTED"
        assert "at least 301.2 MiB" in stream[0].error.message
    assert counting.scored == 0


def test_kserve_counts_only_the_outputs_asked_for(repo):
    server, target, counting = serve(repo, max_message_bytes=1 << 20)
    data = png_bytes(rgb_image(64, 64, seed=2))
    tensor = triton.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    parameters = {"scales": "8", "output_stride": 2}  # 251 x 249 cells: 1.2 MiB of scores
    try:
        with triton.InferenceServerClient(target) as client:
            with pytest.raises(triton.InferenceServerException) as caught:
                client.infer(TINY, [tensor], parameters=parameters)
            assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "would be at least 1.2 MiB" in caught.value.message()
            assert counting.scored == 0
            argmax = [triton.InferRequestedOutput("argmax")]  # 244 KiB: served
            result = client.infer(TINY, [tensor], parameters=parameters, outputs=argmax)
            assert result.as_numpy("argmax").shape == (251, 249)
            assert counting.scored == 1
    finally:
        server.stop()


def test_maps_over_the_memory_budget_are_refused_before_any_work(repo):
    engine = server_engine_config()
    budget = 8 << 20  # the maps alone: 1989 x 1985 x 5 x 2 bytes = 37.6 MiB
    engine = type(engine)(max_pixels=engine.max_pixels, memory_budget=budget)
    server, target, counting = serve(repo, engine=engine)
    data = png_bytes(rgb_image(64, 64, seed=3))
    try:
        with channel(target) as chan:
            stub = pb_grpc.DensemapStub(chan)
            request = encoded_request(data, output_stride=1, scales=[31.25], dtype=pb.FLOAT16)
            details = refused(stub.Score, request)
            assert "maps and working copies need about" in details
            assert "memory budget of 8.0 MiB" in details and "fewer or smaller scales" in details
            assert counting.scored == 0
            small = encoded_request(data, output_stride=4)  # 14 x 13 cells: served
            assert stub.Score(small, timeout=30).maps[0].cells.h == 14
            assert counting.scored == 1
    finally:
        server.stop()
