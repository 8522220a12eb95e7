"""Open streams: idle ones hold no scoring slot, are capped per peer and in all, time out."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.server.status import ServerBusy, StreamIdle
from densemap.service.server.streams import StreamLimits, idle_limited, peer_host
from tests.support.server_fakes import wait_until
from tests.support.server_harness import (
    HOST,
    SERVING,
    TINY,
    array_request,
    channel,
    health_of,
    rgb_image,
    start_server,
)

Code = grpc.StatusCode


def _silent(stop: threading.Event):
    """A request iterator that sends nothing until ``stop`` is set."""
    stop.wait(30)
    return
    yield  # pragma: no cover - makes this a generator


def _infer_request() -> kserve_pb.ModelInferRequest:
    image = rgb_image()
    request = kserve_pb.ModelInferRequest(model_name=TINY)
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(image.shape))
    assert tensor.name == "image"
    request.raw_input_contents.append(image.tobytes())
    return request


def test_idle_streams_hold_no_scoring_slot_and_are_capped_per_peer(repo):
    # scoring_threads 6: 2 scoring slots. Before, 2 idle streams took both: every Score failed.
    srv, port = start_server(repo, scoring_threads=6, max_streams=8, max_streams_per_peer=3)
    stop = threading.Event()
    try:
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            streams = [stub.ScoreStream(_silent(stop), timeout=30) for _ in range(3)]
            wait_until(lambda: srv.stream_limits.open == 3, what="3 open streams")
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.ScoreStream(_silent(stop), timeout=10))
            assert caught.value.code() == Code.RESOURCE_EXHAUSTED
            assert "this client address already has 3 open streams" in caught.value.details()
            assert "--max-streams-per-peer 3" in caught.value.details()
            assert srv.admission.admitted == 0
            for _ in range(3):  # scoring, KServe, health and metadata all answer
                assert stub.Score(array_request(rgb_image()), timeout=30).maps
                kserve = kserve_grpc.GRPCInferenceServiceStub(chan)
                assert kserve.ModelInfer(_infer_request(), timeout=30).raw_output_contents
            assert health_of(chan, "readiness") == SERVING
            assert stub.GetModel(pb.GetModelRequest(name=TINY), timeout=5)
            stop.set()
            for stream in streams:
                assert list(stream) == []
            wait_until(lambda: srv.stream_limits.open == 0, what="the streams to close")
    finally:
        stop.set()
        srv.stop()


def test_a_stream_that_sends_nothing_ends_after_the_idle_timeout(repo):
    srv, port = start_server(repo, stream_idle_seconds=0.3)
    stop = threading.Event()
    try:
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            with pytest.raises(grpc.RpcError) as caught:
                next(stub.ScoreStream(_silent(stop), timeout=20))
            assert caught.value.code() == Code.UNAVAILABLE
            assert "the stream sent no request for 0.3 s" in caught.value.details()
            assert "--stream-idle-seconds" in caught.value.details()

            def one_then_silence():
                yield array_request(rgb_image())
                stop.wait(30)

            stream = stub.ScoreStream(one_then_silence(), timeout=20)
            assert next(stream).maps  # idle time counts only while the server waits
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
            assert caught.value.code() == Code.UNAVAILABLE
            wait_until(lambda: srv.stream_limits.open == 0, what="the slots to be freed")
    finally:
        stop.set()
        srv.stop()


def test_drain_ends_idle_streams_at_once_with_unavailable(repo):
    srv, port = start_server(repo)
    stop = threading.Event()
    try:
        with channel(f"{HOST}:{port}") as chan:
            stream = pb_grpc.DensemapStub(chan).ScoreStream(_silent(stop), timeout=20)
            wait_until(lambda: srv.stream_limits.open == 1, what="the stream to open")
            drained = srv.drain(grace=10)
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
            assert caught.value.code() == Code.UNAVAILABLE
            assert "shutting down" in caught.value.details()
            assert drained  # the idle stream did not hold the drain for its grace
    finally:
        stop.set()
        srv.stop()


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:127.0.0.1:50000") == "ipv4:127.0.0.1"
    assert peer_host("ipv6:[::1]:50000") == "ipv6:[::1]"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"


def test_stream_limits_cap_in_all_and_per_peer():
    limits = StreamLimits(max_streams=3, max_per_peer=2)
    with limits.slot("ipv4:10.0.0.1:1"), limits.slot("ipv4:10.0.0.1:2"):
        with pytest.raises(ServerBusy, match="--max-streams-per-peer 2"):
            with limits.slot("ipv4:10.0.0.1:3"):
                pass
        with limits.slot("ipv4:10.0.0.2:1"):
            with pytest.raises(ServerBusy, match="--max-streams 3"):
                with limits.slot("ipv4:10.0.0.3:1"):
                    pass
    assert limits.open == 0


def test_idle_limited_passes_requests_and_times_out():
    async def scenario():
        gate = asyncio.Event()

        async def requests():
            yield 1
            yield 2
            await gate.wait()

        reader = idle_limited(requests(), idle_seconds=0.05)
        assert [await anext(reader), await anext(reader)] == [1, 2]
        with pytest.raises(StreamIdle, match="no request for 0.05 s"):
            await anext(reader)

        async def three():
            for value in np.arange(3):
                yield value

        assert [v async for v in idle_limited(three(), idle_seconds=5)] == [0, 1, 2]
        stopping = idle_limited(requests(), idle_seconds=5, stopping=lambda: ServerBusy("drain"))
        assert await anext(stopping) == 1
        assert await anext(stopping) == 2
        with pytest.raises(ServerBusy, match="drain"):
            await anext(stopping)  # the drain ends a waiting stream long before its idle time

    asyncio.run(scenario())
