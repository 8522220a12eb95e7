"""Health transitions, drain, reflection, backpressure, deadlines and cancellation."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.engine import ModelRepository
from densemap.service.server.app import create_server
from tests.support.server_fakes import BlockingRepository, wait_until
from tests.support.server_harness import (
    HOST,
    NOT_SERVING,
    SERVING,
    TINY,
    array_request,
    channel,
    free_port,
    health_of,
    rgb_image,
    start_server,
    test_config,
)

Code = grpc.StatusCode


def score_code(stub, request, timeout: float = 30) -> grpc.StatusCode:
    try:
        stub.Score(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


@pytest.fixture()
def blocking_server(repo):
    """(server, channel, release event, blocking repository) with max_in_flight=1, max_queue=1."""
    release = threading.Event()
    load = threading.Event()
    holder = {}

    def open_repository():
        assert load.wait(20)
        holder["repo"] = BlockingRepository(ModelRepository(repo), release)
        return holder["repo"]

    srv, port = create_server(
        test_config(repo, max_in_flight=1, max_queue=1), open_repository=open_repository
    )
    chan = channel(f"{HOST}:{port}")
    try:
        yield srv, chan, release, load, holder
    finally:
        release.set()
        load.set()
        chan.close()
        srv.stop()


def test_health_transitions_load_serve_drain(blocking_server):
    srv, chan, release, load, holder = blocking_server
    stub = pb_grpc.DensemapStub(chan)
    kserve = kserve_grpc.GRPCInferenceServiceStub(chan)
    # loading: alive, not ready, scoring refused
    assert health_of(chan, "liveness") == SERVING
    assert health_of(chan, "readiness") == NOT_SERVING
    assert health_of(chan, "") == NOT_SERVING
    assert health_of(chan, TINY) == Code.NOT_FOUND
    assert not kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5).ready
    assert kserve.ServerLive(kserve_pb.ServerLiveRequest(), timeout=5).live
    assert score_code(stub, array_request(rgb_image())) == Code.UNAVAILABLE
    # loaded: ready, per-model status
    load.set()
    assert srv.wait_ready(20)
    for service in ("", "readiness", "liveness", TINY):
        assert health_of(chan, service) == SERVING
    assert kserve.ModelReady(kserve_pb.ModelReadyRequest(name=TINY), timeout=5).ready
    # drain with one request in flight: it finishes, new calls are refused
    in_flight = stub.Score.future(array_request(rgb_image()), timeout=30)
    wait_until(holder["repo"].get(TINY).started.is_set, what="the request to start")
    drained = {}
    drainer = threading.Thread(target=lambda: drained.update(done=srv.drain(grace=20)))
    drainer.start()
    wait_until(lambda: srv.state.draining, what="drain to start")
    assert health_of(chan, "readiness") == NOT_SERVING
    assert health_of(chan, TINY) == NOT_SERVING
    assert health_of(chan, "liveness") == SERVING
    assert not kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5).ready
    assert score_code(stub, array_request(rgb_image())) == Code.UNAVAILABLE
    assert in_flight.running()
    release.set()
    assert in_flight.result(timeout=20).maps  # the in-flight call completed
    drainer.join(20)
    assert drained == {"done": True}


def test_queue_full_is_resource_exhausted_and_deadline_in_queue_never_starts(blocking_server):
    srv, chan, release, load, holder = blocking_server
    load.set()
    assert srv.wait_ready(20)
    stub = pb_grpc.DensemapStub(chan)
    first = stub.Score.future(array_request(rgb_image()), timeout=30)
    engine = holder["repo"].get(TINY)
    wait_until(engine.started.is_set, what="the first request to start")
    queued = stub.Score.future(array_request(rgb_image()), timeout=0.5)
    wait_until(lambda: srv.admission.counts(TINY) == (1, 1), what="the second request to queue")
    assert score_code(stub, array_request(rgb_image())) == Code.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as caught:
        queued.result(timeout=20)
    assert caught.value.code() == Code.DEADLINE_EXCEEDED
    release.set()
    assert first.result(timeout=20).maps
    assert engine.calls == 1  # the expired request was never started
    assert score_code(stub, array_request(rgb_image())) == Code.OK


def test_client_cancel_reaches_the_engine_cancel_hook(blocking_server):
    srv, chan, release, load, holder = blocking_server
    load.set()
    assert srv.wait_ready(20)
    stub = pb_grpc.DensemapStub(chan)
    call = stub.Score.future(array_request(rgb_image()), timeout=30)
    wait_until(holder["repo"].get(TINY).started.is_set, what="the request to start")
    call.cancel()
    cancelled = srv.metrics.requests.labels(TINY, "densemap.Score", "CANCELLED")
    wait_until(lambda: cancelled._value.get() == 1, what="the engine to stop")
    assert srv.admission.counts(TINY) == (0, 0)


def test_reflection_lists_and_describes_every_service(server):
    _, target = server
    with channel(target) as chan:
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert names == {
            "densemap.v1.Densemap",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(chan))
        infer = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName(
            "ModelInfer"
        )
        assert infer.input_type.fields_by_name["raw_input_contents"].number == 7
        score = pool.FindServiceByName("densemap.v1.Densemap").FindMethodByName("ScoreStream")
        assert score.client_streaming and score.server_streaming


def test_metrics_endpoint_reports_requests_stages_and_models(repo):
    srv, port = start_server(repo, metrics_port=free_port())
    try:
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            assert score_code(stub, array_request(rgb_image())) == Code.OK
            assert score_code(stub, array_request(rgb_image(), model="nope")) == Code.NOT_FOUND
        url = f"http://{HOST}:{srv.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        srv.stop()
    assert 'densemap_requests_total{api="densemap.Score",code="OK",model="tiny"} 1.0' in text
    assert 'code="NOT_FOUND",model="_unknown"} 1.0' in text
    for stage in ("queue", "decode", "infer", "encode"):
        assert f'densemap_stage_seconds_count{{model="tiny",stage="{stage}"}} 1.0' in text
    assert 'densemap_input_pixels_count{model="tiny"} 1.0' in text
    assert 'densemap_in_flight_requests{model="tiny"} 0.0' in text
    assert 'densemap_model_loaded{model="tiny"} 1.0' in text
    # the process's RSS and CPU time
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("process_")
    }
    assert values["process_resident_memory_bytes"] > 10 << 20  # Python alone takes more
    assert values["process_cpu_seconds_total"] > 0


def test_drain_ends_an_open_stream_after_its_current_image(blocking_server):
    srv, chan, release, load, holder = blocking_server
    load.set()
    assert srv.wait_ready(20)
    stub = pb_grpc.DensemapStub(chan)
    more = threading.Event()

    def requests():
        yield array_request(rgb_image())
        more.wait(20)  # the client would go on sending; the server ends the stream first
        yield array_request(rgb_image())

    responses = stub.ScoreStream(requests(), timeout=30)
    wait_until(holder["repo"].get(TINY).started.is_set, what="the first image to start")
    drainer = threading.Thread(target=srv.drain, kwargs={"grace": 20})
    drainer.start()
    wait_until(lambda: srv.state.draining, what="drain to start")
    release.set()
    assert next(responses).maps  # the image in flight completes
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == Code.UNAVAILABLE
    more.set()
    drainer.join(20)
    assert not drainer.is_alive()


def test_open_health_watches_cannot_starve_health_checks_or_scoring(repo):
    # each open Watch holds a stream thread, never a scoring slot; 2 per client address
    srv, port = start_server(repo, scoring_threads=6, max_streams_per_peer=2)
    target = f"{HOST}:{port}"
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with channel(target) as chan:
            watch = health_pb2_grpc.HealthStub(chan).Watch
            watches = [watch(request, timeout=30) for _ in range(2)]
            assert [next(w).status for w in watches] == [SERVING, SERVING]
            with pytest.raises(grpc.RpcError) as caught:
                next(watch(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams-per-peer 2" in caught.value.details()
            assert health_of(chan, "") == SERVING
            assert srv.admission.admitted == 0
            assert pb_grpc.DensemapStub(chan).Score(array_request(rgb_image()), timeout=30).maps
            for stream in watches:
                stream.cancel()
            wait_until(lambda: srv.stream_limits.open == 0, timeout=5)
    finally:
        srv.stop()


def test_calls_cut_when_the_grace_ends_get_our_words_not_cancelling_all_calls(blocking_server):
    srv, chan, release, load, holder = blocking_server
    load.set()
    assert srv.wait_ready(20)
    stub = pb_grpc.DensemapStub(chan)
    running = stub.Score.future(array_request(rgb_image()), timeout=30)
    wait_until(holder["repo"].get(TINY).started.is_set, what="the request to start")
    queued = stub.Score.future(array_request(rgb_image()), timeout=30)
    wait_until(lambda: srv.admission.counts(TINY) == (1, 1), what="the second to queue")
    assert srv.drain(grace=0.2) is False
    for call in (running, queued):
        with pytest.raises(grpc.RpcError) as caught:
            call.result(timeout=20)
        assert caught.value.code() == Code.UNAVAILABLE
        details = caught.value.details()
        assert details.startswith("the server shut down before this call finished")
        assert "drain grace of 0.2 s (--grace-seconds)" in details
        assert "retry the call on another replica" in details
