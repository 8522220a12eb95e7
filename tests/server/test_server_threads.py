"""Which threads serve which calls: probes and metadata are answered on the event loop,
scoring (Score, KServe ModelInfer, each ScoreStream image) on the scoring threads."""

from __future__ import annotations

import threading

import tritonclient.grpc.service_pb2 as kserve_pb
import tritonclient.grpc.service_pb2_grpc as kserve_grpc
from grpc_health.v1 import health

from densemap.service._proto.densemap.v1 import densemap_pb2 as pb
from densemap.service._proto.densemap.v1 import densemap_pb2_grpc as pb_grpc
from densemap.service.server.densemap_servicer import DensemapServicer
from densemap.service.server.kserve_servicer import KServeServicer
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


def _recording(monkeypatch, cls, name: str, seen: dict[str, str]) -> None:
    original = getattr(cls, name)

    async def method(self, request, context):
        seen[name] = threading.current_thread().name
        return await original(self, request, context)

    monkeypatch.setattr(cls, name, method)


def test_control_calls_run_on_the_loop_and_scoring_on_the_scoring_threads(repo, monkeypatch):
    seen: dict[str, str] = {}
    _recording(monkeypatch, health.aio.HealthServicer, "Check", seen)
    for name in ("GetModel", "ListModels"):
        _recording(monkeypatch, DensemapServicer, name, seen)
    for name in ("ServerReady", "ModelMetadata"):
        _recording(monkeypatch, KServeServicer, name, seen)
    for cls, name in ((DensemapServicer, "_score"), (KServeServicer, "_infer")):
        original = getattr(cls, name)

        def scored(self, call, request, _original=original, _name=name):
            seen.setdefault(_name, set()).add((call.api, threading.current_thread().name))
            return _original(self, call, request)

        monkeypatch.setattr(cls, name, scored)
    srv, port = start_server(repo)
    try:
        with channel(f"{HOST}:{port}") as chan:
            stub = pb_grpc.DensemapStub(chan)
            kserve = kserve_grpc.GRPCInferenceServiceStub(chan)
            assert health_of(chan, "readiness") == SERVING
            stub.GetModel(pb.GetModelRequest(name=TINY), timeout=5)
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
            kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=5)
            kserve.ModelMetadata(kserve_pb.ModelMetadataRequest(name=TINY), timeout=5)
            stub.Score(array_request(rgb_image()), timeout=30)
            assert len(list(stub.ScoreStream(iter([array_request(rgb_image())]), timeout=30))) == 1
            request = kserve_pb.ModelInferRequest(model_name=TINY)
            image = rgb_image()
            request.inputs.add(name="image", datatype="UINT8", shape=list(image.shape))
            request.raw_input_contents.append(image.tobytes())
            assert kserve.ModelInfer(request, timeout=30).raw_output_contents
    finally:
        srv.stop()
    for name in ("Check", "GetModel", "ListModels", "ServerReady", "ModelMetadata"):
        assert seen[name] == "densemap-grpc", (name, seen[name])
    apis = {api for api, _ in seen["_score"] | seen["_infer"]}
    assert apis == {"densemap.Score", "densemap.ScoreStream", "kserve.ModelInfer"}
    threads = {thread for _, thread in seen["_score"] | seen["_infer"]}
    assert all(thread.startswith("densemap-score") for thread in threads), threads
