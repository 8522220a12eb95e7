"""Calls that never finish their request hold no thread.

A raw HTTP/2 client (``hostile_clients``) opens calls whose HEADERS arrive and whose body
never does, or drips in a byte at a time. On the old thread-per-call server, 4 such health
``Check`` calls made every probe time out and 32 such ``Score`` calls stopped all scoring.
On the aio server they hold no thread: probes, metadata and scoring all answer while they
are open, and a call without the required token is refused at once, body or not.
"""

from __future__ import annotations

import grpc
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from tests.support.hostile_clients import StalledCalls
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

CHECK = "/grpc.health.v1.Health/Check"
SCORE = "/densemap.v1.Densemap/Score"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_request() -> kserve_pb.ModelInferRequest:
    image = rgb_image()
    request = kserve_pb.ModelInferRequest(model_name=TINY)
    request.inputs.add(name="image", datatype="UINT8", shape=list(image.shape))
    request.raw_input_contents.append(image.tobytes())
    return request


def assert_everything_answers(chan, srv) -> None:
    stub = pb_grpc.DensemapStub(chan)
    for service in ("", "readiness", "liveness", TINY):
        assert health_of(chan, service) == SERVING  # within health_of's 5 s deadline
    assert stub.GetModel(pb.GetModelRequest(name=TINY), timeout=5).name == TINY
    for _ in range(3):
        assert stub.Score(array_request(rgb_image()), timeout=30).maps
        kserve = kserve_grpc.GRPCInferenceServiceStub(chan)
        assert kserve.ModelInfer(infer_request(), timeout=30).raw_output_contents
    assert srv.admission.admitted == 0  # the stalled calls hold no scoring slot


def test_64_headers_only_and_40_dripping_calls_leave_probes_and_scoring_served(repo):
    # 6 scoring threads: the thread-per-call server had 6 threads for all of this. Each held Score
    # or ModelInfer call holds room for the largest request (uploads.py): a budget with
    # room for all 88 (512 MiB each; tests/server/test_server_uploads.py: one without)
    srv, port = start_server(repo, scoring_threads=6, memory_limit=64 << 30)
    stalled: list[StalledCalls] = []
    try:
        for path in (CHECK, SCORE, INFER, SCORE):
            stalled.append(StalledCalls(HOST, port, path, 16))
        for path in (SCORE, INFER, SCORE, INFER):
            stalled.append(StalledCalls(HOST, port, path, 10, drip=0.05))
        with channel(f"{HOST}:{port}") as chan:
            assert_everything_answers(chan, srv)
        assert sum(len(calls.streams) for calls in stalled) == 104
        assert all(calls.ended() == 0 for calls in stalled)  # all still open meanwhile
    finally:
        for calls in stalled:
            calls.close()
        srv.stop()


def test_calls_without_the_token_are_refused_before_their_body(repo):
    srv, port = start_server(repo, scoring_threads=6, auth_token="s3cret")
    stalled = []
    try:
        stalled = [StalledCalls(HOST, port, SCORE, 16) for _ in range(2)]
        for calls in stalled:  # UNAUTHENTICATED at once, though no body ever came
            wait_until(lambda calls=calls: calls.ended() == 16, what="the refusals")
        events = stalled[0].connection.events
        statuses = {
            dict(event.headers).get("grpc-status")
            for event in events
            if type(event).__name__ == "TrailersReceived"
            or (hasattr(event, "headers") and "grpc-status" in dict(event.headers))
        }
        assert statuses == {str(grpc.StatusCode.UNAUTHENTICATED.value[0])}
        with channel(f"{HOST}:{port}") as chan:
            metadata = (("authorization", "Bearer s3cret"),)
            stub = pb_grpc.DensemapStub(chan)
            assert stub.Score(array_request(rgb_image()), timeout=30, metadata=metadata).maps
            assert health_of(chan, "readiness") == SERVING
    finally:
        for calls in stalled:
            calls.close()
        srv.stop()
